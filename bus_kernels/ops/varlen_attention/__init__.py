"""Variable-length (packed) attention, FlashAttention-2 style, forward and backward in Triton.

Every attention of the BUS stack runs on packed sequences: after TSPS (Sec. 3.2) each image keeps its
own number of tokens, the PAD queries (Sec. 3.3) cross-attend to those kept tokens, and each caption
has its own length. The layout and semantics are flash-attn's ``flash_attn_varlen_func``
(Dao, "FlashAttention-2", 2023, Sec. 3.1 forward, Algorithm 2 backward):
``q (total_q, H, D)``, ``k, v (total_k, H, D)``, sequence b at rows ``cu_seqlens[b]:cu_seqlens[b+1]``;
the causal mask is aligned bottom-right (query i of a length-Lq sequence sees key j iff
``j <= i + Lk - Lq``), a query row that sees no key outputs zeros, zero-length sequences are allowed.

Optional ``key_bias (total_k,) float32`` is added to every score of its key, in natural-log units:
with ``key_bias = log(n_j)`` for a token that stands for ``n_j`` merged patches this is ToMe's
"proportional attention" (Bolya et al., 2023, Sec. 3). It gets a gradient like any input.

Triton path (programs never touch a padded row):
  * a block table, built on the device from ``cu_seqlens`` with no host sync, lists the (sequence,
    block start) pairs of every real block; programs run over (table entry, head);
  * ``_attn_fwd_kernel``: one query block x one head, online softmax in fp32 (exp2 domain), saves the
    base-2 log-sum-exp ``lse (H, total_q)`` (+inf for a row with no visible key);
  * backward: ``_attn_bwd_delta_kernel`` (rowsum(dO * O)), ``_attn_bwd_dkdv_kernel`` (one key block x
    head, loops over the query blocks that see it; also the key_bias gradient per head) and
    ``_attn_bwd_dq_kernel`` (one query block x head). Every output element is written by exactly one
    program: no atomics.
Head dims 1..256 of any size (80, 96, ...) run by masking the head dim to ``BLOCK_D = max(16, next_pow2(D))``.

Dense batches (every sequence full length, e.g. a ViT before pruning) skip all of this: ``backend=None``
runs them as PyTorch SDPA on a ``(B, S, H, D)`` view (backend ``sdpa``, ``dense.py``).

Files: ``kernel_fwd.py`` / ``kernel_bwd.py`` (Triton kernels; ``kernel_common.py``: the ``@triton.jit``
helpers they share), ``tiles.py`` (tile configs and the block table), ``launch.py`` (custom ops,
autograd, backend registration), ``dense.py`` (the SDPA fast path), ``limits.py`` (head dims and
features per backend), ``api.py`` (the public function), ``aot.py`` (ahead-of-time variants).
"""

from .aot import aot_specs
from .api import varlen_attention
from .limits import (
    ATTENTION_LIMITS,
    TRITON_MAX_HEAD_DIM,
    TRITON_MIN_HEAD_DIM,
    AttentionLimits,
    register_attention_limits,
)

__all__ = [
    "ATTENTION_LIMITS",
    "TRITON_MAX_HEAD_DIM",
    "TRITON_MIN_HEAD_DIM",
    "AttentionLimits",
    "aot_specs",
    "register_attention_limits",
    "varlen_attention",
]
