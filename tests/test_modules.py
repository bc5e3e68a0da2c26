"""MambaMixer shapes, parameter names/dtypes, causality, masking and init statistics; the modality-aware MoE."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from alignmamba_jax.modules import (CausalDepthwiseConv, MambaMixer, MambaStack, ModalityAwareMambaLayer,
                                   ModalityAwareMoE)

# Tiny graphs: XLA's backend optimisations cost far more compile time than they save at run time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
D_MODEL = 8


def init_mixer(d_state=4, length=6, **kw):
    m = MambaMixer(D_MODEL, d_state=d_state, d_conv=3, scan_backend="reference", **kw)
    params = fast_jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((2, length, D_MODEL)))["params"]
    return m, params


def test_mixer_shapes_names_and_float32_ssm_params():
    m, params = init_mixer(dtype=jnp.bfloat16)
    d_inner, dt_rank = 2 * D_MODEL, 1
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {"in_proj": {"kernel": (D_MODEL, 2 * d_inner)},
                      "conv1d": {"kernel": (3, 1, d_inner), "bias": (d_inner,)},
                      "x_proj": {"kernel": (d_inner, dt_rank + 8)},
                      "dt_proj": {"kernel": (dt_rank, d_inner), "bias": (d_inner,)},
                      "A_log": (d_inner, 4), "D": (d_inner,),
                      "out_proj": {"kernel": (d_inner, D_MODEL)}}
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, D_MODEL))
    y = fast_jit(m.apply)({"params": params}, x.astype(jnp.bfloat16))
    assert y.shape == (2, 6, D_MODEL) and y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_causal_depthwise_conv_equals_the_equation_and_flax_grouped_conv_with_its_parameters(use_bias):
    k, features, length = 4, 5, 9
    conv = CausalDepthwiseConv(features, k, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
    grouped = nn.Conv(features, (k,), padding=((k - 1, 0),), feature_group_count=features, use_bias=use_bias)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, length, features))
    params = conv.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, grouped.init(jax.random.PRNGKey(1), x))
    kernel, xn = np.asarray(params["params"]["kernel"], np.float64), np.asarray(x, np.float64)
    expected = np.zeros(x.shape)
    for t in range(length):
        for i in range(k):
            if t - k + 1 + i >= 0:
                expected[:, t] += kernel[i, 0] * xn[:, t - k + 1 + i]
    if use_bias:
        expected += np.asarray(params["params"]["bias"])
    np.testing.assert_allclose(fast_jit(conv.apply)(params, x), expected, rtol=1e-5, atol=1e-6)

    def loss(module, p, v):
        return jnp.sum(jnp.sin(module.apply(p, v)))

    grads = fast_jit(jax.grad(functools.partial(loss, conv), argnums=(0, 1)))(params, x)
    grads_grouped = fast_jit(jax.grad(functools.partial(loss, grouped), argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, grads_grouped)


def test_mixer_is_causal():
    m, params = init_mixer()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, D_MODEL))
    jac = fast_jit(jax.jacrev(lambda v: m.apply({"params": params}, v)))(x)[0, :, :, 0, :, :]   # (t, o, s, i)
    strength = np.abs(np.asarray(jac)).sum(axis=(1, 3))                             # (t_out, t_in)
    assert np.all(strength[np.triu_indices(6, k=1)] == 0)
    assert np.all(np.diag(strength) > 0) and np.all(np.diag(strength, k=-2) > 0)


def test_masked_tokens_do_not_influence_valid_ones():
    m, params = init_mixer(length=7)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 7, D_MODEL))
    mask = jnp.array([[True, True, False, True, True, False, False]])
    noise = jax.random.normal(jax.random.PRNGKey(3), x.shape) * 10 * (~mask)[..., None]
    apply = fast_jit(m.apply)
    y1 = apply({"params": params}, x, mask)
    y2 = apply({"params": params}, x + noise, mask)
    np.testing.assert_allclose(y1[mask], y2[mask], rtol=1e-5, atol=1e-6)
    # Right padding: the valid prefix equals the unpadded run.
    y_short = apply({"params": params}, x[:, :2])
    np.testing.assert_allclose(y1[:, :2], y_short, rtol=1e-5, atol=1e-6)


def test_init_statistics_follow_mamba_ssm():
    dt_min, dt_max = 0.001, 0.1
    m = MambaMixer(64, d_state=16, scan_backend="reference", dt_min=dt_min, dt_max=dt_max)
    params = fast_jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2, 64)))["params"]
    d_inner, dt_rank = 128, 4
    A = -np.exp(np.asarray(params["A_log"]))
    np.testing.assert_allclose(A, -np.tile(np.arange(1, 17), (d_inner, 1)), rtol=1e-6)
    np.testing.assert_array_equal(params["D"], np.ones(d_inner))
    dt = np.log1p(np.exp(np.asarray(params["dt_proj"]["bias"], np.float64)))      # softplus(bias)
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    log_u = (np.log(dt) - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))   # ~ U(0, 1)
    assert abs(log_u.mean() - 0.5) < 0.1 and abs(log_u.std() - math.sqrt(1 / 12)) < 0.06
    w = np.asarray(params["dt_proj"]["kernel"])
    assert np.abs(w).max() <= dt_rank ** -0.5 and w.std() > 0.4 * dt_rank ** -0.5
    assert np.abs(np.asarray(params["conv1d"]["kernel"])).max() <= 1 / math.sqrt(4)
    assert np.abs(np.asarray(params["in_proj"]["kernel"])).max() <= 1 / math.sqrt(64)


def test_stack_shapes_and_out_proj_rescaling():
    stack = MambaStack(D_MODEL, n_layers=4, d_state=4, scan_backend="reference")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, D_MODEL))
    params = fast_jit(stack.init)(jax.random.PRNGKey(1), x)["params"]
    assert fast_jit(stack.apply)({"params": params}, x).shape == (2, 5, D_MODEL)
    assert set(params) == {"block_0", "block_1", "block_2", "block_3", "norm_f"}
    bound = np.abs(np.asarray(params["block_0"]["mixer"]["out_proj"]["kernel"])).max()
    assert bound <= 1 / math.sqrt(2 * D_MODEL) / math.sqrt(4)
    assert "scale" in params["block_0"]["norm"]


def test_moe_routes_each_token_to_shared_and_its_own_experts():
    moe = ModalityAwareMoE(num_modalities=3, d_model=4, num_shared_experts=2, hidden_mult=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4))
    p = fast_jit(moe.init)(jax.random.PRNGKey(1), x)["params"]
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(np.float32), p)  # biases != 0
    y = np.asarray(fast_jit(moe.apply)({"params": p}, x))
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    xn = np.asarray(x)
    for k in range(3):
        spec = gelu(xn[:, :, k] @ p["specific_up"]["kernel"][k] + p["specific_up"]["bias"][k])
        spec = spec @ p["specific_down"]["kernel"][k] + p["specific_down"]["bias"][k]
        shared = sum(gelu(xn[:, :, k] @ p[f"shared_{e}_up"]["kernel"] + p[f"shared_{e}_up"]["bias"])
                     @ p[f"shared_{e}_down"]["kernel"] + p[f"shared_{e}_down"]["bias"] for e in range(2)) / 2
        np.testing.assert_allclose(y[:, :, k], spec + shared, rtol=1e-4, atol=1e-5)


def test_modality_aware_layer_shapes_and_mask():
    layer = ModalityAwareMambaLayer(num_modalities=3, d_model=D_MODEL, d_state=4, scan_backend="reference")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D_MODEL))
    mask = jnp.ones((2, 12), bool).at[1, 6:].set(False)
    p = fast_jit(layer.init)(jax.random.PRNGKey(1), x, mask)["params"]
    y = fast_jit(layer.apply)({"params": p}, x, mask)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert set(p) == {"mamba", "moe_norm", "moe"}


def test_modality_aware_layer_dense_mixer_is_one_mlp_of_the_moes_size():
    """channel_mixer="dense": one GELU MLP d -> (shared + M) * hidden_mult * d -> d on every token, the same
    parameter count as the MoE but for (shared + M - 1) * d output biases; the Mamba part is shared."""
    make = lambda mixer: ModalityAwareMambaLayer(num_modalities=3, d_model=D_MODEL, d_state=4,  # noqa: E731
                                                 scan_backend="reference", num_shared_experts=2, hidden_mult=2,
                                                 channel_mixer=mixer)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D_MODEL))
    mask = jnp.ones((2, 12), bool)
    moe, dense = (fast_jit(make(m).init)(jax.random.PRNGKey(1), x, mask)["params"] for m in ("moe", "dense"))
    assert set(dense) == {"mamba", "moe_norm", "mlp_up", "mlp_down"}
    assert dense["mlp_up"]["kernel"].shape == (D_MODEL, 5 * 2 * D_MODEL)
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(moe) - count(dense) == (2 + 3 - 1) * D_MODEL
    dense = jax.tree.map(lambda p: p + 0.05, dense)        # nonzero biases and output projection
    y, state = make("dense").apply({"params": dense}, x, mask, capture_intermediates=True)
    seen = state["intermediates"]
    mixed, normed = seen["mamba"]["__call__"][0], seen["moe_norm"]["__call__"][0]
    up, down = dense["mlp_up"], dense["mlp_down"]
    expected = mixed + jax.nn.gelu(normed @ up["kernel"] + up["bias"]) @ down["kernel"] + down["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_layer", [
    lambda: MambaMixer(D_MODEL, d_state=4, d_conv=3, scan_backend="chunked", bias=True),
    lambda: ModalityAwareMambaLayer(num_modalities=3, d_model=D_MODEL, d_state=4, d_conv=3, scan_backend="chunked"),
], ids=["mixer", "modality_aware_layer"])
def test_inf_and_nan_in_masked_tokens_reach_no_valid_output_and_no_gradient(make_layer):
    layer = make_layer()
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, D_MODEL))
    mask = jnp.array([[True, True, False, True, False, True, True, False, False]] * 2).at[1, 5:].set(False)
    bad = jnp.where(mask[..., None], x, jnp.array([jnp.inf, jnp.nan, -jnp.inf] * 3)[None, :, None])
    params = fast_jit(layer.init)(jax.random.PRNGKey(5), x, mask)["params"]
    weights = jax.random.normal(jax.random.PRNGKey(6), x.shape)

    @fast_jit
    def valid_loss_and_grads(params, x):
        def loss(params, x):
            return jnp.sum(jnp.where(mask[..., None], layer.apply({"params": params}, x, mask) * weights, 0.0))
        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    value, (g_params, g_x) = valid_loss_and_grads(params, bad)
    clean_value, (clean_params, clean_x) = valid_loss_and_grads(params, x)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    for g, clean in zip(jax.tree.leaves(g_params), jax.tree.leaves(clean_params)):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, clean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_x)[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(g_x, clean_x, rtol=1e-5, atol=1e-6)
