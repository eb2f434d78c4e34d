"""Building the model of a run: its config (a name or a .json file), the tokenizer it must match,
and optional activation checkpointing."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch

from ..config import BusConfig, load_config_dict, merge_overrides
from ..model import BusModel
from .errors import UsageError


def setup_tokenizer(args: argparse.Namespace, max_length: int):
    """The synthetic WordPiece tokenizer, or the local HF tokenizer directory given by ``--tokenizer``."""
    from ..data import build_synthetic_tokenizer, load_tokenizer

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    return build_synthetic_tokenizer(max_length)


def model_config_dict(model: str) -> dict[str, Any]:
    """The config dict of a named model or a config .json file."""
    if model.endswith(".json"):
        try:
            return json.loads(Path(model).read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"--model: {model} is not valid JSON ({err})") from None
    return load_config_dict(model)


def tokenizer_overrides(tokenizer) -> dict[str, Any]:
    """Text-config fields that must follow the tokenizer: vocabulary size and special token ids."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
           "sep_token_id": tokenizer.sep_token_id, "mask_token_id": tokenizer.mask_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise UsageError(f"the tokenizer lacks special tokens: {missing} (a BERT-style tokenizer is needed)")
    return {"text": {"vocab_size": len(tokenizer), **ids}}


def setup_model(args: argparse.Namespace, tokenizer) -> BusModel:
    """A randomly initialised ``BusModel`` whose text side matches the tokenizer."""
    data = merge_overrides(model_config_dict(args.model), tokenizer_overrides(tokenizer))
    try:
        config = BusConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    model = BusModel(config)
    if args.grad_checkpointing:
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        else:
            apply_grad_checkpointing(model)
    return model


def _checkpointed(fn):
    """``fn`` whose activations are recomputed in backward instead of stored (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def apply_grad_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every Transformer block's activations in backward (activation memory O(1 block)
    instead of O(depth)); returns the number of blocks wrapped. A block is an entry of an
    ``nn.ModuleList``; the ViT's blocks run through ``attend``/``feed_forward``, which are wrapped too.
    The blocks draw no random numbers, so the recomputation is exact."""
    wrapped = 0
    for _name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.ModuleList):
            continue
        for block in module:
            for method in ("forward", "attend", "feed_forward"):
                if hasattr(block, method) and method in type(block).__dict__:
                    setattr(block, method, _checkpointed(getattr(block, method)))
            wrapped += 1
    return wrapped
