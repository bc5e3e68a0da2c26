"""The `pallas_mosaic_gpu` backend: the selective scan as Pallas Mosaic GPU kernels (Hopper and later), forward
and backward, sequential in time, parallel over channel blocks.

Both passes are Mosaic GPU kernels (`plgpu.kernel`); only the sums of the per-block partial gradients (dA
over the batch, dB and dC over channel blocks) and the padding are XLA.

Forward, grid (batch, channel blocks), one warpgroup per program: the float32 state of a (block_c, state)
channel block lives in registers (WGMMA layout; per-channel rows in its `reduce(1)` layout, per-state rows in
`reduce(0)`). `plgpu.emit_pipeline` brings time chunks of u and delta (chunk, block_c) and of B and C
(chunk, state) into shared memory with TMA copies, `max_concurrent_steps` chunks in flight, so the next
chunks load while this one computes. Each chunk's y goes from a double-buffered shared-memory tile back to HBM
by an asynchronous copy; under differentiation the state at the start of every chunk is written the same way.
Those boundary states, (batch, n_chunks, channels, state), are all the backward pass keeps.

Backward, same grid and pipeline with reversed index maps (chunks in reverse): a chunk's states and decays
exp(delta_t A) are recomputed from its boundary state into two (chunk, block_c, state) shared-memory
workspaces (one exponential per element in the whole backward; where the two do not fit in a block, as at
state 64, the adjoint recomputes the decay instead: `_keep_decays`), then the adjoint recurrence
g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t runs backwards through the chunk, reading them, with the state
after the step carried in registers (dC needs it, the next step's workspace read is the state before).
It gives du and ddelta per channel (sums over the state within a warp), dA accumulated in registers, and per
step the per-warp sums of dB and dC over the warp's channels: a butterfly reduce-scatter over the lanes
written with `plgpu.inline_mgpu` (`reduce_scatter`, `_lane_slots`: 7 shuffles and adds a token at state 16),
into a (4 warps, chunk, 32) shared-memory tile that the four warps add once per chunk. Interpret mode, which
has no inline Mosaic GPU, computes the same per-warp sums in the same lane order with array ops. The chunk's
sums go to HBM in that lane order, (batch, n_blocks, length, 32) float32, and XLA sums them over channel blocks
and gathers dB and dC out of them, rather than atomic adds into HBM: the sum is deterministic (training runs
repeat bit for bit) and costs 2 * state * 4 / block_c bytes per (batch, time, channel) element, written once
and read once, small next to u, delta and du, ddelta. Two workspaces of the default chunk of 8 take 64 KiB, so
two CTAs share an SM.
Nothing of size (batch, length, channels, state) is ever written.

u, delta, B and C are read in their own dtype (bfloat16 halves the HBM reads) and upcast in registers; y is
written in `y_dtype` (bfloat16 for bfloat16 inputs where no D or z follows) and the backward reads dy in it;
the state and all accumulation are float32. Lengths are padded to a multiple of the chunk with identity steps
(delta = 0), channels to the block size and the state to a multiple of 8 (the WGMMA layout's tile); the
padding lives outside the `custom_vjp`, so autodiff drops its gradient.

The lowering semantics is pinned in the compiler params (`lowering_semantics`, a tunable): Warpgroup by
default; Lane also lowers, except at state 32 and 64 (no bank-conflict-free shared-memory transfer of a state
tile whose float32 rows are not 128 bytes).

Both kernels take exp2(delta A log2(e)) with A pre-scaled outside them. With `approx_math` (a tunable, on by
default) Mosaic GPU emits it as ex2.approx.ftz.f32, which differs from the default ex2.approx.f32 only where the
result is subnormal (below 2^-126, flushed to zero): a decay that small leaves nothing of the state either way, and
ptxas drops the four instructions per exponential that handle subnormals. Where batch x channel blocks would leave
SMs idle, the sequence is split into segments run as separate sequences and chained exactly (`sequence_segments`,
`_segmented_scan`); its backward runs one full backward pass per segment after a light adjoint-only pass
(`_segment_adjoints`) that gives every segment its end cotangent.

Off a GPU the kernels run in Mosaic GPU interpret mode (tests check values and gradients against `reference`).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Defaults of the core's keyword arguments, so that a device run can sweep them (`kernels.tuned_backend`).
TUNABLES = {"chunk": 8, "block_c": 64, "max_concurrent_steps": 2, "lowering_semantics": "warpgroup",
            "approx_math": True}
SEMANTICS = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}
_TILE_ROWS, _TILE_COLS = 64, 8                                    # the WGMMA layout's (rows, cols) tile
_SLOTS = 2                                                        # double-buffered output tiles
_SHARED_MEMORY_BYTES = 227 * 1024                                 # per block on sm_90 / sm_100
MIN_COMPUTE_CAPABILITY = (9, 0)                                   # TMA copies: Hopper, Blackwell
_REDUCTION_SCRATCH_BYTES = plgpu.CompilerParams().reduction_scratch_bytes
_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_STATE, _ROW, _COL = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)


class _Config(NamedTuple):
    """The static (hashable) settings of one kernel call."""
    chunk: int
    block_c: int
    max_concurrent_steps: int
    lowering_semantics: str
    approx_math: bool
    keep_decays: bool    # the backward keeps each step's decay in shared memory (where it fits)
    interpret: bool
    y_dtype: jnp.dtype

    def layout(self, x, layout):
        # Interpret mode has no rule for layout casts (layouts only matter to the GPU lowering).
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def kernel(self, body, out_type, scratch_types, grid, name):
        interpret = None
        if self.interpret:    # public from jax 0.12; a private module of jax 0.10-0.11
            params = getattr(plgpu, "InterpretGPUParams", None)
            if params is None:
                from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
            interpret = params()
        return plgpu.kernel(
            body, out_type=out_type, scratch_types=scratch_types, grid=grid, grid_names=("batch", "block"),
            compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS[self.lowering_semantics],
                                                 approx_math=self.approx_math),
            interpret=interpret, kernel_name=name)


def _rows(cfg, ref, i, shape, axis, layout):
    """Row i of a (chunk, k) shared-memory tile, upcast to float32 and broadcast along `axis` to `shape`."""
    row = cfg.layout(ref[i], layout).astype(jnp.float32)
    return row, lax.broadcast_in_dim(row, shape, [1 - axis])


def _step_inputs(cfg, i, u_s, d_s, B_s, shape):
    """Step i's u_i and delta_i as channel rows, delta_i broadcast over the state, B_i broadcast over channels."""
    u, _ = _rows(cfg, u_s, i, shape, 1, _ROW)
    d, d_b = _rows(cfg, d_s, i, shape, 1, _ROW)
    _, B_b = _rows(cfg, B_s, i, shape, 0, _COL)
    return u, d, d_b, B_b


