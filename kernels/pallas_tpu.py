"""The Pallas TPU (Mosaic) variant of the `pallas` backend, used by `backend="pallas"` on TPU.

Layout: channels on the 128-wide lane axis, the state on sublanes, so the state of a channel block is an
(state, block_c) tile in a VMEM scratch buffer. Grid (batch, channel blocks, chunks of time): the chunk axis is
sequential ("arbitrary") and carries the state in VMEM between grid steps, so Pallas pipelines the next
chunk's HBM->VMEM copies behind the current chunk's work. Inside a chunk the time loop is unrolled with static
indices: Mosaic supports dynamic indices on sublanes but not on lanes, and B, C arrive transposed
(batch, state, length) so B_t is a static lane slice (state, 1) that broadcasts across the channel lanes.
The state at the start of every chunk is written out for the backward pass, which walks the chunks in reverse
(reversed index maps), recomputes a chunk's states into a (chunk, state, block_c) VMEM workspace, and runs
the adjoint recurrence, accumulating dA in VMEM. Nothing of size (batch, length, channels, state) is written.

Off TPU the kernels run under TPU interpret mode (`pltpu.InterpretParams`), which also checks the
block/grid semantics; `jax.export(..., platforms=["tpu"])` checks the Mosaic lowering (tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignmamba_jax.kernels.common import scan_cost_estimate


# Defaults of the core's keyword arguments, so that a device run can sweep them (`kernels.tuned_backend`).
TUNABLES = {"chunk": 128}
LANES = 128


def _params(interpret):
    if not interpret:
        return False
    interpret_params = getattr(pltpu, "InterpretParams", None)       # TPU interpret mode, where jax has it
    return interpret_params() if interpret_params is not None else True


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_kernel(u_ref, d_ref, At_ref, Bt_ref, Ct_ref, h0_ref, y_ref, h_starts_ref, h_last_ref, h_scratch,
                    *, chunk):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scratch[...] = h0_ref[...]

    h = h_scratch[...]
    h_starts_ref[...] = h
    At, Bt, Ct = At_ref[...], Bt_ref[...], Ct_ref[...]
    for i in range(chunk):
        d, u = d_ref[i:i + 1, :], u_ref[i:i + 1, :]
        h = jnp.exp(d * At) * h + Bt[:, i:i + 1] * (d * u)
        y_ref[i:i + 1, :] = jnp.sum(h * Ct[:, i:i + 1], axis=0, keepdims=True)
    h_scratch[...] = h

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        h_last_ref[...] = h


def _backward_kernel(u_ref, d_ref, At_ref, Bt_ref, Ct_ref, h_starts_ref, dy_ref, dh_last_ref,
                     du_ref, dd_ref, dAt_ref, dBt_ref, dCt_ref, dh0_ref, g_scratch, dA_scratch, work, *, chunk):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        g_scratch[...] = dh_last_ref[...]
        dA_scratch[...] = jnp.zeros_like(dA_scratch)

    At, Bt, Ct = At_ref[...], Bt_ref[...], Ct_ref[...]
    h_start = h_starts_ref[...]
    h = h_start
    for i in range(chunk):
        d, u = d_ref[i:i + 1, :], u_ref[i:i + 1, :]
        h = jnp.exp(d * At) * h + Bt[:, i:i + 1] * (d * u)
        work[i] = h
    g, dA = g_scratch[...], dA_scratch[...]
    for i in reversed(range(chunk)):
        d, u, dy = d_ref[i:i + 1, :], u_ref[i:i + 1, :], dy_ref[i:i + 1, :]
        b = Bt[:, i:i + 1]
        h_prev = work[i - 1] if i > 0 else h_start
        g = g + Ct[:, i:i + 1] * dy
        dCt_ref[:, i:i + 1] = jnp.sum(work[i] * dy, axis=1, keepdims=True)
        a = jnp.exp(d * At)
        g_a_hprev = g * a * h_prev
        dA = dA + g_a_hprev * d
        g_b = jnp.sum(g * b, axis=0, keepdims=True)
        dd_ref[i:i + 1, :] = jnp.sum(g_a_hprev * At, axis=0, keepdims=True) + u * g_b
        du_ref[i:i + 1, :] = d * g_b
        dBt_ref[:, i:i + 1] = jnp.sum(g * (d * u), axis=1, keepdims=True)
        g = g * a
    g_scratch[...] = g
    dA_scratch[...] = dA

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = g
        dAt_ref[...] = dA


def _specs(state, chunk, block_c, n_chunks, reverse):
    t = (lambda k: n_chunks - 1 - k) if reverse else (lambda k: k)
    seq_c = pl.BlockSpec((None, chunk, block_c), lambda b, c, k: (b, t(k), c))
    seq_n = pl.BlockSpec((None, state, chunk), lambda b, c, k: (b, 0, t(k)))
    mat = pl.BlockSpec((state, block_c), lambda b, c, k: (0, c))
    st = pl.BlockSpec((None, state, block_c), lambda b, c, k: (b, 0, c))
    starts = pl.BlockSpec((None, None, state, block_c), lambda b, c, k: (b, t(k), 0, c))
    per_block_n = pl.BlockSpec((None, None, state, chunk), lambda b, c, k: (b, c, 0, t(k)))
    return seq_c, seq_n, mat, st, starts, per_block_n


def _forward(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret):
    batch, length, channels = u.shape
    state = At.shape[0]
    n_chunks = length // chunk
    seq_c, seq_n, mat, st, starts, _ = _specs(state, chunk, block_c, n_chunks, reverse=False)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, n_chunks, state, channels), f32),
                 jax.ShapeDtypeStruct((batch, state, channels), f32))
    operands = (u, delta, At, Bt, Ct, h0t)
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk), out_shape=out_shape,
        grid=(batch, channels // block_c, n_chunks), in_specs=[seq_c, seq_c, mat, seq_n, seq_n, st],
        out_specs=(seq_c, starts, st), scratch_shapes=[pltpu.VMEM((state, block_c), f32)],
        compiler_params=_compiler_params(), interpret=_params(interpret), name="selective_scan_fwd_tpu",
        cost_estimate=scan_cost_estimate("fwd", batch, length, channels, state, operands, out_shape),
    )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _pallas_tpu_scan(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret):
    y, _, h_last = _forward(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret)
    return y, h_last


def _pallas_tpu_scan_fwd(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret):
    y, h_starts, h_last = _forward(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret)
    return (y, h_last), (u, delta, At, Bt, Ct, h_starts)


def _pallas_tpu_scan_bwd(chunk, block_c, interpret, res, cotangents):
    u, delta, At, Bt, Ct, h_starts = res
    dy, dh_last = cotangents
    batch, length, channels = u.shape
    state = At.shape[0]
    n_chunks, n_blocks = length // chunk, channels // block_c
    seq_c, seq_n, mat, st, starts, per_block_n = _specs(state, chunk, block_c, n_chunks, reverse=True)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, length, channels), f32),
                 jax.ShapeDtypeStruct((batch, state, channels), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, state, length), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, state, length), f32),
                 jax.ShapeDtypeStruct((batch, state, channels), f32))
    operands = (u, delta, At, Bt, Ct, h_starts, dy, dh_last)
    du, ddelta, dAt, dBt, dCt, dh0t = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk), out_shape=out_shape,
        grid=(batch, n_blocks, n_chunks), in_specs=[seq_c, seq_c, mat, seq_n, seq_n, starts, seq_c, st],
        out_specs=(seq_c, seq_c, st, per_block_n, per_block_n, st),
        scratch_shapes=[pltpu.VMEM((state, block_c), f32), pltpu.VMEM((state, block_c), f32),
                        pltpu.VMEM((chunk, state, block_c), f32)],
        compiler_params=_compiler_params(), interpret=_params(interpret), name="selective_scan_bwd_tpu",
        cost_estimate=scan_cost_estimate("bwd", batch, length, channels, state, operands, out_shape),
    )(*operands)
    return du, ddelta, dAt.sum(0), dBt.sum(1), dCt.sum(1), dh0t


_pallas_tpu_scan.defvjp(_pallas_tpu_scan_fwd, _pallas_tpu_scan_bwd)


def pallas_tpu_core(u, delta, A, B, C, h0, *, chunk=TUNABLES["chunk"], interpret=None):
    """`chunk` must be a multiple of 128 on real TPUs (a lane-axis block of B and C); smaller in interpret mode."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    batch, length, channels = u.shape
    chunk = min(chunk, -(-length // 8) * 8)
    block_c = channels if channels <= LANES else LANES
    pad_t = -(-length // chunk) * chunk - length
    pad_c = -(-channels // block_c) * block_c - channels
    u, delta = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (u, delta))
    Bt, Ct = (jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad_t))) for x in (B, C))
    At = jnp.pad(A.T, ((0, 0), (0, pad_c)))
    h0t = jnp.pad(jnp.swapaxes(h0, 1, 2), ((0, 0), (0, 0), (0, pad_c)))
    y, h_last_t = _pallas_tpu_scan(u, delta, At, Bt, Ct, h0t, chunk, block_c, interpret)
    return y[:, :length, :channels], jnp.swapaxes(h_last_t, 1, 2)[:, :channels]

