"""Tests of the Pallas Mosaic GPU kernel (`pallas_mosaic_gpu`): values and gradients in Mosaic GPU interpret mode
against `reference`, bfloat16 inputs read as such, and the lowering for sm_90 through `jax.export` under both
lowering semantics, all from this CPU machine. No GPU runs here: these tests do not show that the PTX compiles
or how fast it is.

Interpret mode is slow (seconds per call), so the default suite makes a few small calls whose shapes still
exercise several chunks and channel blocks and the padding of length, channels and state; larger shapes and
more settings are marked slow.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import alignmamba_jax.kernels as kernels
from alignmamba_jax.kernels import registry, selective_scan, selective_scan_reference, tuned_backend
from alignmamba_jax.kernels.common import make_backend
from alignmamba_jax.kernels.pallas_mosaic_gpu import (SEMANTICS, device_supported, pallas_mosaic_gpu_core,
                                                      sequence_segments)
from alignmamba_jax.kernels.testing import OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs

# chunk 8 on a length of 20: 3 chunks, the last padded; 70 channels: 2 blocks of 64, the second padded;
# state 5: padded to 8.
SMALL = tuned_backend("pallas_mosaic_gpu", chunk=8)


def _check_against_reference(fn, shape, options, seed=2):
    args, kwargs = make_inputs(seed, *shape, options.items())
    y, h = jax.jit(lambda a: fn(*a, return_final_state=True, **kwargs))(args)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], rtol=1e-4, atol=1e-4, what="values")
    assert_close_tree(grads_of_all_inputs(fn, args, kwargs),
                      grads_of_all_inputs(selective_scan_reference, args, kwargs), rtol=1e-3, atol=1e-3,
                      what="gradients")


def test_mosaic_gpu_matches_reference_values_and_gradients_of_every_input():
    """Every option at once (mask, delta_bias + softplus, D, z, initial and final state): a wrong adjoint step,
    a wrong chunk order in the backward pipeline or a lost boundary state changes some gradient."""
    _check_against_reference(SMALL, (2, 20, 70, 5), OPTION_SETS["all"])


def test_mosaic_gpu_backward_keeps_decays_where_both_workspaces_fit():
    """The decay workspace fits up to state 32 in float32 at the defaults; at state 64 the adjoint recomputes
    the decays (one workspace) rather than refusing a size that fitted before."""
    from alignmamba_jax.kernels.pallas_mosaic_gpu import _keep_decays
    assert _keep_decays(8, 64, 16, 2, [2] * 5, check=True) and _keep_decays(8, 64, 32, 2, [4] * 5, check=True)
    assert not _keep_decays(8, 64, 64, 2, [4] * 5, check=True)


@pytest.mark.slow
def test_mosaic_gpu_state_64_recomputes_decays_in_the_adjoint_and_matches_reference():
    """The backward's other path (decays recomputed in the adjoint, `_keep_decays`): values and gradients."""
    _check_against_reference(SMALL, (1, 16, 64, 64), OPTION_SETS["bias_softplus_h0"])


def _split_backend(sm_count):
    return make_backend(functools.partial(pallas_mosaic_gpu_core, chunk=8, sm_count=sm_count), "split",
                        native_dtypes=True)


def test_mosaic_gpu_sequence_split_matches_reference_values_final_state_and_gradients():
    """batch 1 x 1 channel block on 4 SMs: 3 segments of one chunk of 8 steps (length 20 padded to 24), each
    scanned from a zero state, chained, and rescanned from its true start. A wrong decay product, a segment
    start off by one segment or a chain that drops the initial state changes the values, the final state or
    some gradient."""
    assert sequence_segments(1, 3, 4) == 3
    _check_against_reference(_split_backend(4), (1, 20, 64, 5), OPTION_SETS["all"])


def _kernel_names(jaxpr):
    """The names of the Mosaic GPU kernel calls in a jaxpr, nested jaxprs included, in order."""
    for eqn in jaxpr.eqns:
        if "name" in eqn.params and "mosaic_gpu" in str(eqn.params["name"]):
            name = str(eqn.params["name"])
            yield next(n for n in ("fwd", "bwd", "segment_adjoints") if f"selective_scan_{n}_" in name)
        for param in eqn.params.values():
            if isinstance(param, jax.extend.core.ClosedJaxpr):
                yield from _kernel_names(param.jaxpr)
            elif isinstance(param, jax.extend.core.Jaxpr):
                yield from _kernel_names(param)


