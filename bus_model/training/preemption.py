"""Preemption: clusters stop jobs with SIGTERM (SLURM also sends SIGUSR1 ahead of the time limit, with
``--signal=USR1@SECONDS``). On either signal ``bus train`` finishes the optimizer step it is in, writes
a checkpoint and exits with status ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1: what a shell
reports for a process the signal ended, so job wrappers that requeue on 143 keep working); ``--resume``
then continues the run exactly.

The signal handler only sets a flag, so a signal never interrupts a step or a checkpoint write half way.
Under ``torchrun`` the signal may reach the ranks at different moments; after every step the ranks
all-reduce (MAX) their flags so that they all stop after the same step. The all-reduce is a tiny CPU
tensor over a gloo group, which never synchronises the host with the GPU stream; without a process group
nothing is communicated.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from .distributed import DistInfo

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum`` after its checkpoint: 128 + signum."""
    return 128 + int(signum)


class StopRequest:
    """Catches SIGTERM/SIGUSR1 while a run trains; ``check()`` after each step says whether to stop.

    Use as a context manager around the training loop (the previous handlers come back on exit). Signal
    handlers can only be installed from the main thread; elsewhere (e.g. a run started from a worker
    thread) the request is inert and says so once on stderr.
    """

    def __init__(self, info: DistInfo):
        self.info = info
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._group = None

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\nrank {self.info.rank}: got {signal.Signals(signum).name}: stopping after this step with a "
                  "checkpoint", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            print("warning: not in the main thread: SIGTERM/SIGUSR1 will not checkpoint before stopping",
                  file=sys.stderr)
        if self.info.enabled:
            # a CPU group for the flag: an all-reduce on the (NCCL) default group would sync with the GPU
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def check(self) -> int | None:
        """The signal to stop on, agreed by every rank (collective when distributed), or None."""
        if not self.info.enabled:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None


WORKER_GRACE_S = 120  # how long a DataLoader worker outlives a SIGTERM (SLURM's KillWait is 30 s by default)


def ignore_stop_signals_in_worker() -> None:
    """For DataLoader worker processes. A scheduler signals every process of the job, but a worker that
    died would make the DataLoader raise in the main process in the middle of its last step or checkpoint.
    So SIGUSR1 is ignored, and so is the first SIGTERM, which arms a ``WORKER_GRACE_S`` alarm: the main
    process shuts the workers down before the deadline (``BatchStream.close``), and a worker stuck in a
    read still ends. A second SIGTERM (the DataLoader's own ``terminate()``) ends the worker at once."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    seen = []

    def on_term(signum, _frame):
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(WORKER_GRACE_S)

    signal.signal(signal.SIGTERM, on_term)
