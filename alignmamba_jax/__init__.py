"""alignmamba-jax: AlignMamba / AlignMamba-2 multimodal fusion in JAX/Flax.

Importing the package does no I/O; submodules are imported on use.
"""
__version__ = "0.1.0"
