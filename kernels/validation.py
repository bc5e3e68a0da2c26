"""Input checks for `selective_scan` and `selective_state_update`, run on shapes and dtypes before tracing.

Every failure is a ValueError naming the argument, the expected shape (in the contract's dimension names)
and the shape that was found, so a caller sees the mistake at the call site, not deep inside JAX.
"""
import jax
import jax.numpy as jnp
import numpy as np

from alignmamba_jax.kernels.registry import BACKENDS


def _shape(x):
    return tuple(np.shape(x))


def _require_float(name, x):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype (float32/bfloat16/float16/float64), "
                         f"found {dtype} with shape {_shape(x)}")


def _require_shape(name, x, expected, names):
    found = _shape(x)
    if len(found) != len(expected) or any(e is not None and e != f for e, f in zip(expected, found)):
        want = "(" + ", ".join(f"{n}={e}" if e is not None else n for n, e in zip(names, expected)) + ")"
        raise ValueError(f"{name}: expected shape {want}, found {found}")


def _require_negative_real(A):
    if jnp.iscomplexobj(A):
        raise ValueError(f"A: expected a real negative matrix (channels, state), found complex {_shape(A)}")
    try:
        values = np.asarray(A, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return                                                      # traced (e.g. -exp(A_log) under jit)
    if np.any(values > 0):
        raise ValueError(f"A: expected real negative values (channels, state) (a decaying state), found "
                         f"max {float(values.max())} in shape {_shape(A)}")


def validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, mask, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, found {backend!r}")
    if np.ndim(u) != 3:
        raise ValueError(f"u: expected shape (batch, length, channels), found {_shape(u)}")
    batch, length, channels = _shape(u)
    if np.ndim(A) != 2:
        raise ValueError(f"A: expected shape (channels={channels}, state), found {_shape(A)}")
    state = _shape(A)[1]
    bl, blc, cn, bln = ("batch", "length"), ("batch", "length", "channels"), ("channels", "state"), \
        ("batch", "length", "state")
    _require_shape("delta", delta, (batch, length, channels), blc)
    _require_shape("A", A, (channels, state), cn)
    _require_shape("B", B, (batch, length, state), bln)
    _require_shape("C", C, (batch, length, state), bln)
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _require_float(name, x)
    _require_negative_real(A)
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _require_shape(name, x, (channels,), ("channels",))
            _require_float(name, x)
    if z is not None:
        _require_shape("z", z, (batch, length, channels), blc)
        _require_float("z", z)
    if initial_state is not None:
        _require_shape("initial_state", initial_state, (batch, channels, state), ("batch", "channels", "state"))
        _require_float("initial_state", initial_state)
    if mask is not None:
        _require_shape("mask", mask, (batch, length), bl)
        if jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"mask: expected a bool array (batch, length), found {jnp.result_type(mask)} "
                             f"with shape {_shape(mask)}")


def validate_step_inputs(state, x, dt, A, B, C, D, z, dt_bias):
    if np.ndim(x) != 2:
        raise ValueError(f"x: expected shape (batch, channels), found {_shape(x)}")
    batch, channels = _shape(x)
    if np.ndim(A) != 2:
        raise ValueError(f"A: expected shape (channels={channels}, state), found {_shape(A)}")
    n = _shape(A)[1]
    _require_shape("state", state, (batch, channels, n), ("batch", "channels", "state"))
    _require_shape("dt", dt, (batch, channels), ("batch", "channels"))
    _require_shape("A", A, (channels, n), ("channels", "state"))
    _require_shape("B", B, (batch, n), ("batch", "state"))
    _require_shape("C", C, (batch, n), ("batch", "state"))
    for name, v in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _require_float(name, v)
    _require_negative_real(A)
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None:
            _require_shape(name, v, (channels,), ("channels",))
            _require_float(name, v)
    if z is not None:
        _require_shape("z", z, (batch, channels), ("batch", "channels"))
        _require_float("z", z)
