"""The metrics of ``bus eval`` (BUS §4.2-4.3, the ALBEF protocol): Recall@K and ranks of image-text
retrieval with ITM re-ranking of the top candidates, and BLEU-4 / CIDEr of generated captions."""

from __future__ import annotations

import re

import torch

from .errors import UsageError

RECALL_KS = (1, 5, 10)


def first_positive_rank(ranking: torch.Tensor, positives: list[list[int]]) -> torch.Tensor:
    """ranking (Q, C) int64: candidate indices of each query, best first; positives: the correct
    candidates of each query (at least one) -> (Q,) int64, the 1-based rank of the best-placed correct one."""
    if ranking.dim() != 2 or ranking.shape[0] != len(positives):
        raise ValueError(f"ranking must be (Q, C) with Q = len(positives) = {len(positives)}, got {tuple(ranking.shape)}")
    if any(len(p) == 0 for p in positives):
        raise ValueError("every query needs at least one correct candidate")
    q, c = ranking.shape
    position = torch.empty_like(ranking)
    position.scatter_(1, ranking, torch.arange(c).expand(q, c))  # position[q, cand] = its 0-based rank
    return torch.tensor([int(position[i, p].min()) + 1 for i, p in enumerate(positives)], dtype=torch.long)


def recall_at_k(ranking: torch.Tensor, positives: list[list[int]], ks=RECALL_KS) -> dict[int, float]:
    """{K: share of queries with a correct candidate in the top K} (arguments as ``first_positive_rank``)."""
    first = first_positive_rank(ranking, positives)
    return {k: float((first <= k).double().mean()) for k in ks}


def rerank_top_k(sim: torch.Tensor, k: int, itm_scores) -> torch.Tensor:
    """Full rankings (Q, C) from ITC similarities sim (Q, C), with each query's top ``k`` reordered by
    ``itm_scores(query_idx (P,), cand_idx (P,)) -> (P,)`` (higher is better). k = 0: ITC order only."""
    order = sim.argsort(dim=1, descending=True, stable=True)
    k = min(k, sim.shape[1])
    if k == 0:
        return order
    top = order[:, :k]  # (Q, k)
    queries = torch.arange(sim.shape[0]).repeat_interleave(k)
    scores = itm_scores(queries, top.reshape(-1)).reshape(-1, k).float().cpu()  # (Q, k)
    reordered = top.gather(1, scores.argsort(dim=1, descending=True, stable=True))
    return torch.cat([reordered, order[:, k:]], dim=1)


_WORD = re.compile(r"[a-z0-9]+")


def _caption_tokens(text: str) -> str:
    """Lower-case words joined by single spaces: the pre-tokenised form pycocoevalcap scores."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """BLEU-4 and CIDEr (pycocoevalcap) of one hypothesis per image against its references."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise UsageError("captioning metrics need pycocoevalcap (pip install 'bus-vlp[train]'), "
                         "or pass --no-captions") from None
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(f"need one hypothesis per image, got {len(hypotheses)} for {len(references)} images")
    gts = {i: [_caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_caption_tokens(h)] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
