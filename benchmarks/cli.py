"""``bus bench <name>``: the benchmark subcommands (``bus`` is bus_model.cli; this is its bench group)."""

from __future__ import annotations

import argparse
import sys

from . import flops, kernels, patch_effect, scaling, train_speed

BENCHMARKS = {
    "train": train_speed,  # the main job: BUS vs baseline training speed
    "flops": flops,
    "scaling": scaling,
    "kernels": kernels,
    "patch": patch_effect,  # bus_kernels.patch on timm ViTs: tokens per layer, FLOPs, step time
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="bus bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0].split(": ", 1)[-1],
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def run_args(args: argparse.Namespace) -> int:
    return BENCHMARKS[args.benchmark].main_from_args(args)


def main(argv: list[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
