"""Setup shared by the benchmarks that train (``bus bench train``, ``--gpu-suite``, ``quality``, ``selftest``,
``overhead``): seeded models sized for the synthetic tokenizer, deterministic synthetic batches, and
the training step (forward, backward, fused AdamW; optionally compiled as ``bus train --compile``)."""

from __future__ import annotations

import torch

from .harness import count_flops


class SyntheticBatches:
    """Batch ``i`` of the embedded synthetic data as the model's input tuple
    ``(images, input_ids, attention_mask, patch_labels)`` on ``device`` (deterministic in ``(seed, i)``)."""

    def __init__(self, config, tokenizer, batch_size: int, seed: int, device: torch.device, split: str = "train",
                 pad_to_max_length: bool = False):
        from bus_model.data import Collator, SyntheticDataset

        v = config.vision
        self.batch_size, self.device, self.tokenizer = batch_size, device, tokenizer
        self.dataset = SyntheticDataset(10**9, seed=seed, split=split, image_size=v.image_size, patch_size=v.patch_size)
        self.collate = Collator(tokenizer, image_size=v.image_size, patch_size=v.patch_size, max_length=config.max_text_len,
                                pad_to_max_length=pad_to_max_length)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        batch = self.collate([self.dataset[j] for j in range(i * self.batch_size, (i + 1) * self.batch_size)])
        labels = batch["patch_labels"].masked_fill(~batch["has_patch_labels"][:, None], -1.0)  # -1: no labels
        return tuple(t.to(self.device) for t in (batch["images"], batch["input_ids"], batch["attention_mask"], labels))


def build_model_and_data(name: str, batch_size: int, seed: int, image_size: int | None, device: torch.device,
                         config_overrides: dict | None = None, pad_to_max_length: bool = False):
    """A model sized for the synthetic tokenizer (seeded init) and its ``SyntheticBatches``;
    ``config_overrides`` (flat ``section__field`` keys) change the named config; ``pad_to_max_length``:
    every batch's captions padded to ``max_text_len`` (static shapes, for a compiled step)."""
    from bus_model import create_model, get_config
    from bus_model.data import build_synthetic_tokenizer
    from bus_model.data.tokenizer import text_config_overrides

    overrides = dict(config_overrides or {})
    if image_size is not None:
        overrides["vision"] = {"image_size": image_size}
    config = get_config(name, **overrides)
    tokenizer = build_synthetic_tokenizer(model_max_length=config.max_text_len)
    overrides["text"] = text_config_overrides(tokenizer)
    torch.manual_seed(seed)
    model = create_model(name, **overrides).to(device)
    return model, SyntheticBatches(model.config, tokenizer, batch_size, seed, device, pad_to_max_length=pad_to_max_length)


def make_step(model, lr: float, amp: bool, device: torch.device, compile: str = "none", backend: str = "inductor"):
    """A closure running one training step (forward, backward, AdamW) on a batch tuple. ``compile``: a
    ``torch.compile`` mode; the model's forward (and backward) is then compiled in place, as ``bus train
    --compile`` does, at the first step; the optimizer stays eager."""
    from bus_model.training.compile import check_compile_config, compile_model, step_begin

    check_compile_config(model.config, compile)
    compile_model(model, compile, backend)
    # the fused AdamW kernel (CPU and CUDA) is ~10x faster than the per-tensor loop on CPU: without it the
    # optimizer, whose cost is the same for both models, dominates a CPU step and hides the model's cost
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step(batch):
        step_begin(compile, backend, device)  # CUDA graphs: the previous step's outputs are dead
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(*batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def training_flops_per_sample(model, batch) -> float:
    """FLOPs of forward + backward on ``batch``, divided by its size (the optimizer update is not counted).
    Counted on the eager forward (``model.forward``: also for a model compiled in place), whose math the
    compiled step repeats."""
    def fwd_bwd():
        model.forward(*batch).loss.backward()

    flops = count_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return flops / batch[0].shape[0]
