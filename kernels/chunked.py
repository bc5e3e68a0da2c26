"""The `chunked` backend, the XLA scan `auto` falls back to where no kernel can run (on CPU: where cpu_ffi cannot be
built): a sequential scan over time, organised in chunks, with a hand-written VJP that keeps only chunk-boundary
states.

Forward under differentiation: an outer `lax.scan` over chunks of `chunk` steps, an inner `lax.scan` over the
steps of a chunk with the (batch, channels, state) state as carry; the outer scan emits the state at the
start of each chunk, which is all the backward pass keeps (n_chunks x (batch, channels, state)). Without
differentiation the forward is one flat scan over time (nothing needs keeping).
Backward: a reverse scan over chunks. For each chunk it recomputes the chunk's states from its boundary state,
runs the adjoint recurrence g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t backwards through the chunk, and forms
the gradients with dense (batch, chunk, channels, state) arithmetic. The working set is one chunk; the
(batch, length, channels, state) tensor is never materialised. A sequential scan beats `lax.associative_scan`
on CPU because it does O(length) work in cache instead of O(length log length) passes through memory.
Lengths that are not a multiple of the chunk are padded with identity steps (delta = 0).
"""
import functools

import jax
import jax.numpy as jnp

from alignmamba_jax.kernels.common import make_backend

DEFAULT_CHUNK = 32


def _pad_to_chunks(chunk, *xs):
    length = xs[0].shape[1]
    padded = -(-length // chunk) * chunk
    pad = ((0, 0), (0, padded - length), (0, 0))
    return [jnp.pad(x, pad) if padded != length else x for x in xs]


def _time_major_chunks(x, chunk):                                   # (b, L, k) -> (n_chunks, T, b, k)
    batch, length, k = x.shape
    return jnp.transpose(x.reshape(batch, length // chunk, chunk, k), (1, 2, 0, 3))


def _from_time_major_chunks(x):                                     # (n_chunks, T, b, k) -> (b, L, k)
    n_chunks, chunk, batch, k = x.shape
    return jnp.transpose(x, (2, 0, 1, 3)).reshape(batch, n_chunks * chunk, k)


def _step(A):
    def step(h, x):
        u_t, d_t, B_t, C_t = x
        h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bcn,bn->bc", h, C_t)
    return step


def _forward_with_chunk_starts(u, delta, A, B, C, h0, chunk):
    """Returns y (b, L, c), h_last and the states at the start of every chunk (n_chunks, b, c, n)."""
    length = u.shape[1]
    xs = [_time_major_chunks(x, chunk) for x in _pad_to_chunks(chunk, u, delta, B, C)]

    def chunk_body(h, x):
        h_end, y = jax.lax.scan(_step(A), h, x)
        return h_end, (y, h)

    h_last, (y, h_starts) = jax.lax.scan(chunk_body, h0, xs)
    return _from_time_major_chunks(y)[:, :length], h_last, h_starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked_scan(u, delta, A, B, C, h0, chunk):
    """Without differentiation no chunk states are needed: one flat scan over time is fastest."""
    xs = [jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C)]
    h_last, y = jax.lax.scan(_step(A), h0, xs)
    return jnp.swapaxes(y, 0, 1), h_last


def _chunked_scan_fwd(u, delta, A, B, C, h0, chunk):
    y, h_last, h_starts = _forward_with_chunk_starts(u, delta, A, B, C, h0, chunk)
    return (y, h_last), (u, delta, A, B, C, h_starts)


def _chunked_scan_bwd(chunk, res, cotangents):
    u, delta, A, B, C, h_starts = res
    dy, dh_last = cotangents
    length = u.shape[1]
    xs = [_time_major_chunks(x, chunk) for x in _pad_to_chunks(chunk, u, delta, B, C, dy)]

    def chunk_grads(carry, x):
        g_end, dA = carry
        u_c, d_c, B_c, C_c, dy_c, h_start = x                      # (T, b, c) / (T, b, n); (b, c, n)
        a = jnp.exp(d_c[..., None] * A)                             # (T, b, c, n)
        du_B = (d_c * u_c)[..., None] * B_c[:, :, None, :]
        _, hs = jax.lax.scan(lambda h, ab: (ab[0] * h + ab[1],) * 2, h_start, (a, du_B))
        a_next = jnp.concatenate([a[1:], jnp.ones_like(a[:1])], axis=0)
        inject = C_c[:, :, None, :] * dy_c[..., None]

        def adjoint_step(g, x):
            a_n, inj = x
            g = a_n * g + inj
            return g, g

        _, gs = jax.lax.scan(adjoint_step, g_end, (a_next, inject), reverse=True)
        h_prev = jnp.concatenate([h_start[None], hs[:-1]], axis=0)
        g_a_hprev = gs * a * h_prev
        dA = dA + jnp.einsum("tbcn,tbc->cn", g_a_hprev, d_c)
        ddelta = jnp.einsum("tbcn,cn->tbc", g_a_hprev, A) + u_c * jnp.einsum("tbcn,tbn->tbc", gs, B_c)
        du = d_c * jnp.einsum("tbcn,tbn->tbc", gs, B_c)
        dB = jnp.einsum("tbcn,tbc->tbn", gs, d_c * u_c)
        dC = jnp.einsum("tbcn,tbc->tbn", hs, dy_c)
        return (a[0] * gs[0], dA), (du, ddelta, dB, dC)

    (dh0, dA), (du, ddelta, dB, dC) = jax.lax.scan(
        chunk_grads, (dh_last, jnp.zeros_like(A)), (*xs, h_starts), reverse=True)
    du, ddelta, dB, dC = (_from_time_major_chunks(x)[:, :length] for x in (du, ddelta, dB, dC))
    return du, ddelta, dA, dB, dC, dh0


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)


def chunked_core(u, delta, A, B, C, h0, chunk=DEFAULT_CHUNK):
    return _chunked_scan(u, delta, A, B, C, h0, max(1, min(chunk, u.shape[1])))


selective_scan_chunked = make_backend(chunked_core, "chunked")
