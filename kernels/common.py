"""The part of the selective scan shared by every fast backend: everything except the recurrence itself.

A backend supplies a *core* `core(u, delta, A, B, C, h0) -> (y, h_last)` on float32 arrays
(u, delta: (batch, length, channels); A: (channels, state); B, C: (batch, length, state); h0, h_last:
(batch, channels, state)) computing h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t and y_t = <h_t, C_t>.
`make_backend` wraps it with the mask, delta_bias / softplus, D, the silu(z) gate, the output cast and empty
inputs. Gradients of these elementwise parts come from JAX autodiff; a core may define its own VJP.

Masked steps (mask False): before any arithmetic, u, delta, B, C and z there are replaced by 0 with
`jnp.where` (`zero_masked_steps`), and the effective delta (after bias and softplus) is 0 there too. So a
masked step is an exact identity step of the recurrence (exp(0 A) = 1, 0 B u = 0) and its output is exactly 0
(C = 0, u = 0, z = 0), whatever values (inf, NaN) sit under the mask; the gradient reaching a masked input is
exactly 0 (the VJP of `where` selects 0), so nothing there can reach valid outputs or their gradients. Cores
therefore only ever see finite masked steps, and `reference.py` applies the same rule.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def zero_masked_steps(mask, *xs):
    """Each (batch, length, k) array of `xs` (None passes through) with the steps where `mask` is False set to 0."""
    if mask is None:
        return xs
    keep = mask.astype(bool)[:, :, None]
    return tuple(None if x is None else jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in xs)


def effective_delta(delta, delta_bias, delta_softplus, mask):
    d = delta.astype(jnp.float32)
    if delta_bias is not None:
        d = d + delta_bias.astype(jnp.float32)
    if delta_softplus:
        d = jax.nn.softplus(d)
    if mask is not None:
        d = jnp.where(mask.astype(bool)[:, :, None], d, 0.0)
    return d


def make_backend(core, name, native_dtypes=False):
    """native_dtypes=True is for a core that upcasts inside its kernel: it gets u, B, C (and delta, where no
    bias, softplus or mask applies) in their own dtype and a keyword `y_dtype`, the dtype to write y in (u's
    where no D or z follows, else float32), so that bfloat16 costs half the HBM traffic."""
    def selective_scan_backend(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                               initial_state=None, mask=None, return_final_state=False):
        batch, length, channels = u.shape
        h0 = (jnp.zeros((batch, channels, A.shape[1]), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
        if batch == 0 or length == 0:  # no step to take: an empty output, the state is the initial state
            y = jnp.zeros(u.shape, u.dtype)
            return (y, h0) if return_final_state else y
        u, delta, B, C, z = zero_masked_steps(mask, u, delta, B, C, z)
        u32 = u.astype(jnp.float32)
        cast = (lambda x: x) if native_dtypes else (lambda x: x.astype(jnp.float32))
        plain_delta = delta_bias is None and not delta_softplus and mask is None
        d = cast(delta) if plain_delta else effective_delta(delta, delta_bias, delta_softplus, mask)
        y_dtype = {"y_dtype": u.dtype if D is None and z is None else jnp.float32} if native_dtypes else {}
        y, h_last = core(cast(u), d, A.astype(jnp.float32), cast(B), cast(C), h0, **y_dtype)
        if D is not None:
            y = y + u32 * D.astype(jnp.float32)
        if z is not None:
            y = y * jax.nn.silu(z.astype(jnp.float32))
        y = y.astype(u.dtype)
        return (y, h_last) if return_final_state else y

    selective_scan_backend.__name__ = f"selective_scan_{name}"
    selective_scan_backend.__doc__ = f"The selective scan with the `{name}` recurrence (see `common.py`)."
    return selective_scan_backend


# Work per (batch, step, channel, state) element of the recurrence: forward exp(delta A), the state update and the
# output's dot with C; the backward recomputes the forward's states and adds the adjoint's update and the four
# input gradients. What XLA's cost analysis counts for a kernel call, which is otherwise opaque to it.
_FLOPS_PER_ELEMENT = {"fwd": 6, "bwd": 18}
_EXPS_PER_ELEMENT = {"fwd": 1, "bwd": 2}


def scan_cost_estimate(pass_, batch, length, channels, state, operands, outputs) -> pl.CostEstimate:
    """The cost of one kernel call of `pass_` ("fwd" / "bwd") for XLA's cost analysis; `operands` and `outputs`
    are the arrays (or ShapeDtypeStructs) it reads and writes once each."""
    elements = batch * length * channels * state
    moved = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (*operands, *outputs))
    return pl.CostEstimate(flops=_FLOPS_PER_ELEMENT[pass_] * elements,
                           transcendentals=_EXPS_PER_ELEMENT[pass_] * elements, bytes_accessed=int(moved))
