"""The `pallas_triton` backend: a Pallas kernel for Pallas's Triton GPU backend, sequential in time, parallel
over channel blocks.

JAX 0.11 deprecated Pallas's Triton backend (the Mosaic GPU kernel in `pallas_mosaic_gpu.py` is its successor);
this module imports `jax.experimental.pallas.triton` at import time, so `alignmamba_jax.kernels` imports it
only when the backend is asked for, and reports a clear error where JAX no longer has it.

Grid (batch, channel blocks). Each program keeps its (block_c, state) slice of the state in registers and walks
the sequence; every `chunk` steps it writes the state to HBM. Those boundary states, (batch, n_chunks,
channels, state), are all the backward pass keeps. The backward kernel (same grid) walks the chunks in reverse:
it recomputes a chunk's states from its boundary state into a per-program workspace of (chunk, block_c, state),
then runs the adjoint recurrence g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t backwards through the chunk,
writing du, ddelta and per-channel-block partial dB, dC (summed outside) and accumulating dA in registers.
Nothing of size (batch, length, channels, state) is ever written.

Lengths are padded to a multiple of the chunk with identity steps (delta = 0), channels to the block size and
the state size to a power of two (Triton's shapes); the padding lives outside the `custom_vjp`, so its gradient
is dropped by autodiff. Off GPU the kernels run with `interpret=True` (slow; for tests only).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from alignmamba_jax.kernels.common import scan_cost_estimate


# Defaults of the core's keyword arguments, so that a device run can sweep them (`kernels.tuned_backend`).
TUNABLES = {"chunk": 64, "block_c": 64, "num_warps": 4, "unroll": 1}


def _next_pow2(x):
    return 1 << max(0, (x - 1).bit_length())


def _step(A, d, u, b):
    """One step of the recurrence for a channel block: returns (exp(d A), d u B) as (block_c, state)."""
    return jnp.exp(d[:, None] * A), (d * u)[:, None] * b[None, :]


def _forward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, h_starts_ref, h_last_ref, *, chunk,
                    n_chunks, unroll):
    A = A_ref[...]

    def chunk_body(k, h):
        h_starts_ref[k] = h

        def step(i, h):
            t = k * chunk + i
            a, bu = _step(A, d_ref[t], u_ref[t], B_ref[t])
            h = a * h + bu
            y_ref[t] = jnp.sum(h * C_ref[t][None, :], axis=1)
            return h

        return jax.lax.fori_loop(0, chunk, step, h, unroll=unroll)

    h_last_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...])


def _backward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h_starts_ref, dy_ref, dh_last_ref,
                     du_ref, dd_ref, dA_ref, dB_ref, dC_ref, dh0_ref, work_ref, *, chunk, n_chunks, unroll,
                     interpret):
    A = A_ref[...]

    def chunk_body(kk, carry):
        k = n_chunks - 1 - kk
        h_start = h_starts_ref[k]

        def recompute(i, h):
            t = k * chunk + i
            a, bu = _step(A, d_ref[t], u_ref[t], B_ref[t])
            h = a * h + bu
            work_ref[i] = h
            return h

        jax.lax.fori_loop(0, chunk, recompute, h_start, unroll=unroll)
        if not interpret:
            plgpu.debug_barrier()

        def adjoint_step(ii, carry):
            g, dA = carry
            i = chunk - 1 - ii
            t = k * chunk + i
            d, u, b, dy = d_ref[t], u_ref[t], B_ref[t], dy_ref[t]
            h_t = work_ref[i]
            h_prev = jnp.where(i > 0, work_ref[jnp.maximum(i - 1, 0)], h_start)
            g = g + dy[:, None] * C_ref[t][None, :]
            dC_ref[t] = jnp.sum(h_t * dy[:, None], axis=0)
            a, _ = _step(A, d, u, b)
            g_a_hprev = g * a * h_prev
            dA = dA + g_a_hprev * d[:, None]
            g_b = jnp.sum(g * b[None, :], axis=1)
            dd_ref[t] = jnp.sum(g_a_hprev * A, axis=1) + u * g_b
            du_ref[t] = d * g_b
            dB_ref[t] = jnp.sum(g * (d * u)[:, None], axis=0)
            return g * a, dA

        carry = jax.lax.fori_loop(0, chunk, adjoint_step, carry, unroll=unroll)
        if not interpret:
            plgpu.debug_barrier()
        return carry

    g, dA = jax.lax.fori_loop(0, n_chunks, chunk_body, (dh_last_ref[...], jnp.zeros_like(A)))
    dh0_ref[...] = g
    dA_ref[...] = dA


def _specs(length, state, chunk, block_c):
    seq_c = pl.BlockSpec((None, length, block_c), lambda b, c: (b, 0, c))
    seq_n = pl.BlockSpec((None, length, state), lambda b, c: (b, 0, 0))
    mat = pl.BlockSpec((block_c, state), lambda b, c: (c, 0))
    st = pl.BlockSpec((None, block_c, state), lambda b, c: (b, c, 0))
    starts = pl.BlockSpec((None, length // chunk, block_c, state), lambda b, c: (b, 0, c, 0))
    per_block_n = pl.BlockSpec((None, None, length, state), lambda b, c: (b, c, 0, 0))
    work = pl.BlockSpec((None, None, chunk, block_c, state), lambda b, c: (b, c, 0, 0, 0))
    return seq_c, seq_n, mat, st, starts, per_block_n, work


class _Config(NamedTuple):
    """The static (hashable) settings of one kernel call: the tunables and whether to interpret."""
    chunk: int
    block_c: int
    num_warps: int
    unroll: int
    interpret: bool


def _call(kernel, out_shape, in_specs, out_specs, grid, cfg, name, operands):
    """The kernel applied to `operands`, with its cost for XLA's cost analysis."""
    batch, length, channels = operands[0].shape
    pass_ = "bwd" if "bwd" in name else "fwd"
    cost = scan_cost_estimate(pass_, batch, length, channels, operands[2].shape[1], operands, out_shape)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          interpret=cfg.interpret, name=name, cost_estimate=cost,
                          compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1))(*operands)


