"""The Pallas TPU (Mosaic) variant of the `pallas` backend, used by `backend="pallas"` on TPU.

Grid (batch, channel blocks, chunks of time): the chunk axis is sequential ("arbitrary") and carries the state in
VMEM between grid steps, so Pallas pipelines the next chunk's HBM->VMEM copies behind the current chunk's work.
Inside a chunk, time is a `lax.fori_loop` (unrolled `unroll` steps at a time) indexing the time axis of the VMEM
blocks dynamically, so code size does not grow with the chunk or the length, and a chunk is any multiple of 8
steps (a sequence of 150 steps runs as 152). u, delta and y keep their dtype in HBM (bfloat16 costs half the
traffic); the kernels upcast on load and keep the state and all accumulation in float32.

Two layouts, chosen by the channel count:
- dense (channels >= 1024): 1024 channels fill an (8, 128) tile, one tile (one vreg) per state, so every vector
  op works on full vregs; B_t and C_t are read as SMEM scalars, which broadcast into a vector op for free. The
  state is carried in registers up to 16 states, in VMEM beyond. Forward only.
- lanes (fewer channels, and every backward): channels on the 128 lanes, the state on sublanes, a (state,
  block_c) tile; B_t and C_t are rows of (chunk, state) VMEM blocks, turned into columns per step. The
  backward's sums over channels (dB, dC) are then lane reductions that give all states at once.
The forward writes the state at the start of every chunk; the backward walks the chunks in reverse (reversed
index maps), recomputes a chunk's states into a (chunk + 1, state, 128) VMEM buffer and runs the adjoint
recurrence, accumulating dA in registers. The chunk shrinks with the state so that buffer stays within
`WORK_BYTES`, and every kernel asks Mosaic for the VMEM its blocks and scratch need (`vmem_limit_bytes`).
Nothing of size (batch, length, channels, state) is written.

Off TPU the kernels run under TPU interpret mode (`pltpu.InterpretParams`), which also checks the block/grid
semantics; tests compile them for a compile-only TPU (libtpu) to check the Mosaic compiler's verdict.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignmamba_jax.kernels.common import scan_cost_estimate

# Defaults of the core's keyword arguments, so that a device run can sweep them (`kernels.tuned_backend`).
TUNABLES = {"chunk": 128, "unroll": 8, "block_c": 512}
LANES, SUBLANES = 128, 8
DENSE_CHANNELS = LANES * SUBLANES   # channels of one (8, 128) tile: the dense layout's channel block
REGISTER_STATES = 16                # states carried in vregs (above, the dense forward keeps them in VMEM)
WORK_BYTES = 8 * 2 ** 20            # the backward's recomputed states per grid step (bounds its chunk)
VMEM_MARGIN = 4 * 2 ** 20           # Mosaic's own scratch and spills, above the blocks and scratch buffers
VMEM_CAP = 96 * 2 ** 20             # below the 128 MiB of VMEM of v5e / v6e (v4, v5p: 32 / 95 MiB, see _vmem)
LOG2E = math.log2(math.e)
f32 = jnp.float32


def _params(interpret):
    if not interpret:
        return False
    interpret_params = getattr(pltpu, "InterpretParams", None)       # TPU interpret mode, where jax has it
    return interpret_params() if interpret_params is not None else True


def _nbytes(shape, dtype):
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def _vmem(blocks, scratch):
    """vmem_limit_bytes: the blocks (double-buffered by the pipeline), the scratch buffers and a margin."""
    need = 2 * sum(_nbytes(*b) for b in blocks) + sum(_nbytes(*s) for s in scratch) + VMEM_MARGIN
    return int(min(max(need, 16 * 2 ** 20), VMEM_CAP))


def _compiler_params(vmem_limit_bytes):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit_bytes)


def _dense_forward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, starts_ref, last_ref, h_scratch,
                          *, chunk, state, unroll):
    """u, d, y: (chunk, rows, 128); A (log2 e scaled), h0, starts, last, h_scratch: (state, rows, 128);
    B, C: SMEM (chunk * state,)."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scratch[...] = h0_ref[...]

    starts_ref[...] = h_scratch[...]

    if state <= REGISTER_STATES:
        def step(t, hs):
            d = d_ref[t].astype(f32)
            du = d * u_ref[t].astype(f32)
            y, new = None, []
            for n in range(state):
                h = jnp.exp2(d * A_ref[n]) * hs[n] + B_ref[t * state + n] * du
                y = C_ref[t * state + n] * h if y is None else y + C_ref[t * state + n] * h
                new.append(h)
            y_ref[t] = y.astype(y_ref.dtype)
            return tuple(new)

        hs = jax.lax.fori_loop(0, chunk, step, tuple(h_scratch[n] for n in range(state)), unroll=unroll)
        for n in range(state):
            h_scratch[n] = hs[n]
    else:
        def step(t, carry):
            d = d_ref[t].astype(f32)
            du = d * u_ref[t].astype(f32)

            def state_step(n, y):
                h = jnp.exp2(d * A_ref[n]) * h_scratch[n] + B_ref[t * state + n] * du
                h_scratch[n] = h
                return y + C_ref[t * state + n] * h

            y = jax.lax.fori_loop(0, state, state_step, jnp.zeros_like(d), unroll=unroll)
            y_ref[t] = y.astype(y_ref.dtype)
            return carry

        jax.lax.fori_loop(0, chunk, step, 0)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        last_ref[...] = h_scratch[...]


