"""The reference selective scan: a plain `lax.scan` over time, float32 state, the ground truth for tests.

Semantics are mamba-ssm's `selective_scan_ref`, transposed to channels-last:
    delta <- softplus(delta + delta_bias)          (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (ZOH for A, Euler for B)
    y_t   = <h_t, C_t> + D * u_t,   out_t = y_t * silu(z_t)       (D and z optional)
A step whose mask is False is an identity step of the recurrence (h_t = h_{t-1}) and its output is exactly 0:
u, delta, B, C and z there are replaced by 0 before any arithmetic (`common.zero_masked_steps`, the rule of
every backend), so inf / NaN under the mask reach neither later outputs nor any gradient. Empty inputs (batch
or length 0) give an empty output and h_last = the initial state.
Arithmetic is float32, or float64 when every input is float64 (so tests can check it by finite differences).
"""
import jax
import jax.numpy as jnp

from alignmamba_jax.kernels.common import zero_masked_steps


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                             initial_state=None, mask=None, return_final_state=False):
    """u, delta, z: (batch, length, channels); A: (channels, state); B, C: (batch, length, state)."""
    out_dtype = u.dtype
    u, delta, B, C, z = zero_masked_steps(mask, u, delta, B, C, z)
    compute_dtype = jnp.promote_types(jnp.result_type(u, delta, A, B, C), jnp.float32)
    u32, delta32 = u.astype(compute_dtype), delta.astype(compute_dtype)
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.astype(compute_dtype)
    if delta_softplus:
        delta32 = jax.nn.softplus(delta32)
    A32 = A.astype(compute_dtype)
    batch, _, channels = u.shape
    state = A.shape[1]
    h0 = (jnp.zeros((batch, channels, state), compute_dtype) if initial_state is None
          else initial_state.astype(compute_dtype))
    valid = jnp.ones(u.shape[:2], bool) if mask is None else mask.astype(bool)

    def step(h, xs):
        u_t, d_t, B_t, C_t, m_t = xs                          # (b, c), (b, c), (b, n), (b, n), (b,)
        a = jnp.exp(d_t[:, :, None] * A32)                    # (b, c, n)
        b = (d_t * u_t)[:, :, None] * B_t[:, None, :]         # (b, c, n)
        m = m_t[:, None, None]
        h = jnp.where(m, a * h + b, h)
        return h, jnp.einsum("bcn,bn->bc", h, C_t)

    xs = (jnp.swapaxes(u32, 0, 1), jnp.swapaxes(delta32, 0, 1),
          jnp.swapaxes(B.astype(compute_dtype), 0, 1), jnp.swapaxes(C.astype(compute_dtype), 0, 1),
          jnp.swapaxes(valid, 0, 1))
    h_last, ys = jax.lax.scan(step, h0, xs)
    y = jnp.swapaxes(ys, 0, 1)
    if D is not None:
        y = y + u32 * D.astype(compute_dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(compute_dtype))
    y = y.astype(out_dtype)
    return (y, h_last) if return_final_state else y
