"""Tests of the reference scan and the XLA backends (associative, chunked) and the public API.

The reference is checked against an independent NumPy loop and, in float64, against finite differences;
every backend is then checked against the reference, values and gradients of all inputs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax.kernels import selective_scan, selective_scan_reference, selective_state_update
from alignmamba_jax.kernels.chunked import chunked_core
from alignmamba_jax.kernels.common import make_backend
from alignmamba_jax.kernels.testing import (OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs,
                                            numpy_scan, weighted_loss)

BACKENDS = {
    "associative": functools.partial(selective_scan, backend="associative"),
    "chunked": functools.partial(selective_scan, backend="chunked"),
    "chunked_4": make_backend(functools.partial(chunked_core, chunk=4), "chunked_4"),
}
CASES = [((1, 1, 1, 1), "all"), ((2, 7, 3, 4), "plain"), ((2, 7, 3, 4), "mask"), ((2, 9, 3, 2), "bias_softplus_h0"),
         ((1, 33, 5, 2), "all"), ((2, 70, 4, 16), "all")]


def _call(fn, args, kwargs, **extra):
    return fn(*args, **kwargs, **extra)


@pytest.mark.parametrize("shape,options", [((2, 5, 3, 2), "all"), ((2, 4, 2, 2), "mask")])
def test_reference_matches_numpy_loop(shape, options):
    args, kwargs = make_inputs(0, *shape, OPTION_SETS[options].items())
    y, h = _call(selective_scan_reference, args, kwargs, return_final_state=True)
    y_np, h_np = numpy_scan(*args, **kwargs)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, h_np, rtol=1e-5, atol=1e-5)


def test_reference_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        args, kwargs = make_inputs(1, 2, 5, 3, 2, OPTION_SETS["all"].items(), dtype=jnp.float64)
        grads = grads_of_all_inputs(selective_scan_reference, args, kwargs)
        present = [i for i, a in enumerate(args) if a is not None]
        inputs = [args[i] for i in present] + [kwargs["initial_state"]]

        @jax.jit
        def loss(inputs):
            full = list(args)
            for i, x in zip(present, inputs):
                full[i] = x
            return weighted_loss(selective_scan_reference, full, dict(kwargs, initial_state=inputs[-1]))

        rng = np.random.default_rng(0)
        eps = 1e-6
        for k, g in enumerate(grads):
            assert g.dtype == jnp.float64
            v = rng.standard_normal(inputs[k].shape)
            plus, minus = list(inputs), list(inputs)
            plus[k], minus[k] = inputs[k] + eps * v, inputs[k] - eps * v
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.sum(g * v)), float(fd), rtol=1e-6, atol=1e-8, err_msg=str(k))


# lax.associative_scan's gradient compiles slowly: it gets the short cases with the most options only.
@pytest.mark.parametrize("backend,shape,options",
                         [(b, s, o) for b in BACKENDS for s, o in CASES
                          if b == "chunked" or (s[1] < 40 and (b != "associative" or o == "all"))])
def test_backend_matches_reference_values_and_gradients(backend, shape, options):
    fn = BACKENDS[backend]
    args, kwargs = make_inputs(2, *shape, OPTION_SETS[options].items())
    y, h = jax.jit(lambda a: _call(fn, a, kwargs, return_final_state=True))(args)
    y_ref, h_ref = _call(selective_scan_reference, args, kwargs, return_final_state=True)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], rtol=1e-4, atol=1e-4, what="values")
    assert_close_tree(grads_of_all_inputs(fn, args, kwargs),
                      grads_of_all_inputs(selective_scan_reference, args, kwargs), rtol=1e-3, atol=1e-3,
                      what="gradients")


@pytest.mark.parametrize("backend", ["chunked"])
def test_split_in_two_with_carried_state_equals_whole_scan(backend):
    args, kwargs = make_inputs(3, 2, 45, 3, 4, OPTION_SETS["all"].items())
    whole, h_whole = _call(functools.partial(selective_scan, backend=backend), args, kwargs,
                           return_final_state=True)
    k = 19
    seq = lambda x, s: None if x is None else x[:, s]
    first = [seq(a, slice(None, k)) if a is not None and a.ndim == 3 else a for a in args]
    second = [seq(a, slice(k, None)) if a is not None and a.ndim == 3 else a for a in args]
    kw1 = dict(kwargs, mask=kwargs["mask"][:, :k])
    y1, h1 = _call(functools.partial(selective_scan, backend=backend), first, kw1, return_final_state=True)
    kw2 = dict(kwargs, mask=kwargs["mask"][:, k:], initial_state=h1)
    y2, h2 = _call(functools.partial(selective_scan, backend=backend), second, kw2, return_final_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h_whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunked"])
def test_jit_vmap_and_remat(backend):
    fn = functools.partial(selective_scan, backend=backend, delta_softplus=True)
    batches = [make_inputs(s, 2, 11, 3, 2)[0][:5] for s in range(3)]
    stacked = [jnp.stack(xs) for xs in zip(*batches)]
    y_vmap = jax.jit(jax.vmap(fn))(*stacked)
    for i, b in enumerate(batches):
        np.testing.assert_allclose(y_vmap[i], selective_scan_reference(*b, delta_softplus=True), rtol=1e-5,
                                   atol=1e-5)
    loss = lambda *a: jnp.sum(fn(*a) ** 2)
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3, 4)))(*batches[0])
    g_ref = jax.grad(lambda *a: jnp.sum(selective_scan_reference(*a, delta_softplus=True) ** 2),
                     argnums=(0, 1, 2, 3, 4))(*batches[0])
    assert_close_tree(g_remat, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "associative", "chunked"])
def test_no_nan_for_extreme_delta_and_A(backend):
    args, kwargs = make_inputs(4, 2, 9 if backend == "associative" else 37, 3, 4, OPTION_SETS["D_z"].items())
    args[1] = jnp.full_like(args[1], 1e3)
    args[2] = jnp.full_like(args[2], -1e3).at[0, 0].set(-1e-3)
    fn = functools.partial(selective_scan, backend=backend)
    y = fn(*args)
    grads = grads_of_all_inputs(fn, args, kwargs)
    assert np.all(np.isfinite(y))
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert_close_tree([y], [selective_scan_reference(*args)], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["chunked"])
def test_bfloat16_inputs_within_mamba_tolerances(backend):
    args, kwargs = make_inputs(5, 2, 40, 4, 8, OPTION_SETS["all"].items(), dtype=jnp.bfloat16)
    y, h = _call(functools.partial(selective_scan, backend=backend), args, kwargs, return_final_state=True)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    up = [None if a is None else a.astype(jnp.float32) for a in args]
    kw = dict(kwargs, initial_state=kwargs["initial_state"].astype(jnp.float32))
    y_ref, h_ref = _call(selective_scan_reference, up, kw, return_final_state=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=3e-2, atol=5e-2)
    np.testing.assert_allclose(h, h_ref, rtol=3e-2, atol=5e-2)


def test_masked_steps_are_identity_steps():
    args, kwargs = make_inputs(6, 1, 12, 3, 2)
    mask = jnp.arange(12)[None] % 3 != 1
    y_masked, h_masked = selective_scan(*args, mask=mask, return_final_state=True, backend="chunked")
    kept = np.flatnonzero(np.asarray(mask[0]))
    compact = [a[:, kept] if a is not None and a.ndim == 3 else a for a in args]
    y_compact, h_compact = selective_scan(*compact, return_final_state=True, backend="chunked")
    np.testing.assert_allclose(y_masked[:, kept], y_compact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_masked, h_compact, rtol=1e-5, atol=1e-5)


def test_selective_state_update_steps_equal_the_scan():
    args, kwargs = make_inputs(7, 2, 6, 3, 4, OPTION_SETS["all"].items())
    u, delta, A, B, C, D, z, bias = args
    y_scan, h_scan = selective_scan(*args, delta_softplus=True, initial_state=kwargs["initial_state"],
                                    return_final_state=True)
    state = kwargs["initial_state"]
    for t in range(u.shape[1]):
        y_t, state = selective_state_update(state, u[:, t], delta[:, t], A, B[:, t], C[:, t], D=D, z=z[:, t],
                                            dt_bias=bias, dt_softplus=True)
        np.testing.assert_allclose(y_t, y_scan[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, h_scan, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_matches_reference():
    args, _ = make_inputs(8, 2, 35, 3, 2)
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(selective_scan(*args[:5]), selective_scan_reference(*args[:5]), rtol=1e-5,
                               atol=1e-5)


def test_memory_chunked_keeps_no_full_state_tensor_while_associative_does():
    batch, length, channels, state = 2, 512, 64, 16
    full_state_bytes = batch * length * channels * state * 4
    args, _ = make_inputs(9, batch, length, channels, state)

    def temp_bytes(backend):
        loss = lambda *a: jnp.sum(selective_scan(*a, backend=backend))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args[:5]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("associative") >= full_state_bytes
    assert temp_bytes("chunked") < full_state_bytes


@pytest.mark.parametrize("change,match", [
    (lambda a, k: (a[:0] + [a[0][0]] + a[1:], k), r"u: expected shape \(batch, length, channels\), found \(7, 3\)"),
    (lambda a, k: ([a[0], a[1][:, :5]] + a[2:], k), r"delta: expected shape \(batch=2, length=7, channels=3\), "
                                                    r"found \(2, 5, 3\)"),
    (lambda a, k: (a[:2] + [a[2][0]] + a[3:], k), r"A: expected shape \(channels=3, state\), found \(4,\)"),
    (lambda a, k: (a[:3] + [a[3][..., :2]] + a[4:], k), r"B: expected shape .*state=4\), found \(2, 7, 2\)"),
    (lambda a, k: (a[:4] + [a[4][:1]] + a[5:], k), r"C: expected shape \(batch=2.*found \(1, 7, 4\)"),
    (lambda a, k: (a[:5] + [jnp.ones(4)] + a[6:], k), r"D: expected shape \(channels=3\), found \(4,\)"),
    (lambda a, k: (a[:6] + [jnp.ones((2, 7))] + a[7:], k), r"z: expected shape .*found \(2, 7\)"),
    (lambda a, k: (a[:7] + [jnp.ones((3, 1))], k), r"delta_bias: expected shape \(channels=3\), found \(3, 1\)"),
    (lambda a, k: ([a[0].astype(jnp.int32)] + a[1:], k), r"u: expected a floating dtype.*found int32"),
    (lambda a, k: (a, dict(k, initial_state=jnp.zeros((2, 4, 3)))), r"initial_state: expected shape "
                                                                    r"\(batch=2, channels=3, state=4\)"),
    (lambda a, k: (a, dict(k, mask=jnp.ones((2, 6), bool))), r"mask: expected shape \(batch=2, length=7\)"),
    (lambda a, k: (a, dict(k, mask=jnp.ones((2, 7)))), r"mask: expected a bool array"),
    (lambda a, k: (a[:2] + [-a[2]] + a[3:], k), r"A: expected real negative values"),
    (lambda a, k: (a, dict(k, backend="cuda_fast")), r"backend: expected one of .*found 'cuda_fast'"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(change, match):
    args, kwargs = make_inputs(10, 2, 7, 3, 4, OPTION_SETS["D_z"].items())
    args[7] = jnp.zeros(3)
    args, kwargs = change(args, kwargs)
    with pytest.raises(ValueError, match=match):
        selective_scan(*args, **kwargs)


def test_bad_step_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"B: expected shape \(batch=2, state=4\), found \(2, 5\)"):
        selective_state_update(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), -jnp.ones((3, 4)),
                               jnp.zeros((2, 5)), jnp.zeros((2, 4)))
