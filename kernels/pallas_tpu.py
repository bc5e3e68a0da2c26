"""The Pallas TPU (Mosaic) variant of the `pallas` backend, used by `backend="pallas"` on TPU.

Grid (batch, channel blocks, chunks of time): the chunk axis is sequential ("arbitrary") and carries the state in
VMEM between grid steps, so Pallas pipelines the next chunk's HBM->VMEM copies behind the current chunk's work.
Inside a chunk, time is a `lax.fori_loop` over a few steps an iteration, indexing the VMEM blocks dynamically,
so code size does not grow with the chunk or the length. A chunk is a multiple of 8 steps (16 where an array is
16-bit: its rows come in packed pairs) and the chunks are made equal, so a sequence of 150 steps runs as 152
(160 in bfloat16). u, delta and y keep their dtype in HBM (bfloat16 costs half the traffic); the kernels upcast
on load and keep the state and all accumulation in float32; B and C are read as float32 (small).

Two layouts, chosen by the channel count:
- dense (channels >= 1024, forward only): 1024 channels fill an (8, 128) tile, one tile (one vreg) per state,
  so every vector op works on full vregs; B_t and C_t are SMEM scalars, which broadcast into a vector op for
  free. The blocks are the (batch, length, channels) array's own bytes, an (8, 128) HBM tile being 8 steps of
  128 channels: a strided load gathers one step's 8 lane tiles (`_dense_load`), so XLA moves no data around the
  kernel. States live in registers 8 at a time over the loop's 8 steps (`state_group`; more spill), in VMEM
  above 16 states.
- lanes (fewer channels, and every backward): channels on the 128 lanes, the state on sublanes, a (state,
  block_c) tile; B_t and C_t are rows of (chunk, state) VMEM blocks, turned into columns per step (XLU work).
  The backward's sums over channels (dB, dC) are then lane reductions that give all states at once. Each loop
  iteration reads and writes one aligned group of rows; outputs are gathered in VMEM, not in registers.
The forward writes the state at the start of every chunk; the backward walks the chunks in reverse (reversed
index maps), recomputes a chunk's states into a (chunk + 1, state, 128) VMEM buffer and runs the adjoint
recurrence, accumulating dA in registers. The chunk shrinks with the state so that buffer stays within
`WORK_BYTES`, and every kernel asks Mosaic for the VMEM its blocks and scratch need (`vmem_limit_bytes`; the
default scoped limit, 16 MiB on v5e, stops the backward from state 128 on). Nothing of size (batch, length,
channels, state) is written.

Off TPU the kernels run under TPU interpret mode (`pltpu.InterpretParams`, which also checks the block/grid
semantics), except in `selective_scan`'s CPU branch, which takes Pallas's generic interpreter (plain JAX ops, the
lanes layout) so that it can share a `lax.platform_dependent` with the compiled kernel (`_params`). Tests compile
the kernels for a compile-only TPU v5e (libtpu) and read Mosaic's verdict from its dumps.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignmamba_jax.kernels.common import scan_cost_estimate

# Defaults of the core's keyword arguments, so that a device run can sweep them (`kernels.tuned_backend`).
TUNABLES = {"chunk": 128, "unroll": 8, "state_group": 8, "block_c": 512}
LANES, SUBLANES = 128, 8
DENSE_CHANNELS = LANES * SUBLANES   # channels of one (8, 128) tile: the dense layout's channel block
REGISTER_STATES = 16                # states carried in vregs (above, the dense forward keeps them in VMEM)
WORK_BYTES = 8 * 2 ** 20            # the backward's recomputed states per grid step (bounds its chunk)
VMEM_MARGIN = 4 * 2 ** 20           # Mosaic's own scratch and spills, above the blocks and scratch buffers
VMEM_CAP = 96 * 2 ** 20             # a ceiling below v5e's and v6e's 128 MiB; state 256 asks for about 20 MiB
LOG2E = math.log2(math.e)
_HIGH_HALF = np.uint32(0xFFFF0000)
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))   # others are read and written as float32
f32 = jnp.float32


def _params(interpret):
    """False: compiled by Mosaic. "discharge": Pallas's generic interpreter (plain JAX ops, no callbacks, so its
    program can share a `lax.platform_dependent` with the compiled kernel's; the lanes layout only). True: TPU
    interpret mode, which also checks the block and grid semantics."""
    if not interpret or interpret == "discharge":
        return bool(interpret)
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


def _dense_rows(s):
    return pl.ds(s, SUBLANES, stride=SUBLANES)


def _dense_step(q, part, j):
    """(row of tiles i, step s in it, s // 2) of step j of the q-th part of `part` steps (a divisor of 8; even
    for 16-bit blocks, whose steps are read in pairs)."""
    per_row = SUBLANES // part   # q >= 0: lax's truncating division is floor division
    first = jax.lax.rem(q, per_row)
    return jax.lax.div(q, per_row), first * part + j, first * (part // 2) + j // 2


def _words(ref, i, m, emulate):
    """The 32-bit words of a bfloat16 dense block that hold steps 2m (low half) and 2m + 1 (high half), as
    Pallas's `bitcast` packs rows. TPU interpret mode cannot bitcast a ref: it packs two strided loads."""
    if emulate:
        pair = jnp.stack([ref[0, i, _dense_rows(2 * m + e), :] for e in (0, 1)], axis=-1)
        return jax.lax.bitcast_convert_type(pair, jnp.uint32)
    return ref.bitcast(jnp.uint32)[0, i, pl.ds(m, SUBLANES, stride=SUBLANES // 2), :]


def _dense_load(ref, i, s, m, odd, emulate):
    """Step 8 i + s of a (1, chunk / 8, 64, 128) dense block as a float32 (8, 128) tile (sublane r: lane tile r).

    The block is the (batch, length, channels) array's own bytes: a (8, 128) HBM tile holds 8 steps of 128
    channels, so the 8 lane tiles of one step sit 8 sublanes apart and one strided load gathers them. A
    bfloat16 step is read as the words it shares with its neighbour (16-bit strided loads do not exist) and
    moved to the high half, which is its float32 value."""
    if ref.dtype == f32:
        return ref[0, i, _dense_rows(s), :]
    words = _words(ref, i, m, emulate)
    return jax.lax.bitcast_convert_type(words & _HIGH_HALF if odd else words << 16, f32)


def _dense_store(ref, i, s, m, odd, y, low, emulate):
    """Writes step 8 i + s of y (see `_dense_load`; `odd`: whether s is odd, known statically). In bfloat16
    (rounded to nearest even) an even step's half is returned, then written with the next step's as one word."""
    if ref.dtype == f32:
        ref[0, i, _dense_rows(s), :] = y
        return None
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & _HIGH_HALF
    if not odd:
        return bits >> 16
    words = bits | low
    if emulate:
        pair = jax.lax.bitcast_convert_type(words, ref.dtype)
        for e in (0, 1):
            ref[0, i, _dense_rows(s - 1 + e), :] = pair[..., e]
    else:
        ref.bitcast(jnp.uint32)[0, i, pl.ds(m, SUBLANES, stride=SUBLANES // 2), :] = words
    return None


def _dense_forward_kernel(u_ref, d_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, starts_ref, last_ref, h_scratch,
                          y_part, *, chunk, state, state_group, unroll, emulate):
    """u, d, y: (1, chunk / 8, 64, 128), see `_dense_load`; A (log2 e scaled), h0, starts, last, h_scratch:
    (state, 8, 128); B, C: SMEM (1, chunk * state). The loop takes `unroll` steps (a divisor of 8, even for
    bfloat16) an iteration; y_part (unroll, 8, 128) holds their y summed over the state groups done."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scratch[...] = h0_ref[...]

    starts_ref[...] = h_scratch[...]

    def update(n, t, h, d, du):
        return jnp.exp2(d * A_ref[n]) * h + B_ref[0, t * state + n] * du

    def load(j, q):
        i, s, m = _dense_step(q, unroll, j)
        d = _dense_load(d_ref, i, s, m, j % 2 == 1, emulate)
        return i * SUBLANES + s, d, d * _dense_load(u_ref, i, s, m, j % 2 == 1, emulate)

    def store(j, q, y, low):
        i, s, m = _dense_step(q, unroll, j)
        return _dense_store(y_ref, i, s, m, j % 2 == 1, y, low, emulate)

    def steps(q, hs):
        """In registers: the states of one `state_group` at a time, over all the iteration's steps (all the
        states over 8 steps spill), y summed over the groups in y_part."""
        hs, low = list(hs), None
        for first in range(0, state, state_group):
            group = range(first, min(first + state_group, state))
            for j in range(unroll):
                t, d, du = load(j, q)
                for n in group:
                    hs[n] = update(n, t, hs[n], d, du)
                y = sum((C_ref[0, t * state + n] * hs[n] for n in group[1:]), C_ref[0, t * state + first] * hs[first])
                if first:
                    y = y + y_part[j]
                if group[-1] + 1 < state:
                    y_part[j] = y
                else:
                    low = store(j, q, y, low)
        return tuple(hs)

    def steps_in_vmem(q, carry):
        low = None
        for j in range(unroll):
            t, d, du = load(j, q)

            def state_step(n, y):
                h = update(n, t, h_scratch[n], d, du)
                h_scratch[n] = h
                return y + C_ref[0, t * state + n] * h

            y = jax.lax.fori_loop(0, state, state_step, jnp.zeros_like(d), unroll=SUBLANES)
            low = store(j, q, y, low)
        return carry

    if state <= REGISTER_STATES:
        hs = jax.lax.fori_loop(0, chunk // unroll, steps, tuple(h_scratch[n] for n in range(state)))
        for n, h in enumerate(hs):
            h_scratch[n] = h
    else:
        jax.lax.fori_loop(0, chunk // unroll, steps_in_vmem, ())

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
                          y_rows, *, chunk, state, group):
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

    h = jax.lax.fori_loop(0, chunk // group, steps, h_scratch[...])
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
    state_group: int


def _plan(length, channels, state, chunk, block_c, unroll, state_group, dtypes, lanes_only=False):
    """`dtypes`: of the arrays the kernels read and write per step; 16-bit ones make the row groups 16;
    `lanes_only`: the lanes layout whatever the channels (the generic interpreter cannot run the dense one)."""
    group = SUBLANES * 4 // min(jnp.dtype(d).itemsize for d in dtypes)
    work_chunk = max(group, WORK_BYTES // ((state + 1) * LANES * 4) // group * group)
    steps = -(-length // group) * group
    n_chunks = -(-steps // min(-(-chunk // group) * group, work_chunk))
    chunk = -(-steps // n_chunks // group) * group     # equal chunks: the length pads to a group per chunk at most
    dense = channels >= DENSE_CHANNELS and not lanes_only
    if dense:
        block_c = DENSE_CHANNELS
    else:   # a wide lane block, narrower for large states (the state tile must stay a few vregs)
        wide = max(LANES, min(block_c, REGISTER_STATES * 4 * LANES // state) // LANES * LANES)
        block_c = min(-(-channels // LANES) * LANES, wide)
    if unroll not in (1, 2, 4, 8):
        raise ValueError(f"pallas_tpu: unroll must divide 8 (1, 2, 4 or 8), found {unroll}")
    if group > SUBLANES:   # the dense forward reads 16-bit steps in pairs
        unroll = max(unroll, 2)
    # channels pad to the lanes only: the grid's last channel block may be partial (its missing lanes are
    # garbage that stays in their own channels; their writes are dropped)
    return _Plan(state, chunk, n_chunks, n_chunks * chunk, -(-channels // LANES) * LANES, dense, block_c,
                 group, unroll, max(1, min(state_group, state)))


def _seq(plan, width, reverse=False):
    t = (lambda k: plan.n_chunks - 1 - k) if reverse else (lambda k: k)
    return pl.BlockSpec((None, plan.chunk, width), lambda b, c, k: (b, t(k), c))


def _dense_view(x, inverse=False):
    """(batch, length, channels) <-> (batch, length / 8, channels / 128 * 8, 128): the same bytes in HBM (XLA
    lowers both ways to a bitcast), one (8, 128) tile per row of the latter."""
    if inverse:
        batch, groups, rows, _ = x.shape
        x = x.reshape(batch, groups, rows // SUBLANES, SUBLANES, LANES).transpose(0, 1, 3, 2, 4)
        return x.reshape(batch, groups * SUBLANES, rows // SUBLANES * LANES)
    batch, length, channels = x.shape
    x = x.reshape(batch, length // SUBLANES, SUBLANES, channels // LANES, LANES).transpose(0, 1, 3, 2, 4)
    return x.reshape(batch, length // SUBLANES, channels // LANES * SUBLANES, LANES)


def _forward(u, delta, A2t, B, C, h0t, plan, y_dtype, interpret):
    """A2t: (state, channels) A^T log2 e; B, C: (batch, length, state) float32; h0t: (batch, state, channels).
    Returns y (batch, length, channels), the chunks' starting states (batch, n_chunks, state, channels) and
    the last state (batch, state, channels)."""
    batch, length, channels = u.shape
    state, chunk, n_chunks, bc = plan.state, plan.chunk, plan.n_chunks, plan.block_c
    grid = (batch, -(-channels // bc), n_chunks)
    if plan.dense:
        kernel_args = dict(chunk=chunk, state=state, state_group=plan.state_group, unroll=plan.unroll,
                           emulate=bool(interpret))
        rows = SUBLANES * SUBLANES   # 8 lane tiles x 8 steps
        u_, d_ = _dense_view(u), _dense_view(delta)
        A_, h0_ = (x.reshape(*x.shape[:-1], channels // LANES, LANES) for x in (A2t, h0t))
        B_, C_ = (x.reshape(batch, n_chunks, 1, chunk * state) for x in (B, C))
        seq = pl.BlockSpec((1, chunk // SUBLANES, rows, LANES), lambda b, c, k: (b, k, c, 0))
        smem = pl.BlockSpec((None, None, 1, chunk * state), lambda b, c, k: (b, k, 0, 0),
                            memory_space=pltpu.SMEM)
        mat = pl.BlockSpec((state, SUBLANES, LANES), lambda b, c, k: (0, c, 0))
        st = pl.BlockSpec((None, state, SUBLANES, LANES), lambda b, c, k: (b, 0, c, 0))
        starts = pl.BlockSpec((None, None, state, SUBLANES, LANES), lambda b, c, k: (b, k, 0, c, 0))
        in_specs, out_specs = [seq, seq, mat, smem, smem, st], (seq, starts, st)
        y_shape = u_.shape
        s_shape = (batch, n_chunks, state, channels // LANES, LANES)
        tile = (state, SUBLANES, LANES)
        scratch = [(tile, f32), ((plan.unroll, SUBLANES, LANES), f32)]
        kernel = _dense_forward_kernel
        step_blocks = [((chunk * SUBLANES, LANES), x) for x in (u.dtype, delta.dtype, y_dtype)]
    else:
        kernel_args = dict(chunk=chunk, state=state, group=plan.group)
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
        y = _dense_view(y, inverse=True)
        starts_, last = (x.reshape(*x.shape[:-2], channels) for x in (starts_, last))
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
                    state_group=TUNABLES["state_group"], block_c=TUNABLES["block_c"], y_dtype=f32, interpret=None):
    """u, delta in their own dtype (float32 or bfloat16 are read as such by the kernels, others as float32); y
    written in `y_dtype`.
    `chunk`: time steps per grid step (rounded up to a multiple of the row group, 8 or 16 for 16-bit arrays;
    smaller for large states, see `WORK_BYTES`); `unroll`: time steps per `fori_loop` iteration of the dense
    forward (the lanes kernels take one row group an iteration); `block_c`: the lanes layout's channels per
    grid step (fewer for large states); `interpret`: see `_params` (None: TPU interpret mode off a TPU)."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    u, delta = (x if x.dtype in KERNEL_DTYPES else x.astype(f32) for x in (u, delta))
    out_dtype = jnp.dtype(y_dtype)
    y_dtype = out_dtype if out_dtype in KERNEL_DTYPES else jnp.dtype(f32)
    batch, length, channels = u.shape
    state = A.shape[1]
    plan = _plan(length, channels, state, chunk, block_c, unroll, state_group, (u.dtype, delta.dtype, y_dtype),
                 lanes_only=interpret == "discharge")
    pad_t, pad_c = plan.padded_length - length, plan.padded_channels - channels
    u, delta = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (u, delta))
    B, C = (jnp.pad(x.astype(f32), ((0, 0), (0, pad_t), (0, 0))) for x in (B, C))
    At = jnp.pad(A.T, ((0, 0), (0, pad_c)))
    h0t = jnp.pad(jnp.swapaxes(h0, 1, 2), ((0, 0), (0, 0), (0, pad_c)))
    y, h_last_t = _pallas_tpu_scan(u, delta, At, B, C, h0t, plan, y_dtype, interpret)
    return y[:, :length, :channels].astype(out_dtype), jnp.swapaxes(h_last_t, 1, 2)[:, :channels]