def _forward(u, delta, A, B, C, h0, cfg):
    batch, length, channels = u.shape
    state = A.shape[1]
    n_chunks = length // cfg.chunk
    seq_c, seq_n, mat, st, starts, _, _ = _specs(length, state, cfg.chunk, cfg.block_c)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, n_chunks, channels, state), f32),
                 jax.ShapeDtypeStruct((batch, channels, state), f32))
    kernel = functools.partial(_forward_kernel, chunk=cfg.chunk, n_chunks=n_chunks, unroll=cfg.unroll)
    return _call(kernel, out_shape, [seq_c, seq_c, mat, seq_n, seq_n, st], (seq_c, starts, st),
                 (batch, channels // cfg.block_c), cfg, "selective_scan_fwd", (u, delta, A, B, C, h0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_scan(u, delta, A, B, C, h0, cfg):
    y, _, h_last = _forward(u, delta, A, B, C, h0, cfg)
    return y, h_last


def _pallas_scan_fwd(u, delta, A, B, C, h0, cfg):
    y, h_starts, h_last = _forward(u, delta, A, B, C, h0, cfg)
    return (y, h_last), (u, delta, A, B, C, h_starts)


def _pallas_scan_bwd(cfg, res, cotangents):
    u, delta, A, B, C, h_starts = res
    dy, dh_last = cotangents
    batch, length, channels = u.shape
    state = A.shape[1]
    chunk, block_c = cfg.chunk, cfg.block_c
    n_blocks = channels // block_c
    seq_c, seq_n, mat, st, starts, per_block_n, work = _specs(length, state, chunk, block_c)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, channels, state), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, length, state), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, length, state), f32),
                 jax.ShapeDtypeStruct((batch, channels, state), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, chunk, block_c, state), f32))
    kernel = functools.partial(_backward_kernel, chunk=chunk, n_chunks=length // chunk, unroll=cfg.unroll,
                               interpret=cfg.interpret)
    du, ddelta, dA, dB, dC, dh0, _ = _call(
        kernel, out_shape, [seq_c, seq_c, mat, seq_n, seq_n, starts, seq_c, st],
        (seq_c, seq_c, st, per_block_n, per_block_n, st, work), (batch, n_blocks), cfg,
        "selective_scan_bwd", (u, delta, A, B, C, h_starts, dy, dh_last))
    return du, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dh0


_pallas_scan.defvjp(_pallas_scan_fwd, _pallas_scan_bwd)


def pallas_triton_core(u, delta, A, B, C, h0, *, chunk=TUNABLES["chunk"], block_c=TUNABLES["block_c"],
                       num_warps=TUNABLES["num_warps"], unroll=TUNABLES["unroll"], interpret=None):
    """The recurrence core (see `common.py`). chunk: time steps between saved boundary states (rounded down to
    the length's next power of two); block_c: channels per program; num_warps: Triton warps per program;
    unroll: unrolling of the time loops. interpret (default: off GPU) runs the kernels in Pallas interpret mode."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch, length, channels = u.shape
    state = A.shape[1]
    chunk = min(chunk, _next_pow2(length))
    block_c = min(block_c, _next_pow2(channels))
    padded_length = -(-length // chunk) * chunk
    padded_channels = -(-channels // block_c) * block_c
    padded_state = _next_pow2(state)
    pad_t, pad_c, pad_n = padded_length - length, padded_channels - channels, padded_state - state
    u, delta = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (u, delta))
    B, C = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_n))) for x in (B, C))
    A = jnp.pad(A, ((0, pad_c), (0, pad_n)))
    h0 = jnp.pad(h0, ((0, 0), (0, pad_c), (0, pad_n)))
    y, h_last = _pallas_scan(u, delta, A, B, C, h0, _Config(chunk, block_c, num_warps, unroll, bool(interpret)))
    return y[:, :length, :channels], h_last[:, :channels, :state]

