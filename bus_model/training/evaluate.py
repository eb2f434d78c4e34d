"""``bus eval``: image-text retrieval and captioning metrics of a checkpoint (BUS §4.2-4.3, the ALBEF protocol).

Retrieval, both directions: rank every candidate by the ITC similarity of the normalised [CLS]
embeddings (images encoded without text, EViT-style selection for BUS), then re-rank the top
``--rerank-k`` candidates of every query by the ITM head's matching probability (the caption guides the
token selection there, as in training). Recall@K is the share of queries whose correct candidate is
among the first K: for image->text any of the image's captions counts. Chance level is
``K / number of candidates``.

Captioning: ``BusModel.generate`` (greedy, or beam search) on every distinct image, scored against all
of the image's captions with BLEU-4 and CIDEr from ``pycocoevalcap`` (its pure-Python scorers; the
texts are lower-cased and split on whitespace and punctuation here, instead of its Java PTB tokenizer).

Output keys: ``txt2img_r1/5/10``, ``img2txt_r1/5/10``, ``r_mean`` (their mean), ``txt2img_medr`` /
``_meanr`` (median / mean 1-based rank of the first correct candidate; chance: about half the
candidates), all after ITM re-ranking, the same with an ``itc_`` prefix before it; ``bleu4``,
``cider``, ``num_images``, ``num_texts``, ``rerank_k``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model import BusModel
from . import checkpoint as ckpt
from .args import check_data_arg
from .command import run_command
from .errors import UsageError
from .eval_metrics import (  # recall_at_k: the metric functions are importable from here too
    RECALL_KS,
    caption_scores,
    first_positive_rank,
    recall_at_k,  # noqa: F401
    rerank_top_k,
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bus eval`` flags."""
    parser.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--data", required=True, help="'synthetic' (the held-out test split) or a manifest / COCO "
                        "file / webdataset shards")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--num-samples", type=int, default=1000, help="synthetic data: image-caption pairs evaluated")
    parser.add_argument("--data-seed", type=int, default=0, help="synthetic data: the generator's seed")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="synthetic data: held-out split")
    parser.add_argument("--image-root", default=None, help="directory the manifest's image paths are relative to")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images (or ITM pairs x 4) per forward pass")
    parser.add_argument("--rerank-k", type=int, default=16, help="re-rank this many ITC candidates by ITM (0: off)")
    parser.add_argument("--no-captions", action="store_true", help="skip captioning (BLEU-4 / CIDEr)")
    parser.add_argument("--num-beams", type=int, default=1, help="captioning beam size (1: greedy)")
    parser.add_argument("--max-caption-len", type=int, default=None, help="tokens per generated caption "
                        "(default: the model's max_text_len)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off on CPU)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    return parser


# -------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedSet:
    """Everything retrieval and captioning need from one pass over the data.

    image_emb (Ni, E) / text_emb (Nt, E) float32 normalised; images (Ni, 3, H, W) float16 on CPU (for
    ITM re-ranking); input_ids / attention_mask (Nt, L) int64; text_image (Nt,) the image of each text;
    captions (Nt) str; generated (Ni) str."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_image: torch.Tensor
    captions: list[str]
    generated: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def image_texts(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.images.shape[0])]
        for t, i in enumerate(self.text_image.tolist()):
            out[i].append(t)
        return out


class _Keyed(torch.utils.data.Dataset):
    """(image key, item) pairs of a map-style dataset: several captions of one image share the key."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.records = getattr(dataset, "records", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        key = self.records[i].image if self.records is not None else (item["id"] if isinstance(item, dict) else i)
        return key, item


class _KeyedIterable(torch.utils.data.IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for item in self.dataset:
            yield (item["id"] if isinstance(item, dict) else None), item


@torch.no_grad()
def encode_dataset(model: BusModel, dataset, tokenizer, *, device: torch.device, batch_size: int,
                   captions: bool, max_caption_len: int, num_beams: int, workers: int = 0,
                   amp: bool = False) -> EncodedSet:
    """One pass: embed distinct images and every caption, generate a caption per image (the model under
    bf16 autocast when ``amp``)."""
    from ..data import Collator, SkipReport, SkippedSample

    cfg = model.config
    collator = Collator(tokenizer, image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                        max_length=cfg.max_text_len)
    keyed = _KeyedIterable(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else _Keyed(dataset)
    loader = torch.utils.data.DataLoader(keyed, batch_size=batch_size, collate_fn=list, num_workers=workers)
    image_index: dict[Any, int] = {}
    image_emb, text_emb, images, ids, text_image, texts, generated = [], [], [], [], [], [], []
    skips = SkipReport()
    for pairs in loader:
        skips.update(item for _key, item in pairs if isinstance(item, SkippedSample))
        good = [(key, item) for key, item in pairs if not isinstance(item, SkippedSample)]
        if not good:
            continue
        batch = collator([item for _key, item in good])
        new = []  # rows of this batch that show an image not seen before
        for row, (key, _item) in enumerate(good):
            if key not in image_index:
                image_index[key] = len(image_index)
                new.append(row)
            text_image.append(image_index[key])
        ids_b = batch["input_ids"].to(device)
        mask_b = batch["attention_mask"].to(device)
        with _autocast(device, amp):
            text_emb.append(model.encode_text(ids_b, mask_b).embedding.float().cpu())
        for row in range(ids_b.shape[0]):
            n = int(mask_b[row].sum())
            ids.append(batch["input_ids"][row, :n])
        texts.extend(batch["captions"])
        if new:
            imgs = batch["images"][new]
            with _autocast(device, amp):
                image_emb.append(model.encode_image(imgs.to(device)).embedding.float().cpu())
            images.append(imgs.half())
            if captions:
                with _autocast(device, amp):
                    out = model.generate(imgs.to(device), max_length=max_caption_len, num_beams=num_beams)
                generated.extend(tokenizer.batch_decode(out.cpu(), skip_special_tokens=True))
    if not texts:
        raise RuntimeError(f"no usable samples in the evaluation data ({skips.summary()})")
    max_len = max(len(t) for t in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), max_len), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(ids), max_len, dtype=torch.long)
    for row, t in enumerate(ids):
        input_ids[row, : len(t)] = t
        attention_mask[row, : len(t)] = 1
    return EncodedSet(torch.cat(image_emb), torch.cat(text_emb), torch.cat(images), input_ids, attention_mask,
                      torch.tensor(text_image), texts, generated, dict(skips.counts))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def itm_scorer(model: BusModel, enc: EncodedSet, device: torch.device, batch_size: int, queries_are_images: bool,
               amp: bool = False):
    """``scores(query_idx, cand_idx) -> (P,)`` ITM match probabilities of (image, text) pairs."""

    @torch.no_grad()
    def scores(query_idx: torch.Tensor, cand_idx: torch.Tensor) -> torch.Tensor:
        img_idx, txt_idx = (query_idx, cand_idx) if queries_are_images else (cand_idx, query_idx)
        out = []
        for s in range(0, img_idx.numel(), batch_size):
            i, t = img_idx[s : s + batch_size], txt_idx[s : s + batch_size]
            mask = enc.attention_mask[t]
            n = int(mask.sum(dim=1).max())  # trim the padding shared by the whole chunk
            with _autocast(device, amp):
                out.append(model.itm_score(enc.images[i].float().to(device), enc.input_ids[t, :n].to(device),
                                           mask[:, :n].to(device)).float().cpu())
        return torch.cat(out)

    return scores


def retrieval_metrics(model: BusModel, enc: EncodedSet, *, device: torch.device, rerank_k: int,
                      batch_size: int, amp: bool = False) -> dict[str, float]:
    """R@1/5/10 in both directions, from ITC and after ITM re-ranking of the top ``rerank_k``."""
    sim = enc.image_emb @ enc.text_emb.t()  # (Ni, Nt)
    img_pos = enc.image_texts()
    txt_pos = [[i] for i in enc.text_image.tolist()]
    out: dict[str, float] = {}
    for prefix, k in (("itc_", 0), ("", rerank_k)):
        i2t = rerank_top_k(sim, k, itm_scorer(model, enc, device, batch_size, queries_are_images=True, amp=amp))
        t2i = rerank_top_k(sim.t(), k, itm_scorer(model, enc, device, batch_size, queries_are_images=False, amp=amp))
        recalls = []
        for name, ranking, positives in (("img2txt", i2t, img_pos), ("txt2img", t2i, txt_pos)):
            first = first_positive_rank(ranking, positives).double()
            for kk in RECALL_KS:
                out[f"{prefix}{name}_r{kk}"] = float((first <= kk).double().mean())
                recalls.append(out[f"{prefix}{name}_r{kk}"])
            out[f"{prefix}{name}_medr"] = float(first.median())
            out[f"{prefix}{name}_meanr"] = float(first.mean())
        out[f"{prefix}r_mean"] = sum(recalls) / len(recalls)
        if rerank_k == 0:
            out.update({key[len("itc_"):]: v for key, v in out.items() if key.startswith("itc_")})
            break
    return out


# ------------------------------------------------------------------------------------------ driver
def load_for_eval(checkpoint: str, tokenizer_dir: str | None, device: torch.device):
    """(model in eval mode on ``device``, tokenizer, checkpoint directory)."""
    from ..data import load_tokenizer

    path = ckpt.resolve_checkpoint(checkpoint)
    model = BusModel.from_pretrained(path).to(device).eval()
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path / ckpt.TOKENIZER_DIR
    if not tok_dir.is_dir():
        tok_dir = path.parent.parent / ckpt.TOKENIZER_DIR  # the run directory's copy
    return model, load_tokenizer(tok_dir), path


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """All metrics of ``args.checkpoint`` on ``args.data``; writes ``args.json`` when given."""
    from ..data import build_dataset

    for name in ("batch_size", "num_samples", "num_beams"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rerank_k < 0:
        raise UsageError(f"--rerank-k must be >= 0, got {args.rerank_k}")
    check_data_arg(args.data)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, tokenizer, path = load_for_eval(args.checkpoint, args.tokenizer, device)
    except FileNotFoundError as err:
        raise UsageError(f"--checkpoint: {err}") from None
    v = model.config.vision
    try:
        dataset = build_dataset(args.data, split=args.split, image_size=v.image_size, patch_size=v.patch_size,
                                seed=args.data_seed, num_samples=args.num_samples, augment=False,
                                image_root=args.image_root)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data {args.data}: {err}") from None
    max_len = args.max_caption_len or model.config.max_text_len
    amp = args.amp if args.amp is not None else device.type == "cuda"
    start = time.perf_counter()
    size = f"{len(dataset)} samples" if hasattr(dataset, "__len__") else "the samples"  # shards: unknown
    print(f"encoding {size} of --data {args.data}"
          + ("" if args.no_captions else " and generating their captions") + " ...", file=sys.stderr)
    enc = encode_dataset(model, dataset, tokenizer, device=device, batch_size=args.batch_size,
                         captions=not args.no_captions, max_caption_len=max_len, num_beams=args.num_beams,
                         workers=args.workers, amp=amp)
    encode_s = time.perf_counter() - start
    print(f"retrieval: ranking by ITC, re-ranking the top {args.rerank_k} by ITM ...", file=sys.stderr)
    retrieval = retrieval_metrics(model, enc, device=device, rerank_k=args.rerank_k, batch_size=args.batch_size,
                                  amp=amp)
    metrics: dict[str, Any] = {"checkpoint": str(path), "data": args.data, "num_images": enc.images.shape[0],
                               "num_texts": len(enc.captions), "rerank_k": args.rerank_k}
    metrics.update(retrieval)
    if not args.no_captions:
        refs = [[enc.captions[t] for t in texts] for texts in enc.image_texts()]
        metrics.update(caption_scores(refs, enc.generated))
        metrics["caption_examples"] = [{"generated": g, "reference": r[0]} for g, r in zip(enc.generated[:5], refs)]
    metrics["skipped"] = enc.skipped
    metrics["encode_s"] = encode_s
    metrics["total_s"] = time.perf_counter() - start
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short plain-text table of the headline numbers."""
    lines = [f"{metrics['num_images']} images, {metrics['num_texts']} texts (chance R@1 = "
             f"{1 / metrics['num_texts']:.4f} img->txt, {1 / metrics['num_images']:.4f} txt->img)"]
    for prefix, label in (("itc_", "ITC"), ("", f"ITM re-rank top-{metrics['rerank_k']}")):
        lines.append(f"{label:>22}: " + "  ".join(
            f"{d}@{k} {100 * metrics[f'{prefix}{d}_r{k}']:5.1f}" for d in ("img2txt", "txt2img") for k in RECALL_KS)
            + "  meanr " + "/".join(f"{metrics[f'{prefix}{d}_meanr']:.1f}" for d in ("img2txt", "txt2img")))
    if "bleu4" in metrics:
        lines.append(f"{'captioning':>22}: BLEU-4 {metrics['bleu4']:.4f}  CIDEr {metrics['cider']:.4f}")
    return "\n".join(lines)


def evaluate_cli(args: argparse.Namespace) -> dict[str, Any]:
    metrics = evaluate(args)
    print(format_metrics(metrics))
    return metrics


# ---- the ``bus`` subcommand convention (training/cli.py SUBCOMMANDS): add_arguments(parser), run(args)
add_arguments = add_eval_arguments


def run(args: argparse.Namespace) -> int:
    evaluate_cli(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_model.training.evaluate ...`` (the same flags as ``bus eval``)."""
    return run_command("eval", add_arguments, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
