"""Packaging for alignmamba-jax.

`kernels/` is installed as `alignmamba_jax.kernels` (a top-level `kernels` package would collide with an
unrelated PyPI distribution of that name).
"""
from setuptools import setup

setup(
    name="alignmamba-jax",
    version="0.1.0",
    description="AlignMamba and AlignMamba-2 in JAX/Flax, with fast selective-scan kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["alignmamba_jax", "alignmamba_jax.data", "alignmamba_jax.kernels"],
    package_dir={"alignmamba_jax.kernels": "kernels"},
    # Build step of the cpu_ffi kernel: only its C++ source ships; it is compiled on first use (or by `make test`'s
    # install) against the installed jax's FFI headers, never at build time (why: kernels/cpu_ffi.py).
    package_data={"alignmamba_jax.kernels": ["csrc/*.cc"]},
    install_requires=[
        "jax>=0.10.2,<0.13",   # 0.10.2: Mosaic GPU's kernel(out_type=, scratch_types=); tested 0.10.2, 0.11.2, 0.12.0.1
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "chex>=0.1.87",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.2",
        "array_record>=0.5",
        "psutil>=5.9",
    ],
    extras_require={
        "test": ["pytest>=7.4", "hypothesis>=6.100", "pytest-timeout>=2.2", "pytest-xdist>=3.5"],
        "cuda": ["jax[cuda13]"],      # CUDA 13 wheels (driver >= 580); jax 0.10.x and 0.11.x both have the extra
        "cuda12": ["jax[cuda12]"],    # for older drivers
        "tpu": ["jax[tpu]"],
        # Compiling for TPU slices and GPU nodes from a CPU machine (python -m alignmamba_jax.aot): libtpu and the
        # CUDA 13 plugin at the installed jax's version, without CUDA's runtime libraries, ptxas, and nvdisasm (SASS
        # dumps of the Mosaic GPU kernels for benchmarks/kernel_report.py).
        "aot": ["jax[tpu,cuda13-local]", "nvidia-cuda-nvcc>=13.0.48", "nvidia-cuda-nvdisasm>=13.0.48"],
        # The docs site (`make docs`, mkdocs.yml): an API reference generated from the docstrings. Python >= 3.11:
        # on 3.10 the newest mkdocstrings (1.0.6) fails with the newest pymdown-extensions there (12.x).
        "docs": ['mkdocs>=1.6,<2; python_version >= "3.11"',
                 'mkdocstrings[python]>=1.0.8,<2; python_version >= "3.11"'],
    },
)