def test_mosaic_gpu_sequence_split_backward_runs_one_full_backward_pass():
    """The split's hand-written VJP: its gradient program holds the two forward passes, one light adjoint pass
    and one backward kernel (differentiating both forward passes would hold two backward kernels)."""
    args, _ = make_inputs(0, 1, 64, 64, 16)
    fn = make_backend(functools.partial(pallas_mosaic_gpu_core, interpret=False, sm_count=8), "m",
                      native_dtypes=True)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4)))(*args[:5])
    assert sorted(_kernel_names(jaxpr.jaxpr)) == ["bwd", "fwd", "fwd", "segment_adjoints"]


@pytest.mark.slow
def test_mosaic_gpu_sequence_split_on_two_blocks_and_padded_segments():
    """batch 1 x 2 blocks on 8 SMs: 4 segments of 2 chunks (length 40 padded to 64, channels 70 to 128)."""
    assert sequence_segments(2, 5, 8) == 4
    _check_against_reference(_split_backend(8), (1, 40, 70, 5), OPTION_SETS["all"])


@pytest.mark.parametrize("programs,n_chunks,sm_count,segments", [
    (32, 512, 132, 8),      # the inference shape (1, 8192, 2048, 16): 256 CTAs, 2 per SM
    (2, 5, 8, 4), (2, 3, 8, 3),             # at most one segment per chunk
    (256, 128, 132, 1), (132, 128, 132, 1), (32, 512, None, 1), (32, 1, 132, 1)])
def test_sequence_segments_fill_the_sms_only_where_the_grid_does_not(programs, n_chunks, sm_count, segments):
    assert sequence_segments(programs, n_chunks, sm_count) == segments


# mamba-ssm's tests/ops/test_selective_scan.py tolerances for bfloat16 inputs (with z): outputs and dB, dC at
# (rtol, atol) = (3e-2, 5e-2), du at twice that, ddelta at (5 rtol, 10 atol), dA at (rtol, 5 atol), D, z,
# delta_bias and (here) the initial state at (rtol, atol).
_BF16 = (3e-2, 5e-2)
_BF16_GRADS = {"u": (2 * _BF16[0], 2 * _BF16[1]), "delta": (5 * _BF16[0], 10 * _BF16[1]),
               "A": (_BF16[0], 5 * _BF16[1]), "B": _BF16, "C": _BF16, "D": _BF16, "z": _BF16,
               "delta_bias": _BF16, "initial_state": _BF16}


def _check_bfloat16(fn, shape, options, seed=5):
    args, kwargs = make_inputs(seed, *shape, options.items(), dtype=jnp.bfloat16)
    y, h = jax.jit(lambda a: fn(*a, return_final_state=True, **kwargs))(args)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], *_BF16, what="values")
    names = [n for n, a in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), args) if a is not None]
    names += ["initial_state"] if "initial_state" in kwargs else []
    for name, g, g_ref in zip(names, grads_of_all_inputs(fn, args, kwargs),
                              grads_of_all_inputs(selective_scan_reference, args, kwargs)):
        assert g.dtype == g_ref.dtype
        assert_close_tree([g], [g_ref], *_BF16_GRADS[name], what=f"d{name}")


def test_mosaic_gpu_reads_and_writes_bfloat16_within_mamba_ssm_tolerances():
    """Plain delta (no bias, softplus or mask) and no D or z: u, delta, B and C reach the kernel as bfloat16, it
    writes y as bfloat16 and its backward reads dy as bfloat16."""
    _check_bfloat16(SMALL, (1, 12, 64, 16), dict(initial_state=True))


