"""Masked steps are exact identity steps with output 0 in every backend, whatever sits under the mask, and empty
inputs (batch 0 or length 0) give the empty result in every backend.

Pallas backends run in interpret mode here. The rule lives in `common.make_backend` (and the reference), before
any core runs, so one small shape shows it for every backend.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax.kernels import selective_scan, selective_scan_reference
from alignmamba_jax.kernels.testing import OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs

BACKENDS = ("reference", "associative", "chunked", "cpu_ffi", "pallas", "pallas_tpu")
SEQUENCE_ARGS = {"u": 0, "delta": 1, "B": 3, "C": 4, "z": 6}
POISON = {"u": np.inf, "delta": np.nan, "B": -np.inf, "C": np.nan, "z": np.inf}


def poisoned(args, mask):
    """`args` with inf, -inf or NaN (POISON) at every masked step of u, delta, B, C and z."""
    out = list(args)
    masked = ~np.asarray(mask)[:, :, None]
    for name, i in SEQUENCE_ARGS.items():
        out[i] = jnp.where(masked, jnp.asarray(POISON[name], args[i].dtype), args[i])
    return out


def inputs():
    return make_inputs(11, 2, 11, 3, 2, OPTION_SETS["all"].items())


@functools.lru_cache
def clean_reference():
    """Values and gradients of the reference on the same inputs with ordinary values under the mask."""
    args, kwargs = inputs()
    return (selective_scan_reference(*args, return_final_state=True, **kwargs),
            grads_of_all_inputs(selective_scan_reference, args, kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_or_nan_under_the_mask_changes_no_value_and_no_gradient(backend):
    args, kwargs = inputs()
    mask = kwargs["mask"]
    bad = poisoned(args, mask)
    fn = functools.partial(selective_scan, backend=backend)
    y, h = jax.jit(lambda a: fn(*a, return_final_state=True, **kwargs))(bad)
    (y_ref, h_ref), grads_ref = clean_reference()
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(h))
    assert_close_tree([y, h], [y_ref, h_ref], rtol=1e-4, atol=1e-4, what="values")
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)   # a masked step's output is 0

    grads = grads_of_all_inputs(fn, bad, kwargs)
    assert all(np.all(np.isfinite(g)) for g in grads)
    for name, i in SEQUENCE_ARGS.items():   # nothing flows into a masked input
        np.testing.assert_array_equal(np.asarray(grads[i])[~np.asarray(mask)], 0.0, err_msg=name)
    assert_close_tree(grads, grads_ref, rtol=1e-3, atol=1e-3, what="gradients")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 3, 2), (2, 0, 3, 2)])
def test_empty_batch_or_length_returns_the_empty_output_and_the_initial_state(backend, shape):
    args, kwargs = make_inputs(12, *shape, OPTION_SETS["bias_softplus_h0"].items())
    kwargs["mask"] = jnp.ones(shape[:2], bool)
    y, h = selective_scan(*args, return_final_state=True, backend=backend, **kwargs)
    assert y.shape == args[0].shape and y.dtype == args[0].dtype
    assert h.dtype == jnp.float32
    np.testing.assert_array_equal(h, kwargs["initial_state"])
    g = jax.grad(lambda h0: jnp.sum(selective_scan(*args, return_final_state=True, backend=backend,
                                                   **dict(kwargs, initial_state=h0))[1] * 3.0))(
        kwargs["initial_state"])
    np.testing.assert_array_equal(g, np.full(g.shape, 3.0))
