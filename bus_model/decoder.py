"""Text decoder for PrefixLM / captioning (BUS §3.4, mPLUG/SimVLM-style prefix language modelling).

Causal BERT layers with cross-attention to the visual memory (the image is the prefix: the decoder
predicts the caption given [image CLS + PAD summary], or every ViT token in the baseline); an LM head
tied to the decoder's word embeddings. ``generate`` decodes greedily or with beam search.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from .losses import masked_mean_cross_entropy
from .text import BertEmbeddings, BertEncoderLayers, run_layers, shifted_padding_mask


class LMHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMHead(nn.Module):
    """BERT prediction head: transform, then logits through the (tied) word-embedding matrix + bias."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = LMHeadTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (..., C), word_embeddings (V, C) -> logits (..., V)."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig, num_layers: int, memory_width: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.attn_impl = attn_impl
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoderLayers(cfg, num_layers, cross_width=memory_width)
        self.lm_head = LMHead(cfg)

    def hidden_states(self, input_ids, mask, memory, memory_mask):
        """input_ids (B, T), mask (B, T) bool or None, memory (B, M, Cv) -> (B, T, C) causal states."""
        x = self.embeddings(input_ids)
        return run_layers(self.encoder.layer, x, mask, self.attn_impl, memory, memory_mask, causal=True)

    def forward(self, input_ids, mask, memory, memory_mask=None) -> torch.Tensor:
        """-> next-token logits (B, T, vocab)."""
        h = self.hidden_states(input_ids, mask, memory, memory_mask)
        return self.lm_head(h, self.embeddings.word_embeddings.weight)

    def loss(self, input_ids, attention_mask, memory, memory_mask=None) -> torch.Tensor:
        """Caption loss: predict token t+1 from tokens <= t and the memory; padding ignored.

        input_ids (B, L) int64 starting with [CLS] (= begin-of-sentence), attention_mask (B, L) 0/1.
        """
        inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
        targets = targets.masked_fill(~attention_mask[:, 1:].bool(), -100)
        h = self.hidden_states(inputs, shifted_padding_mask(attention_mask), memory, memory_mask)  # (B, L-1, C)
        logits = self.lm_head(h, self.embeddings.word_embeddings.weight)  # (B, L-1, V)
        return masked_mean_cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(
        self, memory, memory_mask=None, *, max_length: int = 20, num_beams: int = 1,
        bos_token_id: int, eos_token_id: int, pad_token_id: int, length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Decode captions. memory (B, M, Cv) -> token ids (B, <= max_length) int64, starting with BOS,
        padded with ``pad_token_id`` after EOS. ``num_beams == 1``: greedy; else beam search that
        ranks finished hypotheses by log-probability / length ** length_penalty."""
        if num_beams == 1:
            return self._greedy(memory, memory_mask, max_length, bos_token_id, eos_token_id, pad_token_id)
        return self._beam(memory, memory_mask, max_length, num_beams, bos_token_id, eos_token_id, pad_token_id, length_penalty)

    def _next_logprobs(self, ids, memory, memory_mask):
        h = self.hidden_states(ids, None, memory, memory_mask)[:, -1]
        return self.lm_head(h, self.embeddings.word_embeddings.weight).float().log_softmax(-1)

    def _greedy(self, memory, memory_mask, max_length, bos, eos, pad):
        B = memory.shape[0]
        ids = torch.full((B, 1), bos, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(max_length - 1):
            nxt = self._next_logprobs(ids, memory, memory_mask).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return ids

    def _beam(self, memory, memory_mask, max_length, beams, bos, eos, pad, length_penalty):
        B, device = memory.shape[0], memory.device
        mem = memory.repeat_interleave(beams, 0)  # (B*K, M, C)
        mem_mask = None if memory_mask is None else memory_mask.repeat_interleave(beams, 0)
        ids = torch.full((B * beams, 1), bos, dtype=torch.long, device=device)
        scores = torch.full((B, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: only the first one is live
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
        for step in range(max_length - 1):
            logp = self._next_logprobs(ids, mem, mem_mask)  # (B*K, V)
            V = logp.shape[-1]
            total = (scores.view(-1, 1) + logp).view(B, beams * V)
            top, flat = total.topk(2 * beams, dim=1)  # (B, 2K): room for beams that end here
            beam_idx, token = flat // V, flat % V
            new_ids, new_scores = [], []
            for b in range(B):
                row_ids, row_scores = [], []
                for s, bi, tok in zip(top[b].tolist(), beam_idx[b].tolist(), token[b].tolist()):
                    if s == float("-inf"):
                        continue
                    seq = torch.cat([ids[b * beams + bi], ids.new_tensor([tok])])
                    if tok == eos:
                        finished[b].append((s / len(seq) ** length_penalty, seq))
                    else:
                        row_ids.append(seq)
                        row_scores.append(s)
                    if len(row_ids) == beams:
                        break
                while len(row_ids) < beams:  # keep the shape; dead beams never win
                    row_ids.append(torch.cat([ids[b * beams], ids.new_tensor([pad])]))
                    row_scores.append(float("-inf"))
                new_ids.extend(row_ids)
                new_scores.append(row_scores)
            ids = torch.stack(new_ids)
            scores = torch.tensor(new_scores, device=device)
            best_open = scores.max(dim=1).values
            if all(
                finished[b] and max(f[0] for f in finished[b]) >= best_open[b].item() / (step + 2) ** length_penalty
                for b in range(B)
            ):
                break
        out = []
        for b in range(B):
            for k in range(beams):  # unfinished beams compete at full length
                if scores[b, k] > float("-inf"):
                    seq = ids[b * beams + k]
                    finished[b].append((scores[b, k].item() / len(seq) ** length_penalty, seq))
            out.append(max(finished[b], key=lambda f: f[0])[1])
        width = max(len(s) for s in out)
        result = torch.full((B, width), pad, dtype=torch.long, device=device)
        for b, seq in enumerate(out):
            result[b, : len(seq)] = seq
        return result
