"""Declarative backends and the dispatcher every public op goes through.

Each backend states, as data, which ops, devices and dtypes it takes and whether it has a backward
(the xformers ``ops/fmha/dispatch.py`` idea). ``select_backend`` walks an op's preference list for
the inputs' device and returns the first backend with no objection; when none fits, or when the
requested one cannot take the inputs, the error lists every rejected backend and why.

Choosing a backend:
  * ``backend="name"`` on the call: that backend or a ``BackendNotSupportedError``;
  * else the environment variable ``BUS_KERNELS_BACKEND`` (for the ops that backend implements);
  * else the first backend of the op's preference list for the device that accepts the inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import torch

from ._env import getenv

ENV_VAR = "BUS_KERNELS_BACKEND"

# Read once, when bus_kernels is imported: Triton decides at kernel-definition time whether
# kernels run on the GPU or in its CPU interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendNotSupportedError(ValueError):
    """No backend (or not the requested one) can run an op on the given inputs."""


@dataclass(frozen=True)
class Backend:
    """What a backend supports, stated as data.

    ``availability(device_type) -> reason | None`` says why the backend cannot run on that device
    type here (package missing, no GPU, extension not built), or ``None`` when it can.
    """

    name: str
    description: str
    ops: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    supports_backward: bool = True
    availability: Callable[[str], str | None] = field(default=lambda device_type: None, compare=False)

    def not_supported_reasons(
        self, op: str, device_type: str, dtype: torch.dtype, requires_grad: bool
    ) -> list[str]:
        """Every reason this backend cannot run ``op`` on such inputs (empty list: it can)."""
        reasons = []
        if op not in self.ops:
            reasons.append(f"does not implement {op}")
        if device_type not in self.devices:
            reasons.append(f"device {device_type} not supported (supports {', '.join(sorted(self.devices))})")
        else:
            why = self.availability(device_type)
            if why is not None:
                reasons.append(why)
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not supported")
        if requires_grad and not self.supports_backward:
            reasons.append("has no backward, but an input requires grad")
        return reasons


_BACKENDS: dict[str, Backend] = {}
# op -> device type -> backend names, most preferred first
_PREFERENCE: dict[str, dict[str, list[str]]] = {}


def _env_backend() -> str | None:
    """``BUS_KERNELS_BACKEND`` (None when unset or empty), read on every call so that a change is seen at once."""
    return getenv(ENV_VAR) or None


# Successful choices of select_backend, by everything they depend on; cleared whenever the registry changes.
_CHOSEN: dict[tuple, str] = {}


def forget_choices() -> None:
    """Drop the cached backend choices (the registry, a backend's availability or an op's limits changed)."""
    _CHOSEN.clear()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend
    forget_choices()


def register_op(op: str, preference: Mapping[str, Sequence[str]]) -> None:
    """Declare an op and, per device type, the backends to try in order."""
    _PREFERENCE[op] = {dev: list(names) for dev, names in preference.items()}
    forget_choices()


def add_preference(op: str, device_type: str, name: str, position: int = 0) -> None:
    """Insert backend ``name`` into ``op``'s preference list for ``device_type`` (used by optional backends)."""
    names = _PREFERENCE.setdefault(op, {}).setdefault(device_type, [])
    if name in names:
        names.remove(name)
    names.insert(position, name)
    forget_choices()