def test_mosaic_gpu_backend_hands_bfloat16_to_the_kernel_and_float32_to_the_others():
    args, kwargs = make_inputs(0, 1, 8, 4, 2, dtype=jnp.bfloat16)
    seen = {}

    def spy(name):
        def core(u, delta, A, B, C, h0, **y_dtype):
            seen[name] = (u.dtype, delta.dtype, B.dtype, C.dtype, *y_dtype.values())
            return jnp.zeros(u.shape, y_dtype.get("y_dtype", jnp.float32)), h0
        return core

    make_backend(spy("native"), "native", native_dtypes=True)(*args, **kwargs)
    make_backend(spy("upcast"), "upcast")(*args, **kwargs)
    make_backend(spy("softplus"), "softplus", native_dtypes=True)(*args, **dict(kwargs, delta_softplus=True))
    make_backend(spy("D"), "D", native_dtypes=True)(*args[:5], jnp.ones(4, jnp.bfloat16), **kwargs)
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert seen == {"native": (bf16,) * 5, "upcast": (f32,) * 4, "softplus": (bf16, f32, bf16, bf16, bf16),
                    "D": (bf16,) * 4 + (f32,)}


def _export(fn, dtype, semantics):
    b, L, c, n = 2, 40, 70, 16
    shapes = [(b, L, c), (b, L, c), (c, n), (b, L, n), (b, L, n)]
    sds = [jax.ShapeDtypeStruct(s, jnp.float32 if len(s) == 2 else dtype) for s in shapes]
    grad = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4)))
    return [export.export(f, platforms=["cuda"])(*sds).mlir_module() for f in (jax.jit(fn), grad)]


@pytest.mark.parametrize("semantics", sorted(SEMANTICS))
def test_mosaic_gpu_kernels_lower_for_cuda_under_each_lowering_semantics(semantics):
    """The Pallas -> Mosaic GPU lowering (layouts, shared-memory budget, TMA copies) of forward and backward for
    an sm_90 GPU, with bfloat16 inputs, padding of length, channels and state, and three chunks."""
    fn = make_backend(functools.partial(pallas_mosaic_gpu_core, chunk=16, lowering_semantics=semantics,
                                        interpret=False), "pallas_mosaic_gpu", native_dtypes=True)
    forward, backward = _export(fn, jnp.bfloat16, semantics)
    assert "mosaic_gpu" in forward and "selective_scan_fwd_mosaic_gpu" in forward
    assert "selective_scan_bwd_mosaic_gpu" not in forward
    assert "selective_scan_fwd_mosaic_gpu" in backward and "selective_scan_bwd_mosaic_gpu" in backward


def test_mosaic_gpu_gradient_writes_no_full_state_array():
    """Every array the kernels write to HBM and every XLA temporary is smaller than (batch, length, channels,
    state); the forward keeps one state per chunk of 8 steps."""
    batch, length, channels, state = 2, 64, 64, 16
    args, _ = make_inputs(9, batch, length, channels, state)
    fn = make_backend(functools.partial(pallas_mosaic_gpu_core, interpret=False), "m", native_dtypes=True)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4)))(*args[:5])

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars)
            for param in eqn.params.values():
                if isinstance(param, jax.extend.core.ClosedJaxpr):
                    yield from shapes(param.jaxpr)

    found = list(shapes(jaxpr.jaxpr))
    assert (batch, length // 8, channels, state) in found
    assert max(np.prod(s) for s in found) < batch * length * channels * state


def test_mosaic_gpu_rejects_bad_settings_before_tracing():
    sds = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, 64, 64), (1, 64, 64), (64, 64), (1, 64, 64),
                                                          (1, 64, 64), (1, 64, 64)]]
    core = functools.partial(pallas_mosaic_gpu_core, interpret=False)
    with pytest.raises(ValueError, match="needs .* bytes of shared memory at state size 64"):
        jax.eval_shape(functools.partial(core, chunk=64), *sds)
    with pytest.raises(ValueError, match="block_c: expected a positive multiple of 64, found 32"):
        jax.eval_shape(functools.partial(core, block_c=32), *sds)
    with pytest.raises(ValueError, match="lowering_semantics: expected one of"):
        jax.eval_shape(functools.partial(core, lowering_semantics="lanes"), *sds)


