"""Test configuration: on a machine without a GPU, run the Triton kernels in Triton's CPU interpreter;
on a machine with CUDA, leave TRITON_INTERPRET unset so the kernels are compiled and the op tests run
them on the GPU too (marked ``cuda``, see _bus_testing.py; ``-m cuda`` selects only those).

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before bus_kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bus_kernels  # noqa: E402,F401  (import after the environment is set)

# The "native" backend (csrc/): build its CPU kernels once (cached under ~/.cache/bus_kernels, so later
# sessions only load them) before collection, so the tests parametrised over backends cover it.
# BUS_SKIP_NATIVE_BUILD=1 skips the build; without a compiler the backend skips with its reason.
if os.environ.get("BUS_SKIP_NATIVE_BUILD") != "1":
    from bus_kernels.build import ensure_built  # noqa: E402

    _native_build_error = ensure_built(cpu_only=not torch.cuda.is_available())
    if _native_build_error is not None:
        import warnings

        warnings.warn(f"native backend not built: {_native_build_error}", stacklevel=1)


# set by the user before the session: respected; otherwise the caches go under pytest's tmp dir (below)
_USER_CACHE_DIRS = {k for k in ("TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR") if k in os.environ}


@pytest.fixture(scope="session", autouse=True)
def _scratch_under_pytest_tmp(tmp_path_factory):
    """Tests leave nothing behind outside pytest's temporary directories (issue 15): temporary files of
    this process and of its children (torchrun's ``torchelastic_*`` log directories), TorchInductor's
    cache and matplotlib's font cache go under the session's basetemp. The native build cache
    (~/.cache/bus_kernels, see above) is kept on purpose."""
    import tempfile

    root = tmp_path_factory.mktemp("scratch")
    (root / "tmp").mkdir()
    wanted = {"TMPDIR": root / "tmp", "TORCHINDUCTOR_CACHE_DIR": root / "inductor", "MPLCONFIGDIR": root / "mpl"}
    saved = {k: os.environ.get(k) for k in wanted}
    for key, path in wanted.items():
        if key not in _USER_CACHE_DIRS:
            os.environ[key] = str(path)
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(root / "tmp")
    yield
    tempfile.tempdir = saved_tempdir
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs a kernel on the GPU (only collected where CUDA is available)")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many small CPU ops: one thread avoids oversubscribing a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
