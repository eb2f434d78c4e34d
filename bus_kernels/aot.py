"""Compile every Triton kernel of the package ahead of time for real GPUs, with no GPU present.

    python -m bus_kernels.aot [--arch 80 90] [--json PATH]

For each kernel variant (dtype, block sizes) and each target (sm_80, sm_90) this runs Triton's
full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via ptxas) and reads the cubin's resource
usage with ``cuobjdump``: registers per thread, local memory (spills), shared memory. It catches
what the CPU interpreter lets pass (type errors, unsupported ops, register pressure). Exits 1 if any
variant fails to compile, spills, or needs more shared memory per block than the target has
(sm_80: 163 KB, sm_90: 227 KB).

What is compiled is what the JIT compiles at run time: every pointer carries the 16-byte alignment
hint (``tt.divisibility = 16``) the JIT infers for torch's allocations, and so does every integer a
spec lists in ``divisible`` (strides and head counts that are multiples of 16 in the model); ragged
sizes (``total_q``, ``total_k``, ``N``) are ``do_not_specialize`` in the kernels, so the JIT never
specialises them and neither does this compile.

Each op module declares its variants in ``aot_specs() -> list[KernelSpec]``. Must run without
``TRITON_INTERPRET=1`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass
class KernelSpec:
    """One compilable variant of a kernel: pointer/scalar types and the constexpr values."""

    name: str  # e.g. "topk_gather_fwd fp16 C128"
    fn: object  # the @triton.jit function
    signature: dict[str, str]  # arg -> "*fp16" | "*fp32" | "*i64" | "i32" | "fp32" | "constexpr"
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None
    # integer args the run time sees as multiples of 16 (pointers always get the alignment hint)
    divisible: tuple[str, ...] = ()
    # compute capabilities this variant is for (None: every target), e.g. tiles chosen per GPU generation
    archs: tuple[int, ...] | None = None


TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# Shared memory one block may use (opt-in maximum), per compute capability: A100 163 KB, H100 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class AotResult:
    name: str
    arch: int
    ok: bool
    registers: int | None = None
    local_bytes: int | None = None  # per-thread local memory: > 0 means spills
    static_shared: int | None = None
    dynamic_shared: int | None = None
    error: str | None = None

    @property
    def shared_bytes(self) -> int:
        return (self.static_shared or 0) + (self.dynamic_shared or 0)

    @property
    def over_shared_limit(self) -> bool:
        limit = SHARED_MEMORY_LIMIT.get(self.arch)
        return self.ok and limit is not None and self.shared_bytes > limit


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict((k, int(v)) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return usage


def compile_spec(spec: KernelSpec, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=runtime_attrs(spec))
        options = {"num_warps": spec.num_warps}
        if spec.num_stages is not None:
            options["num_stages"] = spec.num_stages
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        return AotResult(
            spec.name, arch, True,
            registers=usage.get("REG"),
            local_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
            static_shared=usage.get("SHARED"),
            dynamic_shared=compiled.metadata.shared,
        )
    except Exception as e:  # report every failure, keep going
        return AotResult(spec.name, arch, False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def runtime_attrs(spec: KernelSpec) -> dict:
    """Triton's argument attributes as its JIT infers them for aligned tensors: 16-byte divisibility of
    every pointer and of the integers in ``spec.divisible`` (``{(arg index,): [["tt.divisibility", 16]]}``)."""
    names = list(spec.fn.arg_names)
    unknown = [n for n in spec.divisible if n not in spec.signature or spec.signature[n] == "constexpr"]
    if unknown:
        raise ValueError(f"{spec.name}: divisible names no integer argument: {unknown}")
    hinted = [n for n, t in spec.signature.items() if t.startswith("*")] + list(spec.divisible)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def all_specs() -> list[KernelSpec]:
    """Every kernel variant of every op module that declares ``aot_specs()``."""
    import importlib

    specs = []
    for module in _OP_MODULES:
        specs += importlib.import_module(module).aot_specs()
    return specs


_OP_MODULES = [
    "bus_kernels.ops.text_patch_scores",
    "bus_kernels.ops.topk_gather",
    "bus_kernels.ops.varlen_attention",
]


_SPECS: list[KernelSpec] = []


def _compile_indexed(job: tuple[int, int]) -> AotResult:
    index, arch = job
    return compile_spec(_SPECS[index], arch)


def compile_all(specs: list[KernelSpec], archs: list[int], jobs: int) -> list[AotResult]:
    """Compile every (spec, arch) pair, ``jobs`` processes at a time (forked: specs need no pickling)."""
    global _SPECS
    _SPECS = specs
    work = [(i, arch) for i in range(len(specs)) for arch in archs if specs[i].archs is None or arch in specs[i].archs]
    if jobs <= 1 or len(work) <= 1:
        return [_compile_indexed(w) for w in work]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_indexed, work, chunksize=1)


def format_table(results: list[AotResult]) -> str:
    lines = [
        "| kernel | arch | ok | registers | spill/local bytes | shared (static + dynamic) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.ok:
            flag = "**OVER LIMIT**" if r.over_shared_limit else "yes"
            lines.append(
                f"| {r.name} | sm_{r.arch} | {flag} | {r.registers} | {r.local_bytes} | {r.static_shared} + {r.dynamic_shared} |"
            )
        else:
            lines.append(f"| {r.name} | sm_{r.arch} | **FAILED** | | | {r.error} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bus_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this string")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler", file=sys.stderr)
        return 2
    specs = [s for s in all_specs() if args.filter in s.name]
    results = compile_all(specs, args.arch, args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and r.local_bytes]
    over = [r for r in results if r.over_shared_limit]
    print(f"\n{len(results)} variants: {len(results) - len(failed)} compiled, {len(failed)} failed, "
          f"{len(spilled)} with spills, {len(over)} over the shared-memory limit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.__dict__, "shared_bytes": r.shared_bytes, "over_shared_limit": r.over_shared_limit}
                       for r in results], f, indent=1)
    return 1 if failed or spilled or over else 0


if __name__ == "__main__":
    sys.exit(main())