def test_mosaic_gpu_registry_and_tunables():
    assert kernels.tunables("pallas_mosaic_gpu") == {"chunk": 8, "block_c": 64, "max_concurrent_steps": 2,
                                                      "lowering_semantics": "warpgroup", "approx_math": True}
    assert "pallas_mosaic_gpu" in kernels.TUNABLE_BACKENDS and "pallas_mosaic_gpu" in kernels.BACKENDS
    with pytest.raises(ValueError, match="unknown tunables \\['num_warps'\\]"):
        tuned_backend("pallas_mosaic_gpu", num_warps=4)


class _FakeGpu:
    platform, device_kind = "gpu", "NVIDIA A100-SXM4-80GB"

    def __init__(self, compute_capability):
        self.compute_capability = compute_capability


@pytest.mark.parametrize("capability,supported", [("7.5", False), ("8.0", False), ("8.9", False), ("9.0", True),
                                                  ("10.0", True), ("12.0", True)])
def test_mosaic_gpu_runs_on_sm90_and_later_only(capability, supported):
    assert device_supported(_FakeGpu(capability)) is supported
    assert not device_supported(jax.devices("cpu")[0])


def test_pre_hopper_gpu_gets_a_clear_error_and_auto_falls_back_to_chunked(monkeypatch):
    """On an sm_80 GPU the Mosaic kernel says why it cannot run before tracing; with no Triton dialect either,
    `auto` takes `chunked` and `pallas` the Mosaic kernel (which then says why); on sm_90 both take Mosaic."""
    args, _ = make_inputs(0, 1, 16, 64, 8, [])
    without_triton = dataclasses.replace(registry.REGISTRY["pallas_triton"], module="no_triton_dialect_here")
    monkeypatch.setitem(registry.REGISTRY, "pallas_triton", without_triton)
    monkeypatch.setattr(jax, "devices", lambda *backend: [_FakeGpu("8.0")])
    with pytest.raises(RuntimeError, match=r"needs a GPU of compute capability 9\.0 or later .* found "
                                           r"'NVIDIA A100-SXM4-80GB' of compute capability 8\.0\. Use backend "
                                           r"'pallas_triton' .* or 'chunked'"):
        pallas_mosaic_gpu_core(*args[:5], jnp.zeros((1, 64, 8)), interpret=False)
    assert kernels.resolve_backend("auto", "cuda") == "chunked"
    assert kernels.resolve_backend("pallas", "cuda") == "pallas_mosaic_gpu"
    monkeypatch.setattr(jax, "devices", lambda *backend: [_FakeGpu("9.0")])
    assert kernels.resolve_backend("auto", "cuda") == kernels.resolve_backend("pallas", "cuda") == "pallas_mosaic_gpu"


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, dict(chunk=8, max_concurrent_steps=1), dict(chunk=8, block_c=128),
                                      dict(chunk=16, max_concurrent_steps=3, lowering_semantics="lane")])
@pytest.mark.parametrize("shape,options", [((2, 100, 70, 16), "all"), ((3, 67, 33, 5), "bias_softplus_h0"),
                                           ((1, 150, 130, 4), "mask"), ((1, 1, 1, 1), "all")])
def test_mosaic_gpu_matches_reference_on_larger_shapes_and_settings(settings, shape, options):
    _check_against_reference(tuned_backend("pallas_mosaic_gpu", **settings), shape, OPTION_SETS[options])


@pytest.mark.slow
@pytest.mark.parametrize("options", ["all", "plain"])
def test_mosaic_gpu_bfloat16_on_larger_shapes(options):
    _check_bfloat16(functools.partial(selective_scan, backend="pallas_mosaic_gpu"), (2, 70, 100, 16),
                    OPTION_SETS[options])


