"""Shared pytest setup: float64 available for finite-difference checks, CPU only."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
