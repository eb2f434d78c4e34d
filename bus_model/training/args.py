"""``bus train`` flags: the parser, the checks run before anything expensive, and the record of a
run's arguments that checkpoints keep."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from ..config import list_config_names
from .compile import BACKEND_HELP, COMPILE_HELP, check_compile_mode
from .errors import UsageError


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bus train`` flags (shared by ``python -m bus_model.training.train``)."""
    g = parser.add_argument_group("run")
    g.add_argument("--model", required=True, help=f"config name ({', '.join(list_config_names())}) or a config "
                   ".json file")
    g.add_argument("--data", required=True, help="'synthetic', a manifest (.jsonl/.json/.csv), a COCO captions "
                   "file, or webdataset shards (dir, glob or {00000..00009}.tar)")
    g.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, summary.json")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--seed", type=int, default=0, help="seed for init, masking and data order")
    g.add_argument("--stop-at", type=int, default=None, help="end this process after this many steps (with a "
                   "checkpoint) as a time-limited job would; --resume continues the same run to --steps")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=32, help="images per micro-batch on each rank")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a share of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.02, help="AdamW decay of matrices (not biases/norms)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--bf16-weights", action="store_true", help="keep the matmul weights in bf16 and fp32 master "
                   "copies in the optimizer: no autocast casts of weights or their gradients (~14%% fewer ops per "
                   "step, for GPU steps bound by the host); needs --amp; not with --fsdp or --accum-steps > 1")
    g.add_argument("--compile", default="none", nargs="?", const="default", metavar="MODE",
                   help=COMPILE_HELP + " (a bare --compile: default)")
    g.add_argument("--compile-backend", default="inductor", metavar="BACKEND", help=BACKEND_HELP)
    g = parser.add_argument_group("data")
    g.add_argument("--tokenizer", default=None, help="local HF tokenizer directory (required for real data; "
                   "synthetic data builds its own WordPiece tokenizer)")
    g.add_argument("--train-samples", type=int, default=10000, help="synthetic data: dataset size")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic data: the generator's seed")
    g.add_argument("--image-root", default=None, help="directory the manifest's image paths are relative to")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    g.add_argument("--max-skip-share", type=float, default=0.5, help="stop with an error when more than this share "
                   "of 256 consecutive reads are unreadable samples (1: never; a pass that cannot fill one batch "
                   "always stops)")
    g.add_argument("--data-timeout", type=float, default=600.0, help="with --workers: seconds to wait for a batch "
                   "before reporting a stalled DataLoader worker (0: wait forever)")
    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept on disk")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("system")
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK if available)")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for configs where "
                   "some parameters get no gradient")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state across "
                   "ranks (FSDP2 fully_shard per Transformer block) instead of DDP, for models too large to replicate")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` for flags that cannot work, before anything expensive happens."""
    positive = ("steps", "batch_size", "accum_steps", "log_every", "save_every", "keep_checkpoints", "train_samples")
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.batch_size < 2:
        raise UsageError("--batch-size must be >= 2 (ITC and ITM take their negatives from the batch)")
    for name in ("lr", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        raise UsageError(f"--warmup-steps must be in [0, --steps], got {args.warmup_steps}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise UsageError(f"--stop-at must be in [1, --steps], got {args.stop_at}")
    if args.workers < 0 or (args.num_threads is not None and args.num_threads < 1):
        raise UsageError("--workers must be >= 0 and --num-threads >= 1")
    if not 0.0 < args.max_skip_share <= 1.0:
        raise UsageError(f"--max-skip-share must be in (0, 1], got {args.max_skip_share}")
    if not math.isfinite(args.data_timeout) or args.data_timeout < 0:
        raise UsageError(f"--data-timeout must be a finite number >= 0, got {args.data_timeout}")
    try:
        check_compile_mode(args.compile, args.compile_backend)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.bf16_weights and (args.fsdp or args.accum_steps > 1):
        raise UsageError("--bf16-weights works with DDP and --accum-steps 1 (FSDP has its own mixed precision; "
                         "micro-batch gradients would add up in bf16)")
    if args.compile == "reduce-overhead" and args.accum_steps > 1:
        raise UsageError("--compile reduce-overhead with --accum-steps > 1 is not supported: each CUDA graph replay "
                         "reuses the gradient buffers the previous micro-batch accumulated into; use a larger "
                         "--batch-size with --accum-steps 1, or --compile default")
    if args.compile != "none" and args.fsdp:
        raise UsageError("--compile with --fsdp is not supported (FSDP2's per-block hooks need compiled autograd); "
                         "use DDP (the default under torchrun) or --compile none")
    check_model_arg(args.model)
    check_data_arg(args.data)
    if args.data != "synthetic" and args.tokenizer is None:
        raise UsageError("real data needs --tokenizer DIR (a local HF tokenizer directory, e.g. bert-base-uncased)")
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise UsageError(f"--tokenizer: directory not found: {args.tokenizer}")


def check_model_arg(model: str) -> None:
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise UsageError(f"--model: config file not found: {model}")
    elif model not in list_config_names():
        raise UsageError(f"--model: unknown model name {model!r}; available: {', '.join(list_config_names())}")


def check_data_arg(data: str) -> None:
    """'synthetic', an existing file or directory, or a shard pattern (glob / brace range)."""
    if data == "synthetic" or os.path.exists(data):
        return
    if any(c in data for c in "*?[{"):
        from ..data.webdataset import expand_shards

        try:
            expand_shards(data)
        except FileNotFoundError as err:
            raise UsageError(f"--data: {err}") from None
        return
    raise UsageError(f"--data: path not found: {data} (give 'synthetic' or an existing manifest, COCO file or shards)")


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags as JSON-ready data (tuples as lists), as checkpoints store them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if not k.startswith("_")}
