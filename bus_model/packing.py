"""Packing the valid tokens of masked rows (flash-attn varlen layout) without avoidable host syncs.

``packing(mask)`` turns a ``(B, S)`` bool mask into the flat row indices, ``cu_seqlens`` and
``max_seqlen`` that ``bus_kernels.varlen_attention`` takes. The packed size must reach the host (it
sizes the packed tensors), which on a GPU is a sync that stalls the CPU's queueing of kernels; so each
mask object is packed once while it lives (every block of a ViT stage and every BERT stack that sees
the same mask reuses it), and a caller that already knows the sizes on the host (a selection step
knows them from the shapes of ``topk_gather_varlen``'s output) registers them, so that no read is needed.

Under ``torch.compile`` the cache is bypassed (it never hits and stores nothing): it is keyed by
Python object identity and the tensor's version counter, which dynamo cannot trace without a graph
break, and a traced tensor must not outlive its graph. A compiled graph computes each mask inside
itself; the repeats are a few cheap elementwise ops that inductor fuses.
"""

from __future__ import annotations

import weakref

import torch


def is_concrete(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (FLOP counting, tracing), whose values cannot be read."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


class _PackingCache:
    """Packings of live mask tensors, so a mask is packed (and its lengths read on the host) once.

    Keyed by the mask object (a weak reference: an entry dies with its mask) and its version counter
    (an in-place change invalidates it). ``host_lengths`` holds per-mask ``(total, max_len)`` that a
    caller already knows on the host (e.g. from the shapes of a ``topk_gather_varlen`` result), so that
    packing that mask needs no host read at all.
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def _forget(self, key: int):
        return lambda _ref: self._entries.pop(key, None)

    @staticmethod
    def _version(mask: torch.Tensor) -> int:
        try:
            return mask._version
        except RuntimeError:  # inference tensors have no version counter (and cannot be changed in place)
            return -1

    def get(self, mask: torch.Tensor, what: str):
        if torch.compiler.is_compiling():  # identity and _version cannot be traced: no cache in a graph
            return None
        entry = self._entries.get(id(mask))
        if entry is None or entry[0]() is not mask or entry[1] != self._version(mask):
            return None
        return entry[2].get(what)

    def put(self, mask: torch.Tensor, what: str, value) -> None:
        if torch.compiler.is_compiling():  # never keep a traced value past its graph
            return
        entry = self._entries.get(id(mask))
        if entry is None or entry[0]() is not mask or entry[1] != self._version(mask):
            entry = (weakref.ref(mask, self._forget(id(mask))), self._version(mask), {})
            self._entries[id(mask)] = entry
        entry[2][what] = value


_CACHE = _PackingCache()
_DENSE_CU: dict[tuple, torch.Tensor] = {}  # (B, S, device) -> (B + 1,) int32 offsets of full rows


def memo(owner: torch.Tensor, what: str, make):
    """``make()``, computed once per live ``owner`` tensor (and ``what``): later calls with the same
    tensor object return the first result. The result must not hold ``owner`` itself. While
    ``torch.compile`` traces, ``make()`` runs every time (the cache is bypassed, see the module docstring)."""
    value = _CACHE.get(owner, what)
    if value is None:
        value = make()
        _CACHE.put(owner, what, value)
    return value


def register_host_lengths(mask: torch.Tensor, total: int, max_len: int) -> None:
    """Tell ``packing`` the number of set entries of ``mask`` (B, S) and the longest row, known on the
    host without reading the device: packing ``mask`` then needs no host sync."""
    _CACHE.put(mask, "host", (int(total), int(max_len)))


def known_lengths(mask: torch.Tensor) -> tuple[int, int] | None:
    """The ``(total, max_len)`` of ``mask`` if the host already knows them (registered, or packed), else None."""
    host = _CACHE.get(mask, "host")
    if host is None:
        packed = _CACHE.get(mask, "packing")
        host = None if packed is None else (packed[0].shape[0] if packed[0] is not None else mask.numel(), packed[2])
    return host


def prepack(*masks: torch.Tensor | None) -> None:
    """Read the packed sizes of several masks in one host read (instead of one read per mask when each
    is first packed): for masks whose sizes are needed later in the same step."""
    todo = [m for m in masks if m is not None and is_concrete(m) and m.shape[0] > 0
            and _CACHE.get(m, "host") is None and _CACHE.get(m, "packing") is None]
    if not todo:
        return
    stats = torch.stack([torch.stack([m.sum(), m.sum(dim=1).max()]) for m in todo]).tolist()  # the one read
    for m, (total, max_len) in zip(todo, stats):
        register_host_lengths(m, total, max_len)


def packing(mask: torch.Tensor | None, batch: int, seqlen: int, device: torch.device):
    """mask (B, S) bool (None: all valid) -> (flat indices (total,) int64 of the valid tokens in the
    (B * S) rows, row-major, or None when every token is valid (no gather needed); cu_seqlens (B + 1,)
    int32; max_seqlen int).

    A mask is packed once while it lives (every stack and block that sees the same mask object reuses
    the result) with at most one host read (its total and longest row; none after
    ``register_host_lengths``). The flat indices come from a stable sort, not ``nonzero``, so their
    count is the only value the host needs.
    """
    if mask is None:  # dense rows: one offsets tensor per shape, so attention's block table is cached too
        key = (batch, seqlen, torch.device(device))
        cu = _DENSE_CU.get(key)
        if cu is None:
            cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)  # (B + 1,)
            if is_concrete(cu) and not torch.compiler.is_compiling():  # never keep a fake or traced tensor
                _DENSE_CU[key] = cu
        return None, cu, seqlen
    if not is_concrete(mask):  # meta / fake tensors: shapes only
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        return mask.reshape(-1).nonzero().squeeze(1), cu, seqlen
    cached = _CACHE.get(mask, "packing")
    if cached is not None:
        return cached
    lengths = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.cumsum(0)
    host = _CACHE.get(mask, "host")
    if host is None:
        host = (0, 0) if batch == 0 else tuple(torch.stack([cu[-1], lengths.max()]).tolist())  # the one host read
    total, max_len = host
    # valid positions first, in row-major order (a stable sort of "is padding"), then keep `total` of them
    flat = torch.sort((~mask).reshape(-1).to(torch.uint8), stable=True).indices[:total]
    result = (flat, cu, max_len)
    _CACHE.put(mask, "packing", result)
    return result


def gather_rows(x: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
    """x (B * S, ...) -> the packed rows ``x[flat]`` (x itself when ``flat`` is None: dense rows)."""
    return x if flat is None else x.index_select(0, flat)


def scatter_rows(packed: torch.Tensor, flat: torch.Tensor | None, rows: int) -> torch.Tensor:
    """packed (total, ...) -> (rows, ...) with the packed rows at ``flat`` and zeros elsewhere (inverse of
    ``gather_rows``; ``packed`` itself when ``flat`` is None)."""
    if flat is None:
        return packed
    return packed.new_zeros(rows, *packed.shape[1:]).index_copy(0, flat, packed)
