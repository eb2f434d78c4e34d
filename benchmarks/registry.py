"""The benchmarks of ``bus bench``, by subcommand name (ARCHITECTURE.md, "Adding a benchmark").

A benchmark module defines ``add_arguments(parser)``, ``main_from_args(args) -> int`` and, when its
results go into the README, ``render(result) -> str``. Both ``cli`` (the ``bus bench`` parser) and
``readme_results`` read this table; the benchmark modules never import either of them.
"""

from __future__ import annotations

from . import flops, kernels, overhead, patch_effect, quality, scaling, train_speed

BENCHMARKS = {
    "train": train_speed,  # the main job: BUS vs baseline training speed
    "flops": flops,
    "scaling": scaling,
    "kernels": kernels,
    "patch": patch_effect,  # bus_kernels.patch on timm ViTs: tokens per layer, FLOPs, step time
    "quality": quality,  # accuracy vs training time of every selection policy (issue 12)
    "overhead": overhead,  # host cost per training step and per bus_kernels call, on CPU (issues 22, 23)
}
