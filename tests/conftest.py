"""Shared pytest setup: float64 available for finite-difference checks, the benchmark scripts importable by name
(`import scan_bench`), CPU only unless JAX_PLATFORMS says otherwise (compiling for TPU and GPU targets needs no
such device: test_aot.py); tests marked `gpu` skip, with the reason, where jax sees no GPU."""
import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


class BenchmarkModules:
    """Imports benchmarks/<name>.py as module `name`, as `python benchmarks/<name>.py` finds its sibling modules;
    last on the import path, so an installed module of the same name wins."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        file = os.path.join(BENCHMARKS, f"{name}.py")
        if path is None and "." not in name and os.path.isfile(file):
            return importlib.util.spec_from_file_location(name, file)
        return None


sys.meta_path.append(BenchmarkModules)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The aot extra (libtpu, the CUDA plugin) is installed for the compile-only tests: keep libtpu from probing a
# metadata server and the CUDA plugin from looking for cuDNN, which this CPU machine has no use for.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compile-only: no TPU for libtpu's lockfile to guard


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the default run never initialises a GPU backend
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or os.environ.get("ALIGNMAMBA_DRY_RUN") == "1":
        return
    import jax
    try:
        jax.devices("gpu")
        return
    except RuntimeError as error:
        reason = (f"needs a GPU: jax.devices('gpu') failed with JAX_PLATFORMS="
                  f"{os.environ.get('JAX_PLATFORMS')!r} ({error}); on a GPU machine run `make device-suite`, "
                  f"or ALIGNMAMBA_DRY_RUN=1 for tiny sizes on the CPU")
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))
