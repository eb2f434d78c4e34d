"""``bus train``: pre-train a BUS model (arXiv 2307.08504 §4.1) on synthetic data or a real corpus.

    bus train --model bus-tiny --data synthetic --out runs/tiny --steps 200
    python -m bus_model.training.train --model bus-tiny --data synthetic --out runs/tiny --steps 200
    torchrun --nproc_per_node=K -m bus_model.training.train --model bus-base --data shards/{00000..00999}.tar --out runs/b

``train`` reads top to bottom and is built from small setup functions, one concern per module of this
package (ARCHITECTURE.md): AdamW, cosine schedule with linear warm-up (``optim``), gradient
accumulation, gradient clipping (``grads``), bf16 autocast on GPU, DDP under ``torchrun`` (gloo on CPU,
NCCL on GPU; every rank reads its own shard of the data, ``batches``; only rank 0 writes), or FSDP2 with
``--fsdp`` (``distributed``: parameters, gradients and optimizer state sharded; checkpoints hold the
gathered full state, so they load anywhere). ``OUT/metrics.jsonl`` gets one JSON object per logged step
(``metrics``); ``OUT/checkpoints/`` gets atomic checkpoints (``checkpoint``) from which ``--resume``
continues exactly (``state``): same data order, same RNG draws, same losses step by step (on CPU).
``--stop-at N`` ends a process early, as a time-limited job would. ``OUT/summary.json`` closes the run
with the final step, throughput, skipped samples and each rank's parameter hash (the ranks must agree).
``--compile MODE`` runs forward + backward under ``torch.compile(fullgraph=True)`` with captions padded
to the config's ``max_text_len`` (``compile``: static shapes; the optimizer step stays eager; checkpoints
hold the uncompiled module's weights).

tqdm, TensorBoard and the data/tokenizer libraries are imported inside the functions that use them,
so ``import bus_model`` needs none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .args import add_train_arguments, args_record, check_args
from .batches import BatchStream, setup_dataset, to_model_inputs
from .command import run_command
from .compile import check_compile_config, compile_model, step_begin
from .errors import RunError, UsageError
from .distributed import gather_objects, parameter_hash, seed_everything, setup_distributed, wrap_model
from .grads import average_replicated_grads, clip_gradients
from .master_weights import MasterWeights
from .metrics import METRICS_FILE, MetricsLogger, progress_bar, truncate_metrics
from .model_setup import model_config_dict, setup_model, setup_tokenizer
from .optim import setup_optimizer, setup_scheduler
from .preemption import StopRequest, exit_status
from .state import find_resume_point, full_training_state, restore_metrics_window, restore_training_state

SUMMARY_FILE = "summary.json"


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.steps`` optimizer steps (from the latest checkpoint with ``--resume``); returns the
    summary that rank 0 also writes to ``OUT/summary.json``."""
    from ..data import Collator, SkipReport, save_tokenizer

    # ---- setup: process group, model, data, optimizer; then the resume point
    check_args(args)
    info = setup_distributed(args)
    out = Path(args.out)
    seed_everything(args.seed)  # the same initial weights on every rank
    tokenizer = setup_tokenizer(args, model_config_dict(args.model).get("max_text_len", 32))
    model = setup_model(args, tokenizer).to(info.device)
    config = model.config
    try:
        check_compile_config(config, args.compile)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    dataset = setup_dataset(args, config, info)
    # compiled: every batch padded to max_text_len, so a new caption length never means a new graph
    collator = Collator(tokenizer, image_size=config.vision.image_size, patch_size=config.vision.patch_size,
                        max_length=config.max_text_len, pad_to_max_length=args.compile != "none")
    stream = BatchStream(dataset, collator, batch_size=args.batch_size, seed=args.seed, info=info, workers=args.workers,
                         max_skip_share=args.max_skip_share, timeout=args.data_timeout, source=f"--data {args.data}")
    start = 0
    latest, loaded = find_resume_point(out, args, info)
    if loaded is not None:
        ckpt.load_model_weights(model, latest.path)
    amp = args.amp if args.amp is not None else info.device.type == "cuda"
    if args.bf16_weights and not amp:
        raise UsageError("--bf16-weights needs bf16 autocast: add --amp (the default on CUDA)")
    # --bf16-weights: matmul weights in bf16, fp32 masters in the optimizer (master_weights.py); before DDP
    # wraps the model, whose gradient buckets follow the parameters' dtypes
    master = MasterWeights(model) if args.bf16_weights else None
    # --compile: forward + backward compiled in place (traced at the first step), inside the DDP wrapper
    compile_model(model, args.compile, args.compile_backend)
    ddp_model = wrap_model(model, args, info)
    optimizer = setup_optimizer(model, args, master)  # after wrapping: FSDP replaces the parameters with shards
    scheduler = setup_scheduler(optimizer, args)
    seed_everything(args.seed + 7919 * info.rank)  # ranks draw different masks and negatives
    if loaded is not None:
        restore_training_state(loaded, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                               args=args, info=info)
        start = latest.step
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if latest is not None:
            truncate_metrics(out / METRICS_FILE, start)
            print(f"resuming from {latest.path} (step {start})", file=sys.stderr)
        elif args.resume:
            print(f"--resume: no checkpoint in {out}, starting from step 0", file=sys.stderr)
        if latest is None and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()  # a fresh run overwrites, it does not append to an old one
        save_tokenizer(tokenizer, out / ckpt.TOKENIZER_DIR)
    bar = progress_bar(start, args.steps, disabled=args.no_progress or not info.is_main)
    logger = MetricsLogger(out, config, info, tensorboard=args.tensorboard, bar=bar)
    if loaded is not None:  # the loss sums of the steps since the last logged row
        restore_metrics_window(loaded, logger, step=start, log_every=args.log_every, info=info)

    def save(step: int) -> Path:
        """Every rank contributes its RNG and data position; rank 0 writes."""
        rank_rng = gather_objects(ckpt.capture_rng_state(), info)
        data_states = gather_objects(stream.state(), info)
        metric_windows = gather_objects(logger.window_state(), info)
        with master.full_precision() if master is not None else contextlib.nullcontext():  # fp32 masters saved
            model_state, optimizer_state = full_training_state(model, optimizer, fsdp=args.fsdp)  # collective
            if model_state is None and master is not None:
                model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path = None
        if info.is_main:
            state = {"data": data_states, "metrics": metric_windows, "args": args_record(args),
                     "world_size": info.world_size, "fsdp": args.fsdp}
            try:
                path = ckpt.save_checkpoint(out, step, model=model, model_state=model_state,
                                            optimizer_state=optimizer_state, scheduler_state=scheduler.state_dict(),
                                            trainer_state=state, rank_rng=rank_rng, tokenizer=tokenizer,
                                            keep=args.keep_checkpoints)
            except OSError as err:  # a full disk, a quota, a vanished mount: the previous checkpoint is untouched
                previous = ckpt.latest_checkpoint(out)
                raise RunError(f"could not write the checkpoint of step {step} in {out / ckpt.CHECKPOINT_DIR}: {err}. "
                               f"The previous checkpoint ({previous.path if previous else 'none'}) is intact; free "
                               "space (or fix the directory) and rerun with --resume") from err
        if info.enabled:
            dist.barrier()
        return path

    model.train()
    run_start = time.perf_counter()
    images_trained = 0
    last_saved = start
    end = args.steps if args.stop_at is None else max(start, args.stop_at)
    stopped_by = None
    # preemption.py: on SIGTERM/SIGUSR1 finish the step, checkpoint, exit 128 + signal; an error closes the bar first
    with StopRequest(info) as stop, contextlib.closing(bar):
        for step in range(start, end):
            # ---- one optimizer step: accumulate gradients over micro-batches
            for micro in range(args.accum_steps):
                inputs = to_model_inputs(stream.next(), info.device)
                last = micro == args.accum_steps - 1
                if args.fsdp:  # FSDP reduce-scatters gradients only on the last micro-batch
                    model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or args.fsdp or not info.enabled else ddp_model.no_sync()
                with sync:
                    step_begin(args.compile, args.compile_backend, info.device)  # CUDA graphs: a new iteration
                    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=amp):
                        output = ddp_model(**inputs)
                    (output.loss / args.accum_steps).backward()
                logger.add(output, inputs)
                images_trained += inputs["images"].shape[0]
            grad_norm = None
            if master is not None:  # bf16 gradients into the fp32 masters: clipping and the update see those
                master.grads_to_masters()
            if args.fsdp:
                average_replicated_grads(model, info)
                if args.grad_clip > 0:
                    grad_norm = clip_gradients(model, args.grad_clip)
            elif args.grad_clip > 0:
                params = master.update_params() if master is not None else model.parameters()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            # ---- log (not at --stop-at or a signal: the window goes on in the checkpoint, as in an unbroken run)
            if done % args.log_every == 0 or done == args.steps:
                logger.write(done, lr=lr, grad_norm=grad_norm, stream=stream)
            bar.update(1)

            # ---- stop on SIGTERM/SIGUSR1 (every rank after the same step), then checkpoint
            stopped_by = stop.check() if done < end else None  # at the last step the run is complete anyway
            if stopped_by:
                stream.close()  # DataLoader workers down first: one dying mid-save would abort the checkpoint
            if done % args.save_every == 0 or done == end or stopped_by:
                save(done)
                last_saved = done
            if stopped_by:
                end = done
                break
    bar.close()
    if last_saved != end:  # nothing left to run (resumed at the end): make sure the last one exists
        save(end)

    # ---- summary: every rank's parameter hash (DDP keeps them equal) and skipped samples
    wall = time.perf_counter() - run_start
    hashes = gather_objects(parameter_hash(model), info)
    skips = SkipReport()  # every rank's unique skipped samples, each counted once over the whole run
    for rank_skips in gather_objects(stream.skips.state(), info):
        skips.merge(SkipReport.from_state(rank_skips))
    images = gather_objects(images_trained, info)
    summary = {
        "steps": end, "resumed_from": start, "world_size": info.world_size, "wall_s": wall,
        "images_per_s": sum(images) / wall if wall > 0 else None, "param_sha256": hashes,
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_files": [dataclasses.asdict(e) for e in skips.records],
        "checkpoint": str(ckpt.latest_checkpoint(out).path) if info.is_main else None,
        "stopped_by": signal.Signals(stopped_by).name if stopped_by else None,
    }
    if info.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        print(skips.summary(), file=sys.stderr)
        print(f"wrote {out / SUMMARY_FILE}, {out / METRICS_FILE}, checkpoint {summary['checkpoint']}", file=sys.stderr)
        if stopped_by:
            print(f"stopped by {summary['stopped_by']} after step {end} of {args.steps}: continue with the same "
                  f"command and --resume (exit status {exit_status(stopped_by)})", file=sys.stderr)
    logger.close()
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---- the ``bus`` subcommand convention (training/cli.py SUBCOMMANDS): add_arguments(parser), run(args)
add_arguments = add_train_arguments


def run(args: argparse.Namespace) -> int:
    """0 when the run reached its last step; 128 + signal number when SIGTERM/SIGUSR1 stopped it after a
    checkpoint (``preemption``): 143 for SIGTERM, 138 for SIGUSR1."""
    summary = train(args)
    if summary.get("stopped_by"):
        return exit_status(signal.Signals[summary["stopped_by"]])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bus_model.training.train ...`` (the same flags as ``bus train``; also under torchrun)."""
    return run_command("train", add_arguments, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