def _rows(i, group):
    """The i-th aligned group of `group` time steps of a (chunk, width) block."""
    return pl.ds(pl.multiple_of(i * group, group), group)


def _column(rows, j, state):
    """Row j of a (group, state) array of B or C values as a (state, 1) column."""
    return rows[j:j + 1, :].reshape(state, 1)


def _lanes_forward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, starts_ref, last_ref, h_scratch,
                          y_rows, *, chunk, state, group, unroll):
    """u, d, y: (chunk, block_c); A (log2 e scaled), h0, starts, last, h_scratch: (state, block_c);
    B, C: (chunk, state). Each loop iteration reads and writes one aligned group of rows (16-bit rows come in
    packed pairs, so single rows cannot be addressed dynamically); output rows are gathered in a float32 VMEM
    buffer, y_rows (group, block_c), rather than in registers."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scratch[...] = h0_ref[...]

    starts_ref[...] = h_scratch[...]

    def steps(i, h):
        rows = _rows(i, group)
        d = d_ref[rows, :].astype(f32)
        du = d * u_ref[rows, :].astype(f32)
        B, C = B_ref[rows, :], C_ref[rows, :]
        for j in range(group):
            h = jnp.exp2(d[j:j + 1] * A_ref[...]) * h + _column(B, j, state) * du[j:j + 1]
            y_rows[j:j + 1, :] = jnp.sum(h * _column(C, j, state), axis=0, keepdims=True)
        y_ref[rows, :] = y_rows[...].astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, chunk // group, steps, h_scratch[...], unroll=unroll)
    h_scratch[...] = h

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        last_ref[...] = h


def _backward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h_start_ref, dy_ref, dh_last_ref,
                     du_ref, dd_ref, dA_ref, dB_ref, dC_ref, dh0_ref, g_scratch, dA_scratch, work, in_rows, c_rows,
                     n_rows, *, chunk, state, group):
    """Lanes layout, block_c = 128. u, d, dy, du, dd: (chunk, 128); A, h_start, dh_last, dA, dh0 and the
    scratch: (state, 128); B, C, dB, dC: (chunk, state); work: (chunk + 1, state, 128), work[t + 1] = h_t.
    Rows are read and written in aligned groups, as in the lanes forward: a group's d, u, dy are staged as float32
    in in_rows (3, group, 128), and its outputs gathered in c_rows (2, group, 128) for dd, du and n_rows
    (2, group, state) for dB, dC. Within a group, a loop over parts of 8 steps keeps a part's values alone in
    registers (16 steps unrolled spill)."""
    k = pl.program_id(2)
    n_groups, parts = chunk // group, group // SUBLANES

    @pl.when(k == 0)
    def _():
        g_scratch[...] = dh_last_ref[...]
        dA_scratch[...] = jnp.zeros_like(dA_scratch)

    A = A_ref[...]
    work[0] = h_start_ref[...]

    def stage(i, refs):
        for r, ref in enumerate(refs):
            in_rows[r] = ref[_rows(i, group), :].astype(f32)

    def recompute(i, h):
        stage(i, (d_ref, u_ref))

        def part(p, h):
            d = in_rows[0, _rows(p, SUBLANES), :]
            du = d * in_rows[1, _rows(p, SUBLANES), :]
            B = B_ref[_rows(i * parts + p, SUBLANES), :]
            for j in range(SUBLANES):
                h = jnp.exp(d[j:j + 1] * A) * h + _column(B, j, state) * du[j:j + 1]
                work[(i * parts + p) * SUBLANES + j + 1] = h
            return h

        return jax.lax.fori_loop(0, parts, part, h)

    jax.lax.fori_loop(0, n_groups, recompute, work[0])

    def adjoint(i, carry):
        i = n_groups - 1 - i
        stage(i, (d_ref, u_ref, dy_ref))

        def part(p, carry):
            g, dA = carry
            p = parts - 1 - p
            rows = _rows(p, SUBLANES)
            d, u, dy = in_rows[0, rows, :], in_rows[1, rows, :], in_rows[2, rows, :]
            B, C = B_ref[_rows(i * parts + p, SUBLANES), :], C_ref[_rows(i * parts + p, SUBLANES), :]
            for j in reversed(range(SUBLANES)):
                t = (i * parts + p) * SUBLANES + j
                out = pl.ds(p * SUBLANES + j, 1)
                d_j, u_j, dy_j = d[j:j + 1], u[j:j + 1], dy[j:j + 1]
                g = g + _column(C, j, state) * dy_j
                n_rows[1, out, :] = jnp.sum(work[t + 1] * dy_j, axis=1, keepdims=True).reshape(1, state)
                a = jnp.exp(d_j * A)
                g_a_hprev = g * a * work[t]
                dA = dA + g_a_hprev * d_j
                g_b = jnp.sum(g * _column(B, j, state), axis=0, keepdims=True)
                c_rows[0, out, :] = jnp.sum(g_a_hprev * A, axis=0, keepdims=True) + u_j * g_b
                c_rows[1, out, :] = d_j * g_b
                n_rows[0, out, :] = jnp.sum(g * (d_j * u_j), axis=1, keepdims=True).reshape(1, state)
                g = g * a
            return g, dA

        carry = jax.lax.fori_loop(0, parts, part, carry)
        rows = _rows(i, group)
        for ref, buffer in ((dd_ref, c_rows.at[0]), (du_ref, c_rows.at[1]), (dB_ref, n_rows.at[0]),
                            (dC_ref, n_rows.at[1])):
            ref[rows, :] = buffer[...].astype(ref.dtype)
        return carry

    g, dA = jax.lax.fori_loop(0, n_groups, adjoint, (g_scratch[...], dA_scratch[...]))
    g_scratch[...] = g
    dA_scratch[...] = dA

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = g
        dA_ref[...] = dA


class _Plan(NamedTuple):
    """Static sizes of one call: the chunk, the padded length and channels, the layout and its channel block."""
    state: int
    chunk: int
    n_chunks: int
    padded_length: int
    padded_channels: int
    dense: bool
    block_c: int
    group: int
    unroll: int


def _plan(length, channels, state, chunk, block_c, unroll, dtypes):
    """`dtypes`: of the arrays the kernels read and write per step; 16-bit ones make the row groups 16."""
    group = SUBLANES * 4 // min(jnp.dtype(d).itemsize for d in dtypes)
    work_chunk = max(group, WORK_BYTES // ((state + 1) * LANES * 4) // group * group)
    steps = -(-length // group) * group
    n_chunks = -(-steps // min(-(-chunk // group) * group, work_chunk))
    chunk = -(-steps // n_chunks // group) * group     # equal chunks: the length pads to a group per chunk at most
    dense = channels >= DENSE_CHANNELS
    if dense:
        block_c = DENSE_CHANNELS
    else:   # a wide lane block, narrower for large states (the state tile must stay a few vregs)
        wide = max(LANES, min(block_c, REGISTER_STATES * 4 * LANES // state) // LANES * LANES)
        block_c = min(-(-channels // LANES) * LANES, wide)
    return _Plan(state, chunk, n_chunks, n_chunks * chunk, -(-channels // block_c) * block_c, dense, block_c,
                 group, max(1, min(unroll, chunk)))


def _seq(plan, width, reverse=False):
    t = (lambda k: plan.n_chunks - 1 - k) if reverse else (lambda k: k)
    return pl.BlockSpec((None, plan.chunk, width), lambda b, c, k: (b, t(k), c))


def _forward(u, delta, A2t, B, C, h0t, plan, y_dtype, interpret):
    """A2t: (state, channels) A^T log2 e; B, C: (batch, length, state) float32; h0t: (batch, state, channels).
    Returns y (batch, length, channels), the chunks' starting states (batch, n_chunks, state, channels) and
    the last state (batch, state, channels)."""
    batch, length, channels = u.shape
    state, chunk, n_chunks, bc = plan.state, plan.chunk, plan.n_chunks, plan.block_c
    grid = (batch, channels // bc, n_chunks)
    if plan.dense:   # 16-bit inputs are unpacked in registers: unrolled as far as float32 they spill
        unroll = plan.unroll if max(u.dtype.itemsize, delta.dtype.itemsize) == 4 else max(1, plan.unroll // 2)
        kernel_args = dict(chunk=chunk, state=state, unroll=unroll)
    else:
        kernel_args = dict(chunk=chunk, state=state, group=plan.group, unroll=max(1, plan.unroll // plan.group))
    if plan.dense:
        rows = SUBLANES
        tiles = lambda x: x.reshape(*x.shape[:-1], channels // LANES, LANES)   # noqa: E731
        u_, d_, A_, h0_ = tiles(u), tiles(delta), tiles(A2t), tiles(h0t)
        B_, C_ = (x.reshape(batch, length * state) for x in (B, C))
        seq = pl.BlockSpec((None, chunk, rows, LANES), lambda b, c, k: (b, k, c, 0))
        smem = pl.BlockSpec((None, chunk * state), lambda b, c, k: (b, k), memory_space=pltpu.SMEM)
        mat = pl.BlockSpec((state, rows, LANES), lambda b, c, k: (0, c, 0))
        st = pl.BlockSpec((None, state, rows, LANES), lambda b, c, k: (b, 0, c, 0))
        starts = pl.BlockSpec((None, None, state, rows, LANES), lambda b, c, k: (b, k, 0, c, 0))
        in_specs, out_specs = [seq, seq, mat, smem, smem, st], (seq, starts, st)
        y_shape, s_shape = (batch, length, channels // LANES, LANES), (batch, n_chunks, state, channels // LANES,
                                                                       LANES)
        tile = (state, rows, LANES)
        scratch = [(tile, f32)]
        kernel = _dense_forward_kernel
        step_blocks = [((chunk, rows, LANES), u.dtype), ((chunk, rows, LANES), delta.dtype),
                       ((chunk, rows, LANES), y_dtype)]
    else:
        u_, d_, A_, B_, C_, h0_ = u, delta, A2t, B, C, h0t
        seq = _seq(plan, bc)
        bn = pl.BlockSpec((None, chunk, state), lambda b, c, k: (b, k, 0))
        mat = pl.BlockSpec((state, bc), lambda b, c, k: (0, c))
        st = pl.BlockSpec((None, state, bc), lambda b, c, k: (b, 0, c))
        starts = pl.BlockSpec((None, None, state, bc), lambda b, c, k: (b, k, 0, c))
        in_specs, out_specs = [seq, seq, mat, bn, bn, st], (seq, starts, st)
        y_shape, s_shape = (batch, length, channels), (batch, n_chunks, state, channels)
        tile = (state, bc)
        scratch = [(tile, f32), ((plan.group, bc), f32)]
        kernel = _lanes_forward_kernel
        step_blocks = [((chunk, bc), u.dtype), ((chunk, bc), delta.dtype), ((chunk, bc), y_dtype),
                       ((chunk, state), f32), ((chunk, state), f32)]
    out_shape = (jax.ShapeDtypeStruct(y_shape, y_dtype), jax.ShapeDtypeStruct(s_shape, f32),
                 jax.ShapeDtypeStruct(h0_.shape, f32))
    operands = (u_, d_, A_, B_, C_, h0_)
    vmem = _vmem(step_blocks + [(tile, f32)] * 4, scratch)
    y, starts_, last = pl.pallas_call(
        functools.partial(kernel, **kernel_args), out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=[pltpu.VMEM(*x) for x in scratch], compiler_params=_compiler_params(vmem),
        interpret=_params(interpret), name="selective_scan_fwd_tpu",
        cost_estimate=scan_cost_estimate("fwd", batch, length, channels, state, operands, out_shape),
    )(*operands)
    if plan.dense:
        y, starts_, last = (x.reshape(*x.shape[:-2], channels) for x in (y, starts_, last))
    return y, starts_, last


def _backward(u, delta, At, B, C, h_starts, dy, dh_last, plan, interpret):
    batch, length, channels = u.shape
    state, chunk, n_chunks = plan.state, plan.chunk, plan.n_chunks
    n_blocks = channels // LANES
    seq = _seq(plan, LANES, reverse=True)
    t = lambda k: n_chunks - 1 - k   # noqa: E731
    bn = pl.BlockSpec((None, chunk, state), lambda b, c, k: (b, t(k), 0))
    per_block_n = pl.BlockSpec((None, None, chunk, state), lambda b, c, k: (b, c, t(k), 0))
    mat = pl.BlockSpec((state, LANES), lambda b, c, k: (0, c))
    st = pl.BlockSpec((None, state, LANES), lambda b, c, k: (b, 0, c))
    starts = pl.BlockSpec((None, None, state, LANES), lambda b, c, k: (b, t(k), 0, c))
    out_shape = (jax.ShapeDtypeStruct((batch, length, channels), u.dtype),
                 jax.ShapeDtypeStruct((batch, length, channels), delta.dtype),
                 jax.ShapeDtypeStruct((batch, state, channels), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, length, state), f32),
                 jax.ShapeDtypeStruct((batch, n_blocks, length, state), f32),
                 jax.ShapeDtypeStruct((batch, state, channels), f32))
    operands = (u, delta, At, B, C, h_starts, dy, dh_last)
    tile = (state, LANES)
    scratch = [(tile, f32), (tile, f32), ((chunk + 1, state, LANES), f32), ((3, plan.group, LANES), f32),
               ((2, plan.group, LANES), f32), ((2, plan.group, state), f32)]
    blocks = ([((chunk, LANES), x.dtype) for x in (u, delta, dy, u, delta)] + [((chunk, state), f32)] * 4
              + [(tile, f32)] * 5)
    du, ddelta, dAt, dB, dC, dh0t = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, state=state, group=plan.group), out_shape=out_shape,
        grid=(batch, n_blocks, n_chunks), in_specs=[seq, seq, mat, bn, bn, starts, seq, st],
        out_specs=(seq, seq, st, per_block_n, per_block_n, st),
        scratch_shapes=[pltpu.VMEM(*x) for x in scratch],
        compiler_params=_compiler_params(_vmem(blocks, scratch)), interpret=_params(interpret),
        name="selective_scan_bwd_tpu",
        cost_estimate=scan_cost_estimate("bwd", batch, length, channels, state, operands, out_shape),
    )(*operands)
    return du, ddelta, dAt, dB.sum(1), dC.sum(1), dh0t


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _pallas_tpu_scan(u, delta, At, B, C, h0t, plan, y_dtype, interpret):
    y, _, h_last = _forward(u, delta, At * LOG2E, B, C, h0t, plan, y_dtype, interpret)
    return y, h_last


def _pallas_tpu_scan_fwd(u, delta, At, B, C, h0t, plan, y_dtype, interpret):
    y, h_starts, h_last = _forward(u, delta, At * LOG2E, B, C, h0t, plan, y_dtype, interpret)
    return (y, h_last), (u, delta, At, B, C, h_starts)


def _pallas_tpu_scan_bwd(plan, y_dtype, interpret, res, cotangents):
    u, delta, At, B, C, h_starts = res
    dy, dh_last = cotangents
    du, ddelta, dAt, dB, dC, dh0t = _backward(u, delta, At, B, C, h_starts, dy.astype(y_dtype), dh_last, plan,
                                              interpret)
    return du, ddelta, dAt.sum(0), dB, dC, dh0t


_pallas_tpu_scan.defvjp(_pallas_tpu_scan_fwd, _pallas_tpu_scan_bwd)


def pallas_tpu_core(u, delta, A, B, C, h0, *, chunk=TUNABLES["chunk"], unroll=TUNABLES["unroll"],
                    block_c=TUNABLES["block_c"], y_dtype=f32, interpret=None):
    """u, delta in their own dtype (float32 or bfloat16, read as such by the kernels); y written in `y_dtype`.
    `chunk`: time steps per grid step (rounded up to a multiple of the row group, 8 or 16 for 16-bit arrays;
    smaller for large states, see `WORK_BYTES`); `unroll`: time steps per `fori_loop` iteration of the dense
    forward (the lanes kernels take one row group an iteration); `block_c`: the lanes layout's channels per
    grid step (fewer for large states)."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    batch, length, channels = u.shape
    state = A.shape[1]
    plan = _plan(length, channels, state, chunk, block_c, unroll, (u.dtype, delta.dtype, y_dtype))
    pad_t, pad_c = plan.padded_length - length, plan.padded_channels - channels
    u, delta = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (u, delta))
    B, C = (jnp.pad(x.astype(f32), ((0, 0), (0, pad_t), (0, 0))) for x in (B, C))
    At = jnp.pad(A.T, ((0, 0), (0, pad_c)))
    h0t = jnp.pad(jnp.swapaxes(h0, 1, 2), ((0, 0), (0, 0), (0, pad_c)))
    y, h_last_t = _pallas_tpu_scan(u, delta, At, B, C, h0t, plan, jnp.dtype(y_dtype), interpret)
    return y[:, :length, :channels], jnp.swapaxes(h_last_t, 1, 2)[:, :channels]
