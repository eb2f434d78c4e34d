"""Momentum distillation and the ITC feature queue (ALBEF, Li et al. NeurIPS 2021, §3.2 and §3.3; mPLUG,
on which BUS builds, uses the same).

A momentum model, an exponential moving average (EMA) of the online towers with momentum ``m``
(0.995), produces two things without gradients:

* ITC features of the batch, which go into FIFO queues of ``K`` image and ``K`` text features, so
  every image is contrasted with ``B + K`` texts (and every text with ``B + K`` images) instead of B;
* soft pseudo-targets: ``alpha * softmax(momentum similarities)`` mixed with the one-hot ITC targets,
  and ``alpha * softmax(momentum MLM logits)`` mixed with the MLM labels. ``alpha`` (0.4) ramps up
  linearly over the first ``alpha_ramp_steps`` training steps, as ALBEF ramps it over its first epoch.

The momentum vision tower never uses text: it selects with its policy's text-free behaviour
(``selection.text_free``: BUS -> the image [CLS], as EViT; ELIP -> no pruning, as ELIP's momentum ViT,
which its official code builds without pruning). Its features then go into the queue and are compared
with every other caption, so they must not depend on their own. It also runs in eval mode, so
``random`` drops nothing in it (unless ``random_at_eval``).

Everything here is module state (parameters with ``requires_grad=False`` and buffers), so run
checkpoints and ``save_pretrained`` hold it and ``--resume`` continues bit for bit.

When the EMA step runs: ALBEF takes it at the start of every training forward, with the weights of
that moment; a bare ``BusModel`` does the same (with gradient accumulation: once per micro-batch).
``bus train`` instead calls ``attach_to_optimizer``, which takes it right after every optimizer step:
the same sequence of momentum weights, once per optimizer step, and with the parameters at rest, which
FSDP2 needs (inside its forward the root's parameters are temporary unsharded copies). The first EMA
step copies the online weights, so weights loaded or re-initialised before training are the start.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bus_kernels._validation import is_number

# online module names the momentum model mirrors (BusModel attributes); None entries are skipped
MOMENTUM_PARTS = ("vision", "pad", "text_encoder", "fusion", "mlm_head", "vision_proj", "text_proj")


class MomentumModel(nn.Module):
    """EMA copies of a ``BusModel``'s towers and projections, always in eval mode, never trained.

    Buffers: ``initialized`` () bool, ``step`` () int64 training forwards so far (drives alpha's ramp).
    """

    def __init__(self, online: nn.Module, momentum: float):
        super().__init__()
        if not is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"losses.momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.parts = [name for name in MOMENTUM_PARTS if getattr(online, name, None) is not None]
        for name in self.parts:
            module = copy.deepcopy(getattr(online, name))
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, name, module)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.update_in_forward = True  # False once attach_to_optimizer took over
        super().train(False)

    def train(self, mode: bool = True) -> "MomentumModel":
        return super().train(False)  # targets come from the deterministic (eval) model

    def _pairs(self, online: nn.Module):
        for name in self.parts:
            yield from zip(getattr(online, name).parameters(), getattr(self, name).parameters())

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One EMA step ``p_m <- p_m + (1 - m) (p - p_m)``, counted in ``step``; before the first one the
        online weights are copied (``m`` is taken as 0 then, read from a buffer: no host sync)."""
        self._lerp(online, 1.0 - self.momentum * self.initialized.float())  # () weight 1: a copy
        self.step.add_(1)

    @torch.no_grad()
    def copy_from(self, online: nn.Module) -> None:
        """Start from the online weights (not counted as a step)."""
        self._lerp(online, torch.ones((), device=self.step.device))

    def _lerp(self, online: nn.Module, weight: torch.Tensor) -> None:
        # FSDP2 at rest: online and momentum towers are sharded alike (same module structure), the local shards pair up
        pairs = [(_local(p.detach()), _local(p_m)) for p, p_m in self._pairs(online)]
        # a weight tensor per pair: the single-tensor-weight overload reads it on the host (.item())
        torch._foreach_lerp_([p_m for _, p_m in pairs], [p for p, _ in pairs], [weight] * len(pairs))
        self.initialized.fill_(True)


def attach_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``model``'s EMA step follow every ``optimizer.step()`` instead of running in the forward
    (see the module docstring). The momentum model starts from the current weights unless it already
    holds some (a resumed run). No-op for a model without momentum distillation."""
    mm = getattr(model, "momentum_model", None)
    if mm is None:
        return
    if not bool(mm.initialized):  # one host read, at setup
        mm.copy_from(model)
    mm.update_in_forward = False
    optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: mm.update(model))


class FeatureQueue(nn.Module):
    """FIFO queues of normalised ITC features: ``image (K, E)``, ``text (K, E)`` float32, ``ptr`` () int64.

    Initialised with random unit vectors (as ALBEF). ``enqueue`` writes the features of the whole
    global batch (all-gathered over the ranks), so every rank holds the same queue; ``K`` must be a
    multiple of the global batch, so a batch never wraps around the end."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"losses.queue_size must be an int >= 1, got {size!r}")
        self.size = size
        self.register_buffer("image", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("text", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """image_feat, text_feat ``(B, E)`` of this rank -> the global batch replaces the oldest entries."""
        image_feat, text_feat = gather_all_ranks(image_feat), gather_all_ranks(text_feat)
        n = image_feat.shape[0]
        if self.size % n:
            raise ValueError(
                f"losses.queue_size ({self.size}) must be divisible by the global batch size ({n}: batch x ranks)"
            )
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # no host read of ptr
        self.image.index_copy_(0, rows, image_feat.float())
        self.text.index_copy_(0, rows, text_feat.float())
        self.ptr.copy_((self.ptr + n) % self.size)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def gather_all_ranks(t: torch.Tensor) -> torch.Tensor:
    """``(B, E)`` of every rank concatenated in rank order ``(world * B, E)``; ``t`` itself without
    an initialised process group (no gradient: the features are momentum features)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


def ramped_alpha(alpha: float, step: torch.Tensor, ramp_steps: int) -> torch.Tensor:
    """ALBEF's ramp: ``alpha * min(1, step / ramp_steps)`` as a () float32 tensor (no host read)."""
    if ramp_steps <= 0:
        return torch.full((), alpha, dtype=torch.float32, device=step.device)
    return alpha * (step.float() / ramp_steps).clamp(max=1.0)


def soft_itc_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
    image_m: torch.Tensor, text_m: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor,
) -> torch.Tensor:
    """ITC against the momentum features and the queue, with ALBEF's soft targets.

    Args:
        image_feat, text_feat: ``(B, E)`` online, normalised. image_m, text_m: ``(B, E)`` momentum, normalised.
        image_all, text_all: ``(B + K, E)`` the momentum features of the batch, then the queue.
        scale: () ``1 / temperature``. alpha: () weight of the momentum distribution in the targets.
    Returns:
        () ``(CE(i2t) + CE(t2i)) / 2`` with targets ``alpha * softmax(momentum sims) + (1 - alpha) * one-hot``.
    """
    sim_i2t = scale * image_feat.float() @ text_all.float().t()  # (B, B + K)
    sim_t2i = scale * text_feat.float() @ image_all.float().t()
    with torch.no_grad():
        B = image_feat.shape[0]
        hard = torch.zeros_like(sim_i2t)
        hard[:, :B] = torch.eye(B, device=hard.device, dtype=hard.dtype)  # the positive: its own pair
        target_i2t = alpha * (scale * image_m.float() @ text_all.float().t()).softmax(1) + (1 - alpha) * hard
        target_t2i = alpha * (scale * text_m.float() @ image_all.float().t()).softmax(1) + (1 - alpha) * hard
    loss_i2t = -(sim_i2t.log_softmax(1) * target_i2t).sum(1).mean()
    loss_t2i = -(sim_t2i.log_softmax(1) * target_t2i).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def distilled_mlm_loss(logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """MLM with ALBEF's soft labels: ``(1 - alpha) * CE(labels) + alpha * CE(softmax(momentum logits))``,
    averaged over the predicted positions.

    logits, logits_m: ``(N, V)``; labels ``(N,)`` int64 with -100 at positions that predict nothing."""
    valid = (labels != -100).float()
    logp = logits.float().log_softmax(-1)
    hard = -logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)  # (N,)
    soft = -(logp * logits_m.float().softmax(-1)).sum(-1)  # (N,)
    per = (1 - alpha) * hard + alpha * soft
    return (per * valid).sum() / valid.sum().clamp_min(1.0)