_IMPLS: dict[tuple[str, str], Callable] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (same arguments as the op, minus ``backend``)."""
    _IMPLS[(op, backend)] = fn


def get_impl(op: str, backend: str) -> Callable:
    return _IMPLS[(op, backend)]


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]


def select_backend(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    requires_grad: bool,
    backend: str | None = None,
    extra_reasons: Callable[[str], list[str]] | None = None,
    extra_key: Hashable | None = None,
) -> str:
    """Name of the backend that runs ``op`` on inputs of this device/dtype.

    ``extra_reasons(backend_name) -> list[str]`` lets an op add its own constraints (e.g. head dims).
    ``extra_key``: a value that determines everything ``extra_reasons`` answers (e.g. ``D > 256``); given,
    the choice is cached under it (and the device, dtype, grad, requested backend and environment):
    the walk over the preference list runs once per such signature, not on every call (issue 23's host
    time). Without it (and ``extra_reasons`` given) nothing is cached. Errors are never cached.
    Raises ``BackendNotSupportedError`` listing each rejected backend and why.
    """
    env = _env_backend()
    key = None
    if (extra_key is not None or extra_reasons is None) and (backend is None or isinstance(backend, str)):
        key = (op, device, dtype, requires_grad, backend, env, extra_key)
        chosen = _CHOSEN.get(key)
        if chosen is not None:
            return chosen
    name = _select(op, device, dtype, requires_grad, backend, env, extra_reasons)
    if key is not None:
        _CHOSEN[key] = name
    return name


def _select(op, device, dtype, requires_grad, backend, env, extra_reasons) -> str:

    def reasons_for(name: str) -> list[str]:
        reasons = _BACKENDS[name].not_supported_reasons(op, device.type, dtype, requires_grad)
        if extra_reasons is not None and not reasons:
            reasons += extra_reasons(name)
        return reasons

    if backend is None:
        if env is not None:
            get_backend(env)  # an unknown name in the environment is an error too
            if op in _BACKENDS[env].ops:
                backend = env
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        get_backend(backend)
        reasons = reasons_for(backend)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {backend!r} cannot run {op} on {device.type} {dtype}"
                f"{' with grad' if requires_grad else ''}: " + "; ".join(reasons)
            )
        return backend

    rejected = []
    for name in _PREFERENCE[op].get(device.type, []):
        reasons = reasons_for(name)
        if not reasons:
            return name
        rejected.append(f"  {name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(
        f"no backend can run {op} on {device.type} {dtype}{' with grad' if requires_grad else ''}:\n"
        + "\n".join(rejected or ["  (no backend registered for this device)"])
    )


def backend_status(device_type: str) -> dict[str, str | None]:
    """For each registered backend: ``None`` if it runs on ``device_type`` here, else the reason it does not."""
    status = {}
    for name, b in _BACKENDS.items():
        if device_type not in b.devices:
            status[name] = f"device {device_type} not supported"
        else:
            status[name] = b.availability(device_type)
    return status


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run here on ``device`` (default: ``cuda`` if present, else ``cpu``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [name for name, why in backend_status(device_type).items() if why is None]


def registered_backends() -> dict[str, Backend]:
    """name -> Backend, in registration order (a copy)."""
    return dict(_BACKENDS)


def registered_ops() -> dict[str, dict[str, list[str]]]:
    """op -> device type -> preference list (a copy)."""
    return {op: {d: list(n) for d, n in prefs.items()} for op, prefs in _PREFERENCE.items()}


# ---------------------------------------------------------------------------------------------
# The built-in backends. Optional ones (native, flash_attn, xformers, torch_varlen) register
# themselves from their own modules.


def _triton_availability(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a core dependency on Linux
        return f"triton is not installed ({e})"
    if device_type == "cuda":
        if TRITON_INTERPRET:
            return "TRITON_INTERPRET=1 was set when bus_kernels was imported: kernels run in the CPU interpreter"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    if not TRITON_INTERPRET:
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing bus_kernels)"
    return None


def _torch_availability(device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


PRUNING_OPS = frozenset({"text_patch_scores", "topk_gather"})
ATTENTION_OPS = frozenset({"varlen_attention"})

register_backend(
    Backend(
        name="torch",
        description="pure PyTorch reference (bus_kernels.reference); differentiable by autograd",
        ops=PRUNING_OPS | ATTENTION_OPS,
        # meta: shape-only runs, e.g. counting FLOPs of a paper-scale model without computing it
        devices=frozenset({"cpu", "cuda", "meta"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        availability=_torch_availability,
    )
)
register_backend(
    Backend(
        name="triton",
        description="fused Triton kernels (forward and backward); CPU only through the Triton interpreter",
        ops=PRUNING_OPS | ATTENTION_OPS,
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        availability=_triton_availability,
    )
)

register_backend(
    Backend(
        name="sdpa",
        description="dense batches only (every sequence full length: total == B * max_seqlen for q and k): "
        "torch scaled_dot_product_attention on a (B, S, H, D) view of the packed tensors, no copy",
        ops=ATTENTION_OPS,
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        availability=_torch_availability,
    )
)

for _op in PRUNING_OPS:
    # On CPU the interpreter is for testing, never the default.
    register_op(_op, {"cuda": ["triton", "torch"], "cpu": ["torch", "triton"], "meta": ["torch"]})
# A dense batch goes to SDPA first (it rejects ragged ones, with the reason, at no host cost).
register_op("varlen_attention", {"cuda": ["sdpa", "triton", "torch"], "cpu": ["sdpa", "torch", "triton"],
                                 "meta": ["torch"]})