@pytest.mark.parametrize("state", [8, 16, 24, 32])
def test_channel_sums_reduce_scatter_leaves_each_warp_sum_where_the_unscrambling_reads_it(state):
    """The compiled backward's butterfly (`reduce_scatter`, the same code the kernel emits, here on numpy over
    32 lanes): lane l of the WGMMA layout starts with its two rows' (l // 4, l // 4 + 8) products summed, per
    quantity, 8-column tile and vector element; after the three steps the value in (slot, lane) must be the
    warp's sum over all 16 rows of the (quantity, column) that `_lane_slots` says the XLA side reads there."""
    from alignmamba_jax.kernels.pallas_mosaic_gpu import _lane_slots, reduce_scatter
    rng = np.random.default_rng(state)
    products = rng.normal(size=(2, 16, state))            # (quantity, row of the warp, column)
    lanes = np.arange(32)
    columns = [(q, 8 * j + 2 * (lanes % 4) + k) for q in range(2) for j in range(state // 8) for k in range(2)]
    start = [products[q, lanes // 4, col] + products[q, lanes // 4 + 8, col] for q, col in columns]
    final = reduce_scatter(start, lambda bit: (lanes >> bit) & 1 == 1, lambda x, d: x[lanes ^ d], np.add, np.where)
    n_slots, first, source = _lane_slots(state)
    assert len(final) == n_slots and sorted(first) == [(q, n) for q in range(2) for n in range(state)]
    sums = products.sum(1).reshape(-1)
    for slot, values in enumerate(final):
        np.testing.assert_allclose(values, sums[source[32 * slot:32 * (slot + 1)]], rtol=1e-12)


def test_the_wgmma_layout_is_the_one_the_channel_sums_read():
    """`_channel_sums_compiled` indexes the registers of Mosaic GPU's WGMMA layout (and of its per-row layout)
    directly: thread (warp, lane) holds rows 16 warp + 8 half + lane // 4 of each 64-row tile and columns
    8 j + 2 (lane % 4) + k, as PTX's wgmma accumulator fragment. A JAX that changes the layout fails here."""
    import jax.experimental.mosaic.gpu as mgpu
    layout = mgpu.WGMMA_LAYOUT
    assert (layout.tiling.tiles, layout.warp_dims, layout.lane_dims, layout.vector_dim) == (
        ((64, 8), (16, 8), (8, 8), (2,)), (-7,), (-3, -2), -1)
    assert layout.registers_shape((128, 32)) == (2, 4, 1, 1, 2, 1, 1, 1, 1)
    assert layout.reduce((1,)).registers_shape((128,)) == (2, 1, 2, 1, 1)


def test_approx_math_exponential_flushing_subnormal_decays_stays_within_mamba_ssm_bf16_tolerances():
    """`approx_math` (on by default) makes the kernels' exp2 ex2.approx.ftz.f32, which differs from
    ex2.approx.f32 only where the result is subnormal (flushed to zero; a subnormal input gives 2^0 = 1 either
    way). Interpret mode does not emulate it, so this measures the effect on the recurrence itself: the scan
    with every decay below 2^-126 flushed (and, as on the device, no gradient through a flushed decay), on
    inputs where a quarter or more of the decays are that small, against the exact scan, values and gradients of u,
    delta, A, B and C, at mamba-ssm's bf16 tolerances (it is in fact equal to float32 rounding)."""
    rng = np.random.default_rng(0)
    length, channels, state = 64, 16, 8
    u, B, C = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((length, channels), (length, state),
                                                                      (length, state)))
    delta = jnp.asarray(rng.uniform(0.0, 10.0, (length, channels)), jnp.float32)
    A = -jnp.asarray(rng.uniform(1.0, 30.0, (channels, state)), jnp.float32)

    def scan(u, delta, A, B, C, flush):
        def step(h, inputs):
            u_t, d_t, B_t, C_t = inputs
            a = jnp.exp2(d_t[:, None] * A * 1.4426950408889634)
            a = jnp.where(a < 2.0 ** -126, 0.0, a) if flush else a
            h = a * h + (d_t * u_t)[:, None] * B_t
            return h, h @ C_t
        return jax.lax.scan(step, jnp.zeros((channels, state)), (u, delta, B, C))[1]

    decays = np.exp(np.asarray(delta)[:, :, None] * np.asarray(A))
    assert (decays < 2.0 ** -126).mean() > 0.25
    def loss(u, delta, A, B, C, flush):
        y = scan(u, delta, A, B, C, flush)
        return jnp.sum(y ** 2), y

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True), static_argnums=5)
    ((_, y_exact), grads_exact), ((_, y), grads) = (value_and_grads(u, delta, A, B, C, f) for f in (False, True))
    assert_close_tree([y], [y_exact], *_BF16, what="values")
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C"), grads, grads_exact):
        assert_close_tree([g], [g_ref], *_BF16_GRADS[name], what=f"d{name}")
