"""Optional ``varlen_attention`` backends: thin adapters over other libraries' varlen attention.

  * ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (FlashAttention-2 CUDA kernels);
  * ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own FlashAttention path);
  * ``xformers``: ``xformers.ops.memory_efficient_attention`` with a ``BlockDiagonalMask``
    (``BlockDiagonalCausalFromBottomRightMask`` when causal).

Each states as data the devices, dtypes and head dims it takes; none takes ``key_bias``. Nothing is
imported until a backend is asked whether it is available or is run, so importing bus_kernels never
needs these packages; without the package or a suitable GPU each reports why it is unavailable.
Availability imports the package for real (once, cached): a wheel built for another torch or CUDA
fails with an undefined symbol at import, and must make its backend unavailable with that reason,
not crash the first call. ``torch_varlen`` also checks the installed ``varlen_attn`` signature (it
changed between torch releases) rather than failing with a TypeError at call time.

All three follow flash-attn's semantics (bottom-right causal alignment). Differences the adapters do
not paper over: xformers' bottom-right causal mask rejects a sequence with more queries than keys.
On CUDA they come before the Triton kernels in the preference list (mature CUDA kernels, expected to
be faster; not measured here), so ``backend=None`` picks them when installed and the inputs fit; only
the dense fast path ``sdpa`` (every sequence full length) comes before them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect

import torch

from .backends import Backend, add_preference, register_backend, register_impl
from .ops.varlen_attention import AttentionLimits, register_attention_limits

_OP = "varlen_attention"
_HALF = frozenset({torch.float16, torch.bfloat16})


def _cuda_reason(min_capability: tuple[int, int]) -> str | None:
    """Why CUDA cannot run a kernel needing ``min_capability`` here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < min_capability:
        return f"needs compute capability >= {min_capability[0]}.{min_capability[1]}, device has {capability[0]}.{capability[1]}"
    return None


@functools.lru_cache(maxsize=None)
def _package_reason(module: str, extra: str, entry: str) -> str | None:
    """Why ``module.entry`` cannot be used here (not installed, or its import fails), or None.

    The import is real and cached: a compiled extension built against another torch raises ImportError
    or OSError (undefined symbol), sometimes RuntimeError, only when imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return f"{module} cannot be located ({e})"
    if not found:
        return f"{module} is not installed (pip install 'bus-vlp[{extra}]')"
    path, _, attr = entry.rpartition(".")
    try:
        getattr(importlib.import_module(path), attr)
    except Exception as e:  # noqa: BLE001 - any failure of a broken wheel means: fall back
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"{module} is installed but {entry} fails to import ({type(e).__name__}: {first_line[:200]})"
    return None


# ---------------------------------------------------------------------------------------------
# flash_attn


def _flash_attn_availability(device_type: str) -> str | None:
    return _package_reason("flash_attn", "flash", "flash_attn.flash_attn_varlen_func") or _cuda_reason((8, 0))


def _flash_attn_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
    )


# ---------------------------------------------------------------------------------------------
# torch.nn.attention.varlen


def _torch_varlen_fn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def torch_varlen_signature_reason(fn) -> str | None:
    """Why the adapter cannot call this ``varlen_attn`` (its signature), or None.

    The adapter passes 7 positional arguments (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k), ``scale=`` and the causal mask as ``window_size=(-1, 0)``, FlashAttention's
    bottom-right aligned causal window. Older releases take no ``scale`` and only ``is_causal``, whose
    alignment for ``len_q != len_k`` is not documented: they are reported unavailable."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        return f"the signature of torch.nn.attention.varlen.varlen_attn cannot be read ({e})"
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [name for name in ("scale", "window_size") if name not in params]
    if len(positional) < 7 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        missing.append(f"7 positional arguments (has {len(positional)})")
    if missing:
        return f"torch {torch.__version__}: torch.nn.attention.varlen.varlen_attn lacks " + ", ".join(missing)
    return None


@functools.lru_cache(maxsize=None)
def _torch_varlen_reason() -> str | None:
    try:
        found = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"torch.nn.attention.varlen is not in torch {torch.__version__}"
    try:
        fn = _torch_varlen_fn()
    except Exception as e:  # noqa: BLE001
        return f"torch.nn.attention.varlen.varlen_attn fails to import ({type(e).__name__}: {e})"
    return torch_varlen_signature_reason(fn)


def _torch_varlen_availability(device_type: str) -> str | None:
    return _torch_varlen_reason() or _cuda_reason((8, 0))


def _torch_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    # window (-1, 0) is FlashAttention's causal mask, aligned bottom-right
    return _torch_varlen_fn()(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=softmax_scale, window_size=(-1, 0) if causal else (-1, -1),
    )


# ---------------------------------------------------------------------------------------------
# xformers


def _xformers_availability(device_type: str) -> str | None:
    return _package_reason("xformers", "xformers", "xformers.ops.memory_efficient_attention") or _cuda_reason((7, 0))


def _xformers_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    from xformers.ops import fmha

    seqlens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    mask_type = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    attn_bias = mask_type.from_seqlens(seqlens_q, seqlens_k)
    # xformers takes (batch, tokens, heads, dim): the packed tokens form one batch row
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=attn_bias, scale=softmax_scale)
    return out[0]


# ---------------------------------------------------------------------------------------------
# Registration: each adapter as data (backend, implementation, limits) and its place in the CUDA
# preference list, which starts as ["sdpa", "triton", "torch"] and becomes
# ["sdpa", "flash_attn", "torch_varlen", "triton", "xformers", "torch"] (sdpa takes dense batches only).

ADAPTERS = (
    (
        Backend(
            name="flash_attn",
            description="flash_attn.flash_attn_varlen_func (FlashAttention-2 CUDA), when installed",
            ops=frozenset({_OP}), devices=frozenset({"cuda"}), dtypes=_HALF,
            availability=_flash_attn_availability,
        ),
        _flash_attn_impl,
        AttentionLimits(1, 256, 1, key_bias=False),  # flash-attn pads other head dims to a multiple of 8 itself
        1,
    ),
    (
        Backend(
            name="torch_varlen",
            description="torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention), when present",
            ops=frozenset({_OP}), devices=frozenset({"cuda"}), dtypes=_HALF,
            availability=_torch_varlen_availability,
        ),
        _torch_varlen_impl,
        AttentionLimits(8, 256, 8, key_bias=False),
        2,
    ),
    (
        Backend(
            name="xformers",
            description="xformers memory_efficient_attention with a block-diagonal mask, when installed",
            ops=frozenset({_OP}), devices=frozenset({"cuda"}), dtypes=_HALF | {torch.float32},
            availability=_xformers_availability,
        ),
        _xformers_impl,
        AttentionLimits(1, None, 1, key_bias=False),
        4,
    ),
)

for _backend, _impl, _limits, _position in ADAPTERS:
    register_backend(_backend)
    register_impl(_OP, _backend.name, _impl)
    register_attention_limits(_backend.name, _limits)
    add_preference(_OP, "cuda", _backend.name, position=_position)
