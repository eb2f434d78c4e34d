"""Atomic training checkpoints with exact resume, and no unpickling of untrusted data.

Layout of a run directory ``OUT``::

    OUT/checkpoints/step_00000120/     one complete checkpoint per saved step
        config.json                    the model config   } ``BusModel.from_pretrained`` loads this
        model.safetensors              the weights        } directory as it is
        training_state.pt              optimizer + scheduler state, torch RNG states (tensors only)
        trainer_state.json             step, data position, Python/NumPy RNG states, run arguments
        tokenizer/                     the run's tokenizer (``save_pretrained``)
        checksums.json                 size and SHA-256 of every other file, written last

Atomicity: a checkpoint is written into a hidden temporary directory next to the final one; every file
is flushed and fsync'ed, the temporary directory is renamed to ``step_XXXXXXXX`` (``os.replace``, atomic
on POSIX) and the parent directory is fsync'ed. A process killed at any point therefore leaves either
the new complete checkpoint or none at all, and the previous checkpoints stay untouched; leftover
temporary directories are ignored and swept by the next save.

Integrity: a disk can still hand back a truncated or corrupted file later (a full disk during a copy,
a bad sector, a partial rsync). ``checksums.json`` records every file's size and SHA-256 at save time;
``verify_checkpoint`` checks them, and ``--resume`` takes the newest checkpoint that verifies, warning
about each newer one that does not (``latest_valid_checkpoint``), so garbage is never loaded. Hashing
reads every file once more on save and on resume: SHA-256 ran at 435 MiB/s on the project's 2-core CPU
(hashlib, 256 MiB buffer, shared machine), about 2.4 s per GB.

Safety: weights are safetensors; ``training_state.pt`` is read with ``torch.load(weights_only=True)``,
which accepts tensors and plain containers only; everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"
REQUIRED_FILES = ("config.json", "model.safetensors", TRAINING_STATE_FILE, TRAINER_STATE_FILE)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A checkpoint found on disk: ``path`` its directory, ``step`` the optimizer steps it holds."""

    path: Path
    step: int


def checkpoint_name(step: int) -> str:
    """``step_00000120`` for step 120 (zero-padded so names sort by step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first (temporary directories ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append(Checkpoint(entry, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from either a checkpoint directory or a run directory (its newest checkpoint
    that verifies, with a warning for each newer one that does not).

    Raises FileNotFoundError naming the path when neither holds a checkpoint."""
    p = Path(path)
    if (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        return p
    if latest_checkpoint(p) is None:
        raise FileNotFoundError(
            f"no checkpoint at {str(p)!r}: expected a checkpoint directory (config.json + model.safetensors) "
            f"or a run directory with {CHECKPOINT_DIR}/step_XXXXXXXX"
        )
    good, bad = latest_valid_checkpoint(p)  # a run directory: never its newest if that one is damaged
    if good is None:
        raise FileNotFoundError(f"no valid checkpoint in {str(p)!r}: "
                                + "; ".join(f"{c.path.name}: {why}" for c, why in bad))
    for c, why in bad:
        warnings.warn(f"skipping checkpoint {c.path}: {why}; using {good.path.name}", stacklevel=2)
    return good.path


# --------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: (tensors for ``training_state.pt``, JSON-able Python/NumPy states)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def restore_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------------------------- write
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rank_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    tokenizer=None,
    keep: int | None = 2,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` of a run atomically; returns its directory.

    Args:
        run_dir: the run's output directory (``--out``).
        step: optimizer steps done (int >= 0).
        model: a ``BusModel`` (unwrapped from DDP); saved with ``save_pretrained`` (safetensors + JSON).
        optimizer_state, scheduler_state: their ``state_dict()`` -> ``training_state.pt``.
        trainer_state: JSON-able dict (step, data position, arguments, ...) -> ``trainer_state.json``.
        rank_rng: one ``capture_rng_state()`` per data-parallel rank, in rank order.
        tokenizer: a ``transformers`` tokenizer saved into ``tokenizer/``, or None.
        keep: keep this many newest checkpoints, delete older ones (None: keep all).
        model_state: the full state dict to write instead of ``model.state_dict()`` (FSDP: the
            gathered unsharded weights); ``model`` then only provides the config.
    """
    name = checkpoint_name(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(root)
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        if model_state is None:
            model.save_pretrained(tmp)
        else:
            _save_weights(tmp, model, model_state)
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler_state,
                "rng": [tensors for tensors, _plain in rank_rng],
            },
            tmp / TRAINING_STATE_FILE,
        )
        state = dict(trainer_state, step=step, rng=[plain for _tensors, plain in rank_rng])
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(_checksums(tmp), indent=1))
        _fsync_tree(tmp)
        final = root / name
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``directory`` (but the checksums file)."""
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if rel != CHECKSUMS_FILE:
                out[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return dict(sorted(out.items()))


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``checkpoint_dir`` cannot be trusted, or None when every file it lists in
    ``checksums.json`` is there with its recorded size and SHA-256 (and the files a resume needs are
    among them)."""
    path = Path(checkpoint_dir)
    try:
        listed = json.loads((path / CHECKSUMS_FILE).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS_FILE} (incomplete, or written before checkpoints were checksummed)"
    except (OSError, ValueError) as err:
        return f"unreadable {CHECKSUMS_FILE} ({err.__class__.__name__}: {err})"
    if not isinstance(listed, dict):
        return f"malformed {CHECKSUMS_FILE}"
    for name in REQUIRED_FILES:
        if name not in listed:
            return f"{CHECKSUMS_FILE} does not list {name}"
    for name, want in listed.items():
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size') if isinstance(want, dict) else '?'} were written"
        if _sha256(f) != want.get("sha256"):
            return f"{name} is corrupt (SHA-256 differs from the one written)"
    return None


def latest_valid_checkpoint(run_dir: str | os.PathLike) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """(the newest checkpoint that ``verify_checkpoint`` accepts or None, [(newer bad checkpoint, why)])."""
    bad = []
    for found in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(found.path)
        if reason is None:
            return found, bad
        bad.append((found, reason))
    return None, bad


def _save_weights(directory: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``save_pretrained``'s files (config.json, model.safetensors) from an explicit state dict."""
    from safetensors.torch import save_file

    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "bus_model": model.config.name})


def _sweep_temporaries(root: Path) -> None:
    """Remove temporary directories that a killed process left behind."""
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------------------------- read
@dataclass
class LoadedState:
    """What ``load_training_state`` returns: ``trainer_state`` (the JSON dict), ``optimizer`` and
    ``scheduler`` state dicts, ``rng`` one ``(tensors, plain)`` pair per rank."""

    trainer_state: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]


def load_model_weights(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (strict: every key must match)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    model.load_state_dict(load_file(str(path)), strict=True)


def load_training_state(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedState:
    """Read ``training_state.pt`` (``weights_only=True``: tensors and containers, no arbitrary objects)
    and ``trainer_state.json`` of a checkpoint."""
    path = Path(checkpoint_dir)
    for f in (TRAINING_STATE_FILE, TRAINER_STATE_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} lacks {f}")
    blob = torch.load(path / TRAINING_STATE_FILE, map_location=map_location, weights_only=True)
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    plain = state.pop("rng")
    if len(plain) != len(blob["rng"]):
        raise ValueError(f"checkpoint {str(path)!r} is inconsistent: {len(blob['rng'])} torch RNG states, {len(plain)} others")
    return LoadedState(state, blob["optimizer"], blob["scheduler"], list(zip(blob["rng"], plain)))
