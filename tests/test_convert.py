"""PyTorch-layout <-> Flax conversion of the Mamba mixer, checked against an independent NumPy forward."""
import functools

import jax
import numpy as np
import pytest

from alignmamba_jax.convert import mamba_mixer_params_from_torch, mamba_mixer_params_to_torch
from alignmamba_jax.modules import MambaMixer


# Tiny graphs: XLA's backend optimisations cost far more compile time than they save at run time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

D_MODEL, D_STATE, D_CONV, EXPAND = 8, 4, 3, 2
D_INNER, DT_RANK = EXPAND * D_MODEL, 1


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def silu(x):
    return x / (1 + np.exp(-x))


def mamba_forward_numpy(sd, x):
    """mamba-ssm Mamba.forward written out from its equations, on PyTorch-layout weights, one sequence."""
    length = x.shape[0]
    xz = x @ sd["in_proj.weight"].T
    xs, z = xz[:, :D_INNER], xz[:, D_INNER:]
    w = sd["conv1d.weight"][:, 0, :]                              # (d_inner, d_conv)
    padded = np.concatenate([np.zeros((D_CONV - 1, D_INNER)), xs], axis=0)
    conv = np.stack([np.sum(w.T * padded[t:t + D_CONV], axis=0) for t in range(length)]) + sd["conv1d.bias"]
    u = silu(conv)
    x_dbl = u @ sd["x_proj.weight"].T
    dt_low, B, C = x_dbl[:, :DT_RANK], x_dbl[:, DT_RANK:DT_RANK + D_STATE], x_dbl[:, DT_RANK + D_STATE:]
    dt = softplus(dt_low @ sd["dt_proj.weight"].T + sd["dt_proj.bias"])
    A = -np.exp(sd["A_log"])
    h = np.zeros((D_INNER, D_STATE))
    ys = []
    for t in range(length):
        h = np.exp(dt[t][:, None] * A) * h + (dt[t] * u[t])[:, None] * B[t][None, :]
        ys.append(h @ C[t] + sd["D"] * u[t])
    y = np.stack(ys) * silu(z)
    return y @ sd["out_proj.weight"].T


def random_torch_state_dict(rng):
    return {
        "in_proj.weight": rng.normal(0, 0.3, (2 * D_INNER, D_MODEL)),
        "conv1d.weight": rng.normal(0, 0.5, (D_INNER, 1, D_CONV)),
        "conv1d.bias": rng.normal(0, 0.1, (D_INNER,)),
        "x_proj.weight": rng.normal(0, 0.3, (DT_RANK + 2 * D_STATE, D_INNER)),
        "dt_proj.weight": rng.normal(0, 0.5, (D_INNER, DT_RANK)),
        "dt_proj.bias": rng.normal(-3, 0.5, (D_INNER,)),
        "A_log": np.log(rng.uniform(0.5, 4, (D_INNER, D_STATE))),
        "D": rng.normal(1, 0.2, (D_INNER,)),
        "out_proj.weight": rng.normal(0, 0.3, (D_MODEL, D_INNER)),
    }


def mixer():
    return MambaMixer(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, scan_backend="reference")


def test_converted_torch_weights_reproduce_numpy_forward():
    rng = np.random.default_rng(0)
    sd = {k: v.astype(np.float32) for k, v in random_torch_state_dict(rng).items()}
    x = rng.normal(size=(2, 7, D_MODEL)).astype(np.float32)
    params = mamba_mixer_params_from_torch({"layers.0.mixer." + k: v for k, v in sd.items()},
                                           prefix="layers.0.mixer.")
    out = fast_jit(mixer().apply)({"params": params}, x)
    ref = np.stack([mamba_forward_numpy({k: v.astype(np.float64) for k, v in sd.items()}, x[n].astype(np.float64))
                    for n in range(2)])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_round_trips_and_tree_matches_flax_init():
    rng = np.random.default_rng(1)
    sd = random_torch_state_dict(rng)
    back = mamba_mixer_params_to_torch(mamba_mixer_params_from_torch(sd))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].astype(back[k].dtype))
    init = mixer().init(jax.random.PRNGKey(0), np.zeros((1, 5, D_MODEL), np.float32))["params"]
    again = mamba_mixer_params_from_torch(mamba_mixer_params_to_torch(init))
    assert jax.tree.structure(jax.tree.map(np.asarray, dict(init))) == jax.tree.structure(again)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert mamba_mixer_params_to_torch(init)["conv1d.weight"].shape == (D_INNER, 1, D_CONV)


def test_missing_key_is_a_clear_error():
    sd = random_torch_state_dict(np.random.default_rng(2))
    del sd["A_log"]
    with pytest.raises(ValueError, match="A_log"):
        mamba_mixer_params_from_torch(sd)
