"""The `associative` backend: `lax.associative_scan` over the whole sequence, the textbook JAX baseline.

It materialises the (batch, length, channels, state) decay and input terms and keeps them for the backward
pass; it is here to be measured against, and is correct for every shape.
"""
import jax
import jax.numpy as jnp

from alignmamba_jax.kernels.common import make_backend


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def associative_core(u, delta, A, B, C, h0):
    a = jnp.exp(delta[..., None] * A)                              # (b, L, c, n)
    b = (delta * u)[..., None] * B[:, :, None, :]                  # (b, L, c, n)
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
    return jnp.einsum("blcn,bln->blc", h, C), h[:, -1]


selective_scan_associative = make_backend(associative_core, "associative")
