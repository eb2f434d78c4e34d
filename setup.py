"""Optional ahead-of-time build of the native extension (csrc/); all metadata lives in pyproject.toml.

    pip install -e .                                        # pure Python: never needs a compiler
    BUS_BUILD_EXT=1 pip install --no-build-isolation .      # also compiles csrc/ into bus_kernels/_native*.so
    BUS_BUILD_EXT=cpu pip install --no-build-isolation .    # the same, CPU kernels only

With ``BUS_BUILD_EXT=1`` torch must be importable by the build (hence ``--no-build-isolation``). The CUDA
kernels are included when torch has CUDA and a toolkit is found (``CUDA_HOME``, or the ``nvcc`` on
``PATH`` resolved through wrapper scripts; see bus_kernels/build.py); ``TORCH_CUDA_ARCH_LIST`` picks the
targets (default ``8.0;9.0``). ``bus_kernels.native`` loads the library with ``torch.ops.load_library``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_helpers():
    """bus_kernels/build.py, loaded by path: importing the package itself would need its runtime deps."""
    package = types.ModuleType("_bus_setup")
    package.__path__ = [str(ROOT / "bus_kernels")]
    sys.modules[package.__name__] = package
    for name in ("_native_paths", "build"):
        spec = importlib.util.spec_from_file_location(f"_bus_setup.{name}", ROOT / "bus_kernels" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_bus_setup.build"]


def _native_extension(cpu_only: bool):
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(
            f"BUS_BUILD_EXT=1 needs torch in the build environment ({e}): pip install --no-build-isolation ."
        ) from e
    helpers = _build_helpers()
    if helpers.find_cxx() is None:
        raise SystemExit("BUS_BUILD_EXT=1: no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    cuda_home = helpers.find_cuda_home() if torch.version.cuda and not cpu_only else None
    sources = [os.path.relpath(p, ROOT) for p in helpers.cpu_sources()]
    kwargs = dict(include_dirs=[str(helpers.CSRC)], extra_compile_args={"cxx": list(helpers.CXX_FLAGS)})
    if cuda_home is None:
        ext = cpp_extension.CppExtension("bus_kernels._native", sources, **kwargs)
    else:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = helpers.cuda_arch_list()
        sources += [os.path.relpath(p, ROOT) for p in helpers.cuda_sources()]
        kwargs["extra_compile_args"] = {"cxx": list(helpers.CXX_FLAGS) + ["-DBUS_WITH_CUDA"],
                                        "nvcc": list(helpers.NVCC_FLAGS)}
        ext = cpp_extension.CUDAExtension("bus_kernels._native", sources, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


if os.environ.get("BUS_BUILD_EXT") in ("1", "cpu"):
    ext_modules, cmdclass = _native_extension(cpu_only=os.environ["BUS_BUILD_EXT"] == "cpu")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
else:
    setup()
