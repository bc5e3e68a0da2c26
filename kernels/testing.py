"""Test inputs and an independent NumPy reference for the selective scan, shared by tests/test_kernels*.py
and usable by anyone testing their own scan against the same cases."""
import jax
import jax.numpy as jnp
import numpy as np

OPTION_SETS = {
    "plain": {},
    "all": dict(D=True, z=True, delta_bias=True, initial_state=True, mask=True, delta_softplus=True),
    "D_z": dict(D=True, z=True),
    "bias_softplus_h0": dict(delta_bias=True, delta_softplus=True, initial_state=True),
    "mask": dict(mask=True),
}


def make_inputs(seed, batch, length, channels, state, options=(), dtype=jnp.float32):
    """Positional args (u, delta, A, B, C, D, z, delta_bias) and keyword args of one scan call."""
    options = dict(options)
    k = jax.random.split(jax.random.PRNGKey(seed), 9)
    u = jax.random.normal(k[0], (batch, length, channels), dtype)
    if options.get("delta_softplus"):
        delta = jax.random.normal(k[1], (batch, length, channels), dtype)
    else:
        delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels))).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(k[2], (channels, state), dtype))
    B = jax.random.normal(k[3], (batch, length, state), dtype)
    C = jax.random.normal(k[4], (batch, length, state), dtype)
    D = jax.random.normal(k[5], (channels,), dtype) if options.get("D") else None
    z = jax.random.normal(k[6], (batch, length, channels), dtype) if options.get("z") else None
    bias = 0.3 * jax.random.normal(k[7], (channels,), dtype) if options.get("delta_bias") else None
    kwargs = {"delta_softplus": bool(options.get("delta_softplus"))}
    if options.get("initial_state"):
        kwargs["initial_state"] = jax.random.normal(k[8], (batch, channels, state), dtype)
    if options.get("mask"):
        mask = np.random.default_rng(seed).random((batch, length)) < 0.7
        mask[:, 0] = False
        kwargs["mask"] = jnp.asarray(mask)
    return [u, delta, A, B, C, D, z, bias], kwargs


def numpy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
               mask=None):
    """An independent float64 loop over batch, time, channel and state, written from the equations."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, length, channels = u.shape
    state = A.shape[1]
    h = np.zeros((batch, channels, state)) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros((batch, length, channels))
    for b in range(batch):
        for t in range(length):
            for c in range(channels):
                d = delta[b, t, c] + (0.0 if delta_bias is None else float(delta_bias[c]))
                if delta_softplus:
                    d = np.log1p(np.exp(d))
                if mask is None or mask[b, t]:
                    for n in range(state):
                        h[b, c, n] = np.exp(d * A[c, n]) * h[b, c, n] + d * B[b, t, n] * u[b, t, c]
                if mask is not None and not mask[b, t]:
                    continue                                     # a masked step's output is exactly 0
                out = sum(h[b, c, n] * C[b, t, n] for n in range(state))
                if D is not None:
                    out += float(D[c]) * u[b, t, c]
                if z is not None:
                    zz = float(z[b, t, c])
                    out *= zz / (1.0 + np.exp(-zz))
                y[b, t, c] = out
    return y, h


def weighted_loss(fn, args, kwargs):
    """A scalar loss that weights every output element and the final state differently."""
    y, h = fn(*args, return_final_state=True, **kwargs)
    dtype = jnp.promote_types(h.dtype, jnp.float32)
    wy = jnp.cos(jnp.arange(y.size, dtype=dtype)).reshape(y.shape)
    wh = jnp.sin(jnp.arange(h.size, dtype=dtype)).reshape(h.shape)
    return jnp.sum(y.astype(dtype) * wy) + jnp.sum(h * wh)


def grads_of_all_inputs(fn, args, kwargs):
    """Gradients w.r.t. every float input that is present (positional args, then initial_state)."""
    diff_pos = [i for i, a in enumerate(args) if a is not None]
    h0 = kwargs.get("initial_state")

    def loss(diff_args, h0):
        full = list(args)
        for i, a in zip(diff_pos, diff_args):
            full[i] = a
        kw = dict(kwargs, initial_state=h0) if h0 is not None else kwargs
        return weighted_loss(fn, full, kw)

    g_args, g_h0 = jax.jit(jax.grad(loss, argnums=(0, 1)))([args[i] for i in diff_pos], h0)
    return list(g_args) + ([g_h0] if h0 is not None else [])


def assert_close_tree(actual, expected, rtol, atol, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol,
                                   err_msg=f"{what} item {i}")