def _load_blocks(cfg, sources, tiles, barriers):
    """Copies (block_c, state) blocks from HBM into shared-memory tiles; returns them as float32 state arrays."""
    for k, src in enumerate(sources):
        plgpu.copy_gmem_to_smem(src, tiles.at[k], barriers.at[k])
    for k in range(len(sources)):
        plgpu.barrier_wait(barriers.at[k])
    return [cfg.layout(tiles[k], _STATE) for k in range(len(sources))]


def _store_blocks(pairs, tiles):
    """Writes (block_c, state) arrays to HBM through shared-memory tiles and waits for the copies."""
    for k, (_, value) in enumerate(pairs):
        tiles[k] = value
    plgpu.commit_smem()
    for k, (dst, _) in enumerate(pairs):
        plgpu.copy_smem_to_gmem(tiles.at[k], dst, commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)


def _forward(u, delta, A, B, C, h0, cfg, save_starts):
    batch, length, channels = u.shape
    state = A.shape[1]
    chunk, block_c = cfg.chunk, cfg.block_c
    n_chunks = length // chunk
    shape = (block_c, state)
    f32 = jnp.float32

    def kernel(u_g, d_g, A_g, B_g, C_g, h0_g, y_g, h_last_g, *rest):
        h_starts_g = rest[0] if save_starts else None
        y_s, st_s, barriers = rest[-3:]
        b, c = lax.axis_index("batch"), lax.axis_index("block")
        cs = pl.ds(c * block_c, block_c)
        A_r, h = _load_blocks(cfg, [A_g.at[cs], h0_g.at[b, cs]], st_s, barriers)

        def chunk_body(indices, u_s, d_s, B_s, C_s, carry):
            (k,), (h,) = indices, carry
            slot = lax.rem(k, _SLOTS)
            plgpu.wait_smem_to_gmem(_SLOTS - 1, wait_read_only=True)   # this slot's previous copies are done
            if save_starts:
                st_s[slot] = h

            def step(i, h):
                u, d, d_b, B_b = _step_inputs(cfg, i, u_s, d_s, B_s, shape)
                h = jnp.exp2(d_b * A_r) * h + lax.broadcast_in_dim(d * u, shape, [0]) * B_b
                _, C_b = _rows(cfg, C_s, i, shape, 0, _COL)
                y_s[slot, i] = jnp.sum(h * C_b, axis=1).astype(cfg.y_dtype)
                return h

            h = lax.fori_loop(0, chunk, step, h)
            plgpu.commit_smem()
            ts = pl.ds(k * chunk, chunk)
            if save_starts:
                plgpu.copy_smem_to_gmem(st_s.at[slot], h_starts_g.at[b, k, cs], commit_group=False)
            plgpu.copy_smem_to_gmem(y_s.at[slot], y_g.at[b, ts, cs])
            return (h,)

        pipeline = plgpu.emit_pipeline(
            chunk_body, grid=(n_chunks,),
            in_specs=[pl.BlockSpec((chunk, block_c), lambda k: (k, c))] * 2
            + [pl.BlockSpec((chunk, state), lambda k: (k, 0))] * 2,
            max_concurrent_steps=cfg.max_concurrent_steps, init_carry=(h,))
        h, = pipeline(u_g.at[b], d_g.at[b], B_g.at[b], C_g.at[b])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        _store_blocks([(h_last_g.at[b, cs], h)], st_s)

    out_type = [jax.ShapeDtypeStruct((batch, length, channels), cfg.y_dtype),
                jax.ShapeDtypeStruct((batch, channels, state), f32)]
    if save_starts:
        out_type.append(jax.ShapeDtypeStruct((batch, n_chunks, channels, state), f32))
    scratch = [plgpu.SMEM((_SLOTS, chunk, block_c), cfg.y_dtype), plgpu.SMEM((_SLOTS, block_c, state), f32),
               plgpu.Barrier(num_barriers=2)]
    return cfg.kernel(kernel, tuple(out_type), scratch, (batch, channels // block_c),
                      "selective_scan_fwd_mosaic_gpu")(u, delta, A * _LOG2E, B, C, h0)


def _lane_slots(state):
    """Where the warp reduce-scatter of the channel sums (`reduce_scatter`) leaves each warp's sums:
    [(slot, lane)] -> (q, column), q = 0 for dB's and 1 for dC's. A thread of the WGMMA layout starts with
    `state` values, one per quantity, 8-column tile j and vector element k (column 8j + 2 (lane % 4) + k), each
    already summed over its rows; each
    butterfly step over lane bits 4, 3, 2 (the 8 row groups of a warp) keeps one half of them and sends the
    other, so the steps cost state / 2 + state / 4 + ... shuffles and adds, not 3 x state (an odd count is
    all-reduced instead). Returns
    (values per lane, {(q, column): slot * 32 + lane}, [q * state + column for each slot * 32 + lane])."""
    start = [(q, j, k) for q in range(2) for j in range(state // _TILE_COLS) for k in range(2)]
    per_lane = {}
    for lane in range(32):
        values = start
        for bit in (4, 3, 2):
            if len(values) % 2 == 0:
                half = len(values) // 2
                values = values[half:] if (lane >> bit) & 1 else values[:half]
        per_lane[lane] = [(q, 8 * j + 2 * (lane % 4) + k) for q, j, k in values]
    n = len(per_lane[0])
    source = [0] * (32 * n)
    first = {}
    for lane, values in per_lane.items():
        for slot, (q, col) in enumerate(values):
            source[slot * 32 + lane] = q * state + col
            first.setdefault((q, col), slot * 32 + lane)
    return n, first, source


def reduce_scatter(values, lane_bit, shuffle, add, select):
    """The butterfly of `_lane_slots` over lane bits 4, 3, 2, written once for any operations: `lane_bit(bit)`
    (whether this lane has the bit set), `shuffle(x, distance)` (x of lane ^ distance), `add`, `select(p, x, y)`.
    The compiled kernel passes Mosaic GPU's shfl.bfly and arith ops; the tests pass numpy over 32 lanes."""
    for bit in (4, 3, 2):
        if len(values) % 2:
            values = [add(v, shuffle(v, 1 << bit)) for v in values]
            continue
        half, upper = len(values) // 2, lane_bit(bit)
        values = [add(select(upper, hi, lo), shuffle(select(upper, lo, hi), 1 << bit))
                  for lo, hi in zip(values[:half], values[half:])]
    return values


def _channel_sums_interpret(part, i, g, du, h, dy):
    """`_channel_sums_compiled` in plain array ops (interpret mode has no inline Mosaic GPU): the same per-warp sums in
    the same lane order, so the unscrambling of the partials is the one the compiled kernel needs."""
    block_c, state = g.shape
    _, _, source = _lane_slots(state)
    per_warp = [(x * w[:, None]).reshape(block_c // _TILE_ROWS, 4, 16, state).sum((0, 2)) for x, w in
                ((g, du), (h, dy))]
    sums = jnp.concatenate(per_warp, axis=1)
    part[:, i, :] = jnp.stack([sums[:, s] for s in source], axis=1)


def _channel_sums_compiled(part, i, g, du, h, dy):
    """Per warp, sum_c g[c, n] du[c] and sum_c h[c, n] dy[c] over the warp's 16 channels (x block_c / 64) for
    every n, written to part[warp, i, slot * 32 + lane] (`_lane_slots`): products and the in-thread row sums as
    fused multiply-adds, then a butterfly reduce-scatter over the lanes (state / 2 - 1 shuffles and adds per
    thread at state 16: 7, against 24 for two all-reduces), no cross-warp step (that is once per chunk)."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, math as mlir_math, memref, vector

    row = plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT, plgpu.Layout.WGMMA, row,
                                  plgpu.Layout.WGMMA, row))
    def write(ctx, part_ref, step, g, du, h, dy):
        del ctx
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        c32 = lambda v: arith.constant(i32, v)
        tiles_m, tiles_n = g.registers.shape[0], g.registers.shape[1]
        state = tiles_n * _TILE_COLS
        # The WGMMA layout as `_lane_slots` reads it (pinned by a test): register [m, j, 0, 0, half, 0...] of a
        # (block_c, state) array holds rows 64 m + 16 warp + 8 half + lane // 4, columns 8 j + 2 (lane % 4) + k.
        assert g.registers.shape[2:] == h.registers.shape[2:] == (1, 1, 2, 1, 1, 1, 1), g.registers.shape
        assert du.registers.shape == dy.registers.shape == (tiles_m, 1, 2, 1, 1), du.registers.shape

        def element(reg, k):
            return vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([k]))

        values = []
        for x, w in ((g, du), (h, dy)):
            for j in range(tiles_n):
                for k in range(2):
                    acc = None
                    for m in range(tiles_m):
                        for half in range(2):
                            xv = element(x.registers[m, j, 0, 0, half, 0, 0, 0, 0], k)
                            wv = element(w.registers[m, 0, half, 0, 0], 0)
                            acc = arith.mulf(xv, wv) if acc is None else mlir_math.fma(xv, wv, acc)
                    values.append(acc)
        tid = mgpu_utils.thread_idx()
        lane = arith.andi(tid, c32(31))
        warp = arith.andi(arith.shrui(tid, c32(5)), c32(3))
        values = reduce_scatter(
            values, lambda bit: arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, c32(1 << bit)), c32(0)),
            mgpu_utils.shfl_bfly, arith.addf, arith.select)
        assert len(values) == _lane_slots(state)[0]
        t = arith.index_cast(index, step.registers.item())
        w = arith.index_cast(index, warp)
        for slot, v in enumerate(values):
            col = arith.index_cast(index, arith.addi(lane, c32(32 * slot)))
            memref.store(v, part_ref, [w, t, col])

    write(part, i, g, du, h, dy)


def _warpgroup_barrier():
    """All four warps' shared-memory stores so far are visible to every thread after this."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def sync(ctx):
        del ctx
        mgpu_utils.warpgroup_barrier()

    sync()


def _backward(u, delta, A, B, C, h_starts, dy, dh_last, cfg):
    batch, length, channels = u.shape
    state = A.shape[1]
    chunk, block_c = cfg.chunk, cfg.block_c
    n_chunks, n_blocks = length // chunk, channels // block_c
    shape = (block_c, state)
    f32 = jnp.float32
    n_slots, first, _ = _lane_slots(state)
    width = 32 * n_slots

    def kernel(u_g, d_g, A_g, B_g, C_g, h_starts_g, dy_g, dh_last_g,
               du_g, dd_g, dA_g, dBC_g, dh0_g, work_h, *scratch):
        work_a = scratch[0] if cfg.keep_decays else None
        du_s, dd_s, part, bc_s, barriers = scratch[-5:]
        b, c = lax.axis_index("batch"), lax.axis_index("block")
        cs = pl.ds(c * block_c, block_c)
        # A and dh_last pass through the state workspace before the chunks need it, dA and dh0 after.
        A_r, g = _load_blocks(cfg, [A_g.at[cs], dh_last_g.at[b, cs]], work_h, barriers)
        A_ln2 = A_r * _LN2                                          # A itself: d exp2(delta A_r) / d delta = a A

        def chunk_body(indices, u_s, d_s, B_s, C_s, dy_s, h_start_s, carry):
            (k,), (g, dA) = indices, carry
            slot = lax.rem(k, _SLOTS)
            plgpu.wait_smem_to_gmem(_SLOTS - 1, wait_read_only=True)

            def recompute(i, h):
                work_h[i] = h                                       # the state before step i
                u, d, d_b, B_b = _step_inputs(cfg, i, u_s, d_s, B_s, shape)
                a = jnp.exp2(d_b * A_r)
                if cfg.keep_decays:
                    work_a[i] = a                                   # its decay: one exponential per element
                return a * h + lax.broadcast_in_dim(d * u, shape, [0]) * B_b

            h_end = lax.fori_loop(0, chunk, recompute, cfg.layout(h_start_s[...], _STATE))

            def adjoint_step(j, carry):
                g, dA, h = carry                                    # h: the state after step i
                i = chunk - 1 - j
                u, d, d_b, B_b = _step_inputs(cfg, i, u_s, d_s, B_s, shape)
                _, C_b = _rows(cfg, C_s, i, shape, 0, _COL)
                dy, dy_b = _rows(cfg, dy_s, i, shape, 1, _ROW)
                h_prev = cfg.layout(work_h[i], _STATE)
                a = cfg.layout(work_a[i], _STATE) if cfg.keep_decays else jnp.exp2(d_b * A_r)
                g = g + dy_b * C_b
                ga = g * a
                g_a_hprev = ga * h_prev
                dA = dA + g_a_hprev * d_b
                g_b = jnp.sum(g * B_b, axis=1)
                du_s[slot, i] = (d * g_b).astype(du_s.dtype)
                dd_s[slot, i] = (jnp.sum(g_a_hprev * A_ln2, axis=1) + u * g_b).astype(dd_s.dtype)
                if cfg.interpret:
                    _channel_sums_interpret(part, i, g, d * u, h, dy)
                else:
                    _channel_sums_compiled(part, i, g, d * u, h, dy)
                return ga, dA, h_prev

            g, dA, _ = lax.fori_loop(0, chunk, adjoint_step, (g, dA, h_end))
            if not cfg.interpret:
                _warpgroup_barrier()
            bc_s[slot] = part[0] + part[1] + part[2] + part[3]     # the chunk's one cross-warp step
            plgpu.commit_smem()
            ts = pl.ds((n_chunks - 1 - k) * chunk, chunk)
            for dst, src in ((du_g.at[b, ts, cs], du_s.at[slot]), (dd_g.at[b, ts, cs], dd_s.at[slot])):
                plgpu.copy_smem_to_gmem(src, dst, commit_group=False)
            plgpu.copy_smem_to_gmem(bc_s.at[slot], dBC_g.at[b, c, ts])
            return g, dA

        reverse = lambda k: n_chunks - 1 - k
        per_channel = pl.BlockSpec((chunk, block_c), lambda k: (reverse(k), c))
        per_state = pl.BlockSpec((chunk, state), lambda k: (reverse(k), 0))
        pipeline = plgpu.emit_pipeline(
            chunk_body, grid=(n_chunks,),
            in_specs=[per_channel, per_channel, per_state, per_state, per_channel,
                      pl.BlockSpec((None, block_c, state), lambda k: (reverse(k), c, 0))],
            max_concurrent_steps=cfg.max_concurrent_steps, init_carry=(g, cfg.layout(jnp.zeros(shape, f32), _STATE)))
        g, dA = pipeline(u_g.at[b], d_g.at[b], B_g.at[b], C_g.at[b], dy_g.at[b], h_starts_g.at[b])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        _store_blocks([(dh0_g.at[b, cs], g), (dA_g.at[b, cs], dA)], work_h)

    # du and ddelta in the dtypes of u and delta (their cotangents' dtypes); dA, dB, dC partials in float32.
    block_state = jax.ShapeDtypeStruct((batch, channels, state), f32)
    out_type = (jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(delta.shape, delta.dtype), block_state,
                jax.ShapeDtypeStruct((batch, n_blocks, length, width), f32), block_state)
    scratch = [plgpu.SMEM((chunk, block_c, state), f32)] * (2 if cfg.keep_decays else 1) + [
               plgpu.SMEM((_SLOTS, chunk, block_c), u.dtype), plgpu.SMEM((_SLOTS, chunk, block_c), delta.dtype),
               plgpu.SMEM((4, chunk, width), f32), plgpu.SMEM((_SLOTS, chunk, width), f32),
               plgpu.Barrier(num_barriers=2)]
    du, ddelta, dA, dBC, dh0 = cfg.kernel(kernel, out_type, scratch, (batch, n_blocks),
                                          "selective_scan_bwd_mosaic_gpu")(
        u, delta, A * _LOG2E, B, C, h_starts, dy, dh_last)
    gather = jnp.array([first[(q, n)] for q in range(2) for n in range(state)])
    dBC = dBC.sum(1)[..., gather]
    return du, ddelta, dA.sum(0), dBC[..., :state], dBC[..., state:], dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _mosaic_scan(u, delta, A, B, C, h0, cfg):
    return _forward(u, delta, A, B, C, h0, cfg, save_starts=False)


def _mosaic_scan_fwd(u, delta, A, B, C, h0, cfg):
    y, h_last, h_starts = _forward(u, delta, A, B, C, h0, cfg, save_starts=True)
    return (y, h_last), (u, delta, A, B, C, h_starts)


def _mosaic_scan_bwd(cfg, res, cotangents):
    u, delta, A, B, C, h_starts = res
    dy, dh_last = cotangents
    grads = _backward(u, delta, A, B, C, h_starts, dy, dh_last, cfg)
    return tuple(grad.astype(x.dtype) for grad, x in zip(grads, (u, delta, A, B, C, dh_last)))


_mosaic_scan.defvjp(_mosaic_scan_fwd, _mosaic_scan_bwd)


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def sequence_segments(programs, n_chunks, sm_count):
    """How many segments to cut each sequence into so that `programs` (batch x channel blocks) CTAs times the
    segments fill `sm_count` SMs: 1 (no split) where they already do or the SM count is unknown. Of the
    segment counts from the least that reaches the SM count up to 4 times it, the one whose busiest SM holds
    the fewest time steps (ceil(CTAs / SMs) / segments; the smallest count on a tie), at most one per chunk."""
    if not sm_count or programs >= sm_count or n_chunks < 2:
        return 1
    least = -(-sm_count // programs)
    candidates = range(least, 4 * least + 1)
    best = min(candidates, key=lambda s: (-(-programs * s // sm_count) / s, s))
    return max(1, min(best, n_chunks))


def _segment_adjoints(delta, A, C, dy, cfg):
    """Per sequence (here: segment), the adjoint that its outputs alone send back to its start state: the state
    adjoint recurrence g <- exp(delta_t A) (g + C_t dy_t) run backwards from zero, nothing else (no states, no
    gradients; one exponential and three FP32 operations per element). The split's backward chains these into
    each segment's end cotangent before its one full backward pass."""
    batch, length, channels = delta.shape
    state = A.shape[1]
    chunk, block_c = cfg.chunk, cfg.block_c
    n_chunks = length // chunk
    shape = (block_c, state)

    def kernel(d_g, A_g, C_g, dy_g, g_out, tiles, barriers):
        b, c = lax.axis_index("batch"), lax.axis_index("block")
        cs = pl.ds(c * block_c, block_c)
        A_r, = _load_blocks(cfg, [A_g.at[cs]], tiles, barriers)

        def chunk_body(indices, d_s, C_s, dy_s, carry):
            def step(j, g):
                i = chunk - 1 - j
                _, d_b = _rows(cfg, d_s, i, shape, 1, _ROW)
                _, C_b = _rows(cfg, C_s, i, shape, 0, _COL)
                _, dy_b = _rows(cfg, dy_s, i, shape, 1, _ROW)
                return (g + dy_b * C_b) * jnp.exp2(d_b * A_r)

            return (lax.fori_loop(0, chunk, step, carry[0]),)

        reverse = lambda k: n_chunks - 1 - k
        pipeline = plgpu.emit_pipeline(
            chunk_body, grid=(n_chunks,),
            in_specs=[pl.BlockSpec((chunk, block_c), lambda k: (reverse(k), c)),
                      pl.BlockSpec((chunk, state), lambda k: (reverse(k), 0)),
                      pl.BlockSpec((chunk, block_c), lambda k: (reverse(k), c))],
            max_concurrent_steps=cfg.max_concurrent_steps,
            init_carry=(cfg.layout(jnp.zeros(shape, jnp.float32), _STATE),))
        g, = pipeline(d_g.at[b], C_g.at[b], dy_g.at[b])
        _store_blocks([(g_out.at[b, cs], g)], tiles)

    out_type = jax.ShapeDtypeStruct((batch, channels, state), jnp.float32)
    scratch = [plgpu.SMEM((1, block_c, state), jnp.float32), plgpu.Barrier(num_barriers=1)]
    return cfg.kernel(kernel, out_type, scratch, (batch, channels // block_c),
                      "selective_scan_segment_adjoints_mosaic_gpu")(delta, A * _LOG2E, C, dy)


def _split(x, segments):
    batch, length = x.shape[:2]
    return x.reshape(batch * segments, length // segments, x.shape[-1])


def _segment_decays(delta, A, segments):
    """exp(A * the sum of a segment's deltas), (batch, segments, channels, state): the decays of a segment's
    steps multiply, so this carries a segment's start state to its end."""
    batch, length, channels = delta.shape
    sums = jnp.sum(delta.astype(jnp.float32).reshape(batch, segments, length // segments, channels), axis=2)
    return jnp.exp(sums[..., None] * A)


def _segmented_forward(u, delta, A, B, C, h0, cfg, segments, save_starts):
    batch, length, channels = u.shape
    state = A.shape[1]
    us, ds, Bs, Cs = (_split(x, segments) for x in (u, delta, B, C))
    zeros = jnp.zeros((batch * segments, channels, state), jnp.float32)
    _, ends = _forward(us, ds, A, Bs, Cs, zeros, cfg, save_starts=False)

    def link(start, decay_and_end):
        decay, end = decay_and_end
        return decay * start + end, start

    h_last, starts = lax.scan(link, h0, (_segment_decays(delta, A, segments).swapaxes(0, 1),
                                         ends.reshape(batch, segments, channels, state).swapaxes(0, 1)))
    y, _, *h_starts = _forward(us, ds, A, Bs, Cs, starts.swapaxes(0, 1).reshape(zeros.shape), cfg, save_starts)
    return y.reshape(batch, length, channels), h_last, h_starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _segmented_scan(u, delta, A, B, C, h0, cfg, segments):
    """The scan with each sequence cut into `segments` equal segments, run as batch x segments sequences, so
    that small batches still give every SM a CTA. Exact: a first pass scans every segment from a zero state
    for its end state; the decay of a whole segment is exp(A * sum of its deltas) (`_segment_decays`); a
    `lax.scan` over the segments then gives each segment's true start state (start_{s+1} = decay_s * start_s +
    end_s); a second pass rescans every segment from its start state for y.

    Its VJP runs one full backward pass per segment, from the segment's true start state (saved by the second
    forward pass) and its true end cotangent: the cotangent that reaches a segment's end is what the later
    segments send back, which the light `_segment_adjoints` pass gives per segment and a reverse `lax.scan`
    chains (G_{s-1} = adjoint_s + decay_s * G_s from G_last = the final state's cotangent; the initial state's
    cotangent is the chain's last value). Differentiating the two forward passes instead would take two full
    backward passes."""
    y, h_last, _ = _segmented_forward(u, delta, A, B, C, h0, cfg, segments, save_starts=False)
    return y, h_last


def _segmented_scan_fwd(u, delta, A, B, C, h0, cfg, segments):
    y, h_last, (h_starts,) = _segmented_forward(u, delta, A, B, C, h0, cfg, segments, save_starts=True)
    return (y, h_last), (u, delta, A, B, C, h_starts)


def _segmented_scan_bwd(cfg, segments, res, cotangents):
    u, delta, A, B, C, h_starts = res
    dy, dh_last = cotangents
    batch, length, channels = u.shape
    state = A.shape[1]
    us, ds, Bs, Cs, dys = (_split(x, segments) for x in (u, delta, B, C, dy))
    adjoints = _segment_adjoints(ds, A, Cs, dys, cfg).reshape(batch, segments, channels, state)

    def link_back(end_cotangent, decay_and_adjoint):
        decay, adjoint = decay_and_adjoint
        return adjoint + decay * end_cotangent, end_cotangent

    dh0, end_cotangents = lax.scan(link_back, dh_last.astype(jnp.float32),
                                   (_segment_decays(delta, A, segments).swapaxes(0, 1), adjoints.swapaxes(0, 1)),
                                   reverse=True)
    du, ddelta, dA, dB, dC, _ = _backward(us, ds, A, Bs, Cs, h_starts, dys,
                                          end_cotangents.swapaxes(0, 1).reshape(batch * segments, channels, state),
                                          cfg)
    grads = [g.reshape(batch, length, g.shape[-1]) for g in (du, ddelta)] + [dA] + [
        g.reshape(batch, length, state) for g in (dB, dC)] + [dh0]
    return tuple(grad.astype(x.dtype) for grad, x in zip(grads, (u, delta, A, B, C, dh_last)))


_segmented_scan.defvjp(_segmented_scan_fwd, _segmented_scan_bwd)


def _backward_shared_memory(chunk, block_c, state, max_concurrent_steps, itemsizes, keep_decays):
    """Bytes of shared memory the backward kernel (the larger of the two) takes."""
    u, delta, B, C, dy = itemsizes
    width = 32 * _lane_slots(state)[0]
    per_stage = chunk * block_c * (u + delta + dy) + chunk * state * (B + C) + block_c * state * 4
    scratch = (4 * ((1 + keep_decays) * chunk * block_c * state + (4 + _SLOTS) * chunk * width)
               + _SLOTS * chunk * block_c * (u + delta))
    barriers = 8 * (2 + max_concurrent_steps)
    return max_concurrent_steps * per_stage + scratch + barriers + _REDUCTION_SCRATCH_BYTES


def _keep_decays(chunk, block_c, state, max_concurrent_steps, itemsizes, check):
    """Whether the backward keeps each step's decay beside its state in shared memory (one exponential per
    element, two workspaces) or recomputes it in the adjoint (two exponentials, one workspace): the former where
    it fits in a Hopper/Blackwell block (at the defaults up to state 32 in float32). With `check`, an error
    where neither fits."""
    sizes = {keep: _backward_shared_memory(chunk, block_c, state, max_concurrent_steps, itemsizes, keep)
             for keep in (True, False)}
    if check and sizes[False] > _SHARED_MEMORY_BYTES:
        raise ValueError(
            f"chunk={chunk}, block_c={block_c}, max_concurrent_steps={max_concurrent_steps}: the backward kernel "
            f"needs {sizes[False]} bytes of shared memory at state size {state}, more than the "
            f"{_SHARED_MEMORY_BYTES} of a block; use a smaller chunk or block_c")
    return sizes[True] <= _SHARED_MEMORY_BYTES


def device_supported(device) -> bool:
    """Whether `device` can run these kernels: a CUDA GPU of compute capability 9.0 or later (the TMA
    pipeline; an Ampere path exists only in jax >= 0.11 under Lane semantics, and is not used here)."""
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return False
    return tuple(int(part) for part in str(capability).split(".")[:2]) >= MIN_COMPUTE_CAPABILITY


def _check_device():
    """On a GPU older than sm_90, say so before tracing (elsewhere, e.g. `jax.export` for cuda from a CPU host,
    the lowering assumes sm_90)."""
    device = jax.devices()[0]
    if device.platform == "gpu" and not device_supported(device):
        minimum = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise RuntimeError(f"backend='pallas_mosaic_gpu' needs a GPU of compute capability {minimum} or later "
                           f"(Hopper, Blackwell: its pipeline uses TMA copies); found {device.device_kind!r} of "
                           f"compute capability {getattr(device, 'compute_capability', None)}. Use backend "
                           f"'pallas_triton' (while JAX has Pallas's Triton dialect) or 'chunked'.")


def pallas_mosaic_gpu_core(u, delta, A, B, C, h0, *, chunk=TUNABLES["chunk"], block_c=TUNABLES["block_c"],
                           max_concurrent_steps=TUNABLES["max_concurrent_steps"],
                           lowering_semantics=TUNABLES["lowering_semantics"], approx_math=TUNABLES["approx_math"],
                           y_dtype=jnp.float32,
                           sm_count=None, interpret=None):
    """The recurrence core (see `common.py`); u, delta, B, C may be bfloat16/float16 (upcast in the kernel).

    chunk: time steps per pipeline stage and between saved boundary states (rounded up to a multiple of 8, at
    most the padded length); block_c: channels per program, a multiple of 64; max_concurrent_steps: chunks
    in flight in the input pipeline (2 = double buffering); lowering_semantics: "lane" or "warpgroup";
    y_dtype: the dtype the kernel writes y in (`make_backend(..., native_dtypes=True)` passes bfloat16 for
    bfloat16 inputs without D or z, so that y costs 2 bytes an element instead of 4 plus a cast).
    sm_count: the SMs to fill; where batch x channel blocks is smaller, the sequence is split into segments
    (`sequence_segments`, `_segmented_scan`). Default: the GPU's own count, none (no split) off a GPU; give
    the target's when compiling for a GPU from another machine (`targets.GPU_SPECS`).
    interpret (default: off GPU) runs the kernels in Mosaic GPU interpret mode.
    """
    if block_c % _TILE_ROWS or block_c <= 0:
        raise ValueError(f"block_c: expected a positive multiple of {_TILE_ROWS}, found {block_c}")
    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps: expected >= 1, found {max_concurrent_steps}")
    if lowering_semantics not in SEMANTICS:
        raise ValueError(f"lowering_semantics: expected one of {sorted(SEMANTICS)}, found {lowering_semantics!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch, length, channels = u.shape
    state = A.shape[1]
    chunk = min(_round_up(chunk, 8), _round_up(length, 8))
    u, delta, B, C = (x if x.dtype in _KERNEL_DTYPES else x.astype(jnp.float32) for x in (u, delta, B, C))
    kernel_y_dtype = jnp.dtype(y_dtype) if jnp.dtype(y_dtype) in _KERNEL_DTYPES else jnp.dtype(jnp.float32)
    if not interpret:
        _check_device()
    keep_decays = _keep_decays(chunk, block_c, _round_up(state, _TILE_COLS), max_concurrent_steps,
                               [x.dtype.itemsize for x in (u, delta, B, C)] + [kernel_y_dtype.itemsize],
                               check=not interpret)
    if sm_count is None and not interpret:
        sm_count = getattr(jax.devices()[0], "core_count", None) if jax.devices()[0].platform == "gpu" else None
    n_chunks = _round_up(length, chunk) // chunk
    segments = sequence_segments(batch * (_round_up(channels, block_c) // block_c), n_chunks, sm_count)
    pad_t = _round_up(n_chunks, segments) * chunk - length
    pad_c = _round_up(channels, block_c) - channels
    pad_n = _round_up(state, _TILE_COLS) - state
    u, delta = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (u, delta))
    B, C = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_n))) for x in (B, C))
    A = jnp.pad(A.astype(jnp.float32), ((0, pad_c), (0, pad_n)))
    h0 = jnp.pad(h0.astype(jnp.float32), ((0, 0), (0, pad_c), (0, pad_n)))
    cfg = _Config(chunk, block_c, max_concurrent_steps, lowering_semantics, bool(approx_math), keep_decays,
                  bool(interpret), kernel_y_dtype)
    if segments > 1:
        y, h_last = _segmented_scan(u, delta, A, B, C, h0, cfg, segments)
    else:
        y, h_last = _mosaic_scan(u, delta, A, B, C, h0, cfg)
    return y[:, :length, :channels].astype(y_dtype), h_last[:, :channels, :state]
