"""Models: every ablation switch and missing modalities run forward + backward under jit; the wiring of OT, MMD
and the interleave is checked against the pure functions; masked values are inert (NaN and inf included); a
sample without its anchor uses its other modalities; the model spec is built and checked from the config; a tiny
batch is overfit."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignmamba_jax.align import mmd, ot_align, segment_mean_resample, time_contrastive_loss
from alignmamba_jax.models import TokenDense, create_model, default_model_config, interleave_time_major, masked_pool

# Tiny graphs: XLA's backend optimisations cost far more compile time than they save at run time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
MODS = ("text", "audio", "vision")
DIMS = {"text": 6, "audio": 3, "vision": 4}
LENS = {"text": 5, "audio": 7, "vision": 4}


def tiny_config(**overrides):
    cfg = default_model_config()
    cfg.d_model, cfg.n_layers, cfg.d_state, cfg.n_heads = 8, 1, 2, 2
    cfg.scan_backend = "reference"
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if cfg.name == "alignmamba2" and cfg.use_sinkhorn and "sinkhorn_iters" not in overrides:
        cfg.sinkhorn_iters = 5
    return cfg


def make_batch(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    feats = {m: rng.normal(size=(batch, LENS[m], DIMS[m])).astype(np.float32) for m in MODS}
    masks = {m: np.arange(LENS[m])[None, :] < rng.integers(1, LENS[m] + 1, size=(batch, 1)) for m in MODS}
    masks["audio"][1] = False               # sample 1: audio missing entirely
    masks["vision"][2, :] = False           # sample 2: vision missing entirely
    for m in MODS:
        feats[m][~masks[m]] = 0.0              # zero padding, as real data has: zero vectors must stay finite
    return feats, masks


def run_forward_backward(cfg, feats, masks, task="regression", num_classes=1, modalities=MODS):
    model = create_model(cfg, modalities, "text", DIMS, task=task, num_classes=num_classes)

    def loss_fn(p):
        out = model.apply({"params": p}, feats, masks, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        pred = out["prediction"]
        task_loss = jnp.mean(pred ** 2) if task == "regression" else jnp.mean(jax.nn.logsumexp(pred, -1))
        return task_loss + out["align_loss"], out

    @fast_jit
    def init_and_grad(key):
        params = model.init(key, feats, masks)["params"]
        return params, jax.value_and_grad(loss_fn, has_aux=True)(params)

    params, ((loss, out), grads) = init_and_grad(jax.random.PRNGKey(0))
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
    return model, params, out


VARIANTS = {
    "full": {},
    "wo_local": {"use_local_alignment": False},
    "all_local_options": {"ot_centred": True, "ot_barycentric": True, "ot_match_dim": 3, "ot_time_prior": 0.5,
                          "ot_contrastive": 0.7},
    "wo_global": {"use_global_alignment": False},
    "single_stream": {"fusion": "single_stream"},
    "multi_stream": {"fusion": "multi_stream"},
    "wo_audio": {"drop_modalities": ("audio",)},
    "wo_vision": {"drop_modalities": ("vision",)},
    "wo_language": {"drop_modalities": ("text",)},
    "alignmamba2": {"name": "alignmamba2"},
    "transformer_single": {"name": "transformer_single"},
    "transformer_multi": {"name": "transformer_multi"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_forward_backward_under_jit_with_missing_modalities(variant):
    feats, masks = make_batch()
    cfg = tiny_config(**VARIANTS[variant])
    # MulT-like cross attention costs a stack per ordered pair: two modalities keep the compile small.
    modalities = ("text", "audio") if variant == "transformer_multi" else MODS
    _, _, out = run_forward_backward(cfg, feats, masks, modalities=modalities)
    assert out["prediction"].shape == (3,) and out["prediction"].dtype == jnp.float32
    assert out["align_loss"].shape == ()
    if variant == "wo_global" or variant.startswith("transformer"):
        assert float(out["align_loss"]) == 0.0
    else:
        assert float(out["align_loss"]) > 0.0


PAPER_EXACT = {"ot_centred": False, "ot_match_dim": 0, "ot_barycentric": False, "ot_time_prior": 0.0,
               "ot_contrastive": 0.0}


ALL_OPTIONS = {"ot_centred": True, "ot_barycentric": True, "ot_match_dim": 3, "ot_time_prior": 0.5,
               "ot_contrastive": 0.7, "ot_contrastive_tau": 0.3, "ot_contrastive_sigma": 0.2}


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["defaults_paper_exact", "all_options"])
def test_full_model_wiring_matches_pure_functions(options):
    cfg = default_model_config()
    assert {k: cfg[k] for k in PAPER_EXACT} == PAPER_EXACT
    feats, masks = make_batch(seed=1)
    cfg = tiny_config(return_plans=True, dropout=0.0, **options)
    model = create_model(cfg, MODS, "text", DIMS)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    out = fast_jit(lambda p: model.apply({"params": p}, feats, masks))(params)
    # Training adds losses only: its predictions are the inference ones.
    out_train = fast_jit(lambda p: model.apply({"params": p}, feats, masks, train=True))(params)
    np.testing.assert_array_equal(out_train["prediction"], out["prediction"])
    proj = {m: feats[m] @ np.asarray(params["projections"][f"proj_{m}"]["kernel"])
            + np.asarray(params["projections"][f"proj_{m}"]["bias"]) for m in MODS}
    keys = {m: None for m in MODS}
    if cfg.ot_match_dim:
        keys = {m: feats[m] @ np.asarray(params[f"match_{m}"]["kernel"]) + np.asarray(params[f"match_{m}"]["bias"])
                for m in MODS}                  # LocalAlignment's keys keep their pre-split parameter paths
    expected_loss, expected_ot = 0.0, 0.0
    for m in ("audio", "vision"):
        aligned, plan = ot_align(proj[m], proj["text"], masks[m], masks["text"], centred=cfg.ot_centred,
                                 barycentric=cfg.ot_barycentric, source_key=keys[m], anchor_key=keys["text"],
                                 time_prior=cfg.ot_time_prior)
        assert out["ot_plans"][m].shape == (3, LENS[m], LENS["text"])
        np.testing.assert_allclose(out["ot_plans"][m], plan, atol=1e-6)
        present = masks[m].any(-1) & masks["text"].any(-1)
        aligned_mask = masks["text"] & masks[m].any(-1, keepdims=True)
        per_sample = np.asarray(mmd(aligned, proj["text"], cfg.mmd_sigma, aligned_mask, masks["text"]))
        expected_loss += per_sample[present].mean()
        if cfg.ot_contrastive:
            nce = time_contrastive_loss(keys[m], keys["text"], masks[m], masks["text"], tau=cfg.ot_contrastive_tau,
                                        sigma=cfg.ot_contrastive_sigma, centred=cfg.ot_centred)
            expected_ot += cfg.ot_contrastive * np.asarray(nce)[present].mean()
    np.testing.assert_allclose(out["align_loss"], expected_loss, rtol=1e-4)
    np.testing.assert_allclose(out_train["align_loss"], expected_loss + expected_ot, rtol=1e-4)

    wo_local = create_model(tiny_config(return_plans=True, use_local_alignment=False), MODS, "text", DIMS)
    plans = fast_jit(lambda p: wo_local.apply({"params": p}, feats, masks))(params)["ot_plans"]
    np.testing.assert_allclose(plans["audio"], segment_mean_resample(proj["audio"], LENS["text"], masks["audio"],
                                                                     masks["text"])[1], atol=1e-6)


def test_interleave_is_time_major_and_pooling_respects_masks():
    a, v, l = (np.full((1, 2, 1), c, np.float32) + np.arange(2)[None, :, None] for c in (10, 20, 30))
    ma, mv, ml = np.array([[True, True]]), np.array([[False, True]]), np.array([[True, False]])
    x, m = interleave_time_major([a, v, l], [ma, mv, ml])
    np.testing.assert_array_equal(x[0, :, 0], [10, 20, 30, 11, 21, 31])
    np.testing.assert_array_equal(m[0], [True, False, True, True, True, False])
    np.testing.assert_allclose(masked_pool(x, m, "mean")[0, 0], np.mean([10, 30, 11, 21]))
    np.testing.assert_allclose(masked_pool(x, m, "last")[0, 0], 21)
    assert np.all(np.asarray(masked_pool(x, np.zeros_like(m), "mean")) == 0)


def test_alignmamba2_does_no_alignment_at_inference_and_classification_head():
    feats, masks = make_batch()
    model = create_model(tiny_config(name="alignmamba2"), MODS, "text", DIMS, task="classification", num_classes=3)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    out = fast_jit(lambda p: model.apply({"params": p}, feats, masks, train=False))(params)
    assert out["prediction"].shape == (3, 3)
    assert float(out["align_loss"]) == 0.0 and float(out["aux"]["ot"]) == 0.0
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, feats, masks, train=False))(params))
    jaxpr_train = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, feats, masks, train=True,
                                                           rngs={"dropout": jax.random.PRNGKey(0)}))(params))
    # Sinkhorn's log-sum-exp iterations appear only in the training graph.
    assert jaxpr.count("reduce_max") < jaxpr_train.count("reduce_max")
    assert {"in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"} <= set(
        params["layer_0"]["mamba"]["mixer"])


def test_bad_inputs_raise_clear_errors():
    feats, masks = make_batch()
    model = create_model(tiny_config(), MODS, "text", DIMS)
    bad = dict(feats, audio=feats["audio"][..., :2])
    with pytest.raises(ValueError, match=r"features\['audio'\].*\(3, T, 3\).*\(3, 7, 2\)"):
        model.init(jax.random.PRNGKey(0), bad, masks)
    with pytest.raises(ValueError, match="anchor modality 'text'"):
        model.init(jax.random.PRNGKey(0), {m: feats[m] for m in ("audio", "vision")}, masks)
    with pytest.raises(ValueError, match=r"masks\['vision'\] must have shape \(3, 4\)"):
        model.init(jax.random.PRNGKey(0), feats, dict(masks, vision=masks["vision"][:, :3]))
    with pytest.raises(ValueError, match="anchor 'speech'"):
        create_model(tiny_config(), MODS, "speech", DIMS)
    with pytest.raises(ValueError, match="input_dims lacks"):
        create_model(tiny_config(), MODS, "text", {"text": 6})
    with pytest.raises(ValueError, match="cfg.fusion"):
        create_model(tiny_config(fusion="late"), MODS, "text", DIMS)
    with pytest.raises(ValueError, match="ot_contrastive"):
        create_model(tiny_config(ot_contrastive_tau=0.0), MODS, "text", DIMS)


def test_two_modalities_and_loss_decreases_when_overfitting_a_tiny_batch():
    rng = np.random.default_rng(4)
    dims = {"image": 5, "text": 4}
    feats = {"image": rng.normal(size=(4, 6, 5)).astype(np.float32),
             "text": rng.normal(size=(4, 5, 4)).astype(np.float32)}
    masks = {"image": np.ones((4, 6), bool), "text": np.arange(5)[None] < np.array([[5], [4], [3], [5]])}
    labels = np.array([1.5, -2.0, 0.5, -0.5], np.float32)
    cfg = tiny_config(dropout=0.0, d_model=16)
    model = create_model(cfg, ("text", "image"), "text", dims)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        out = model.apply({"params": p}, feats, masks, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
        return jnp.mean((out["prediction"] - labels) ** 2) + cfg.align_weight * out["align_loss"]

    @fast_jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_fused_attention_option_matches_flax_attention(monkeypatch):
    """attention_impl="cudnn" routes every attention through `fused_attention` (run here with JAX's XLA
    implementation, cuDNN needing a GPU: tests/test_gpu.py runs cuDNN); the multi-stream model's self- and
    cross-attention at odd lengths, with padding and whole missing modalities, give Flax's result to bfloat16
    accuracy."""
    import alignmamba_jax.models as models
    calls, original = [], models.fused_attention

    def xla_fused(query, key, value, mask=None, *, implementation):
        calls.append(implementation)
        return original(query, key, value, mask, implementation="xla")

    feats, masks = make_batch()
    plain = create_model(tiny_config(name="transformer_multi"), MODS, "text", DIMS)
    params = fast_jit(plain.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    expected = fast_jit(plain.apply)({"params": params}, feats, masks)["prediction"]
    monkeypatch.setattr(models, "fused_attention", xla_fused)
    fused = create_model(tiny_config(name="transformer_multi", attention_impl="cudnn"), MODS, "text", DIMS)
    got = fast_jit(fused.apply)({"params": params}, feats, masks)["prediction"]
    assert calls and set(calls) == {"cudnn"}
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))
    with pytest.raises(ValueError, match=r"cfg.attention_impl must be one of \('xla', 'cudnn'\), found 'flash'"):
        create_model(tiny_config(attention_impl="flash"), MODS, "text", DIMS)


SHIPPED_LOCAL = {"ot_match_dim": 3, "ot_centred": True, "ot_time_prior": 0.5, "ot_contrastive": 1.0}   # synthetic.py
MODEL_CASES = {"alignmamba": {}, "alignmamba_shipped_local": SHIPPED_LOCAL, "alignmamba_wo_local":
               {"use_local_alignment": False}, "alignmamba2": {"name": "alignmamba2"},
               "transformer_single": {"name": "transformer_single"}, "transformer_multi": {"name": "transformer_multi"}}


def predict_and_grad(model, masks):
    """(params, features) -> (inference predictions, gradient of a training loss with respect to params), jitted."""
    def loss(p, f):
        out = model.apply({"params": p}, f, masks, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(out["prediction"] ** 2) + out["align_loss"]

    return fast_jit(lambda p, f: (model.apply({"params": p}, f, masks)["prediction"], jax.grad(loss)(p, f)))


@pytest.mark.parametrize("case", ["alignmamba_shipped_local", "alignmamba2", "transformer_single",
                                  "transformer_multi"])
def test_nan_and_inf_in_padded_frames_change_nothing(case):
    """Padded values are replaced before any arithmetic: NaN / inf there give the predictions and the loss
    gradient of zeros there, bit for bit (before the fix NaN in padded audio made every AlignMamba output NaN)."""
    feats, masks = make_batch(seed=5)
    modalities = ("text", "audio") if case == "transformer_multi" else MODS
    model = create_model(tiny_config(dropout=0.0, **MODEL_CASES[case]), modalities, "text", DIMS)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    rng = np.random.default_rng(0)
    junk = np.array([np.nan, np.inf, -np.inf], np.float32)
    dirty = {m: np.where(masks[m][..., None], feats[m], junk[rng.integers(0, 3, size=feats[m].shape)]) for m in MODS}
    run = predict_and_grad(model, masks)
    (clean_pred, clean_grad), (dirty_pred, dirty_grad) = run(params, feats), run(params, dirty)
    assert np.all(np.isfinite(dirty_pred))
    np.testing.assert_array_equal(dirty_pred, clean_pred)
    for g, c in zip(jax.tree.leaves(dirty_grad), jax.tree.leaves(clean_grad)):
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, c)


@pytest.mark.parametrize("case", ["alignmamba", "alignmamba_wo_local", "alignmamba2"])
def test_a_sample_without_its_anchor_still_uses_the_other_modalities(case):
    """Sample 0 has no text: its prediction follows its audio and vision (the sources are resampled onto all
    text positions); sample 1 has nothing: the 'no information' output, the head of a zero pool."""
    feats, masks = make_batch(seed=6)
    masks["text"][:2] = False
    for m in ("audio", "vision"):
        masks[m][0, :2] = True
        masks[m][1] = False
    model = create_model(tiny_config(dropout=0.0, return_plans=True, **MODEL_CASES[case]), MODS, "text", DIMS)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    apply = fast_jit(lambda f: model.apply({"params": params}, f, masks))
    out = apply(feats)
    rng = np.random.default_rng(1)
    for m in ("audio", "vision"):
        changed = dict(feats, **{m: feats[m] + rng.normal(size=feats[m].shape).astype(np.float32)})
        assert abs(float(apply(changed)["prediction"][0] - out["prediction"][0])) > 1e-4, m
    everything = {m: feats[m] + rng.normal(size=feats[m].shape).astype(np.float32) for m in MODS}
    head = params["head"]
    no_information = np.asarray(jax.nn.gelu(head["hidden"]["bias"]) @ head["out"]["kernel"] + head["out"]["bias"])[0]
    np.testing.assert_allclose(apply(everything)["prediction"][1], no_information, rtol=1e-6)
    np.testing.assert_allclose(out["prediction"][1], no_information, rtol=1e-6)
    if case != "alignmamba2":                                   # AlignMamba's plans: resampling onto all positions
        proj = {m: feats[m] @ np.asarray(params["projections"][f"proj_{m}"]["kernel"]) for m in MODS}
        every_position = np.ones((3, LENS["text"]), bool)
        for m in ("audio", "vision"):
            _, plan = segment_mean_resample(proj[m], LENS["text"], masks[m], every_position)
            np.testing.assert_allclose(out["ot_plans"][m][0], plan[0], atol=1e-7)


def untyped_config(**overrides):
    """tiny_config without ConfigDict's type locking, to reach create_model's own checks (a config from a plain
    dict, or a ConfigDict with type_safe=False, has none)."""
    cfg = ml_collections.ConfigDict(tiny_config().to_dict(), type_safe=False)
    cfg.update(overrides)
    return cfg


def test_model_spec_is_built_from_the_config_by_name_and_checked():
    spec = create_model(untyped_config(mmd_sigma=[1, 2.5], dt_rank=2), MODS, "text", DIMS).spec
    assert hash(spec) == hash(create_model(untyped_config(mmd_sigma=(1.0, 2.5), dt_rank=2), MODS, "text", DIMS).spec)
    assert spec.mmd_sigma == (1.0, 2.5) and spec.d_model == 8 and spec.dt_rank == 2 and spec.sources == ("audio",
                                                                                                       "vision")
    for key, value, message in [("d_model", "8", "an int"), ("ot_centred", 1, "True or False"),
                                ("ot_time_prior", "0.5", "a number"), ("mmd_sigma", (1.0, "x"), "a number"),
                                ("dt_rank", 2.5, "an int"), ("pooling", "max", "one of"),
                                ("mmd_sigma", (1.0, 0.0), "finite and > 0"), ("ot_match_dim", -1, ">= 0"),
                                ("sinkhorn_epsilon", 0.0, "finite and > 0"), ("ot_contrastive_tau", 0.0, "> 0"),
                                ("am2_mmd_tokens", "raw", "one of"), ("am2_channel_mixer", "mlp", "one of")]:
        with pytest.raises(ValueError, match=rf"cfg\.{key} must be .*{message}"):
            create_model(untyped_config(**{key: value}), MODS, "text", DIMS)
    cfg = tiny_config()
    cfg.mmd_on = "aligned"                                         # an option that was removed
    with pytest.raises(ValueError, match=r"unknown \['mmd_on'\]"):
        create_model(cfg, MODS, "text", DIMS)


def test_remaining_model_options_reach_the_layers():
    """pooling, dtype, dt_rank, the MoE and MLP widths: each one visible in the parameters or the output."""
    feats, masks = make_batch()
    shapes = lambda cfg, mods=MODS: jax.eval_shape(create_model(cfg, mods, "text", DIMS).init,
                                                   jax.random.PRNGKey(0), feats, masks)["params"]
    mixer = shapes(untyped_config(dt_rank=3))["mamba"]["block_0"]["mixer"]
    assert mixer["x_proj"]["kernel"].shape == (16, 3 + 2 * 2) and mixer["in_proj"]["kernel"].dtype == jnp.float32
    moe = shapes(tiny_config(name="alignmamba2", moe_num_shared_experts=2, moe_hidden_mult=3))["layer_0"]["moe"]
    assert moe["shared_1_up"]["kernel"].shape == (8, 24) and moe["specific_up"]["kernel"].shape == (3, 8, 24)
    block = shapes(tiny_config(name="transformer_single", mlp_mult=3))["block_0"]
    assert block["mlp_up"]["kernel"].shape == (8, 24)
    model = create_model(tiny_config(dtype="bfloat16", pooling="last", dropout=0.0), MODS, "text", DIMS)
    params = fast_jit(model.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    last = fast_jit(lambda p: model.apply({"params": p}, feats, masks)["prediction"])(params)
    mean_model = create_model(tiny_config(dtype="bfloat16", dropout=0.0), MODS, "text", DIMS)
    mean = fast_jit(lambda p: mean_model.apply({"params": p}, feats, masks)["prediction"])(params)
    assert last.dtype == jnp.float32 and np.all(np.isfinite(last)) and np.all(np.abs(last - mean) > 1e-6)


REFUSED = {  # model overrides -> the key (and value) the error names
    "am2_time_prior": ({"name": "alignmamba2", "ot_time_prior": 0.5}, "cfg.ot_time_prior=0.5"),
    "am2_match_dim": ({"name": "alignmamba2", "ot_match_dim": 16}, "cfg.ot_match_dim=16"),
    "am2_local_switch": ({"name": "alignmamba2", "use_local_alignment": False}, "cfg.use_local_alignment=False"),
    "am2_fusion": ({"name": "alignmamba2", "fusion": "single_stream"}, "cfg.fusion='single_stream'"),
    "am2_mmd_tokens_without_mmd": ({"name": "alignmamba2", "use_global_alignment": False,
                                    "am2_mmd_tokens": "frames"}, "cfg.am2_mmd_tokens='frames'"),
    "am2_tau_without_contrastive": ({"name": "alignmamba2", "am2_inference_alignment": "ot",
                                     "ot_contrastive_tau": 0.5}, "cfg.ot_contrastive_tau=0.5"),
    "am2_epsilon_without_sinkhorn": ({"name": "alignmamba2", "use_sinkhorn": False, "sinkhorn_epsilon": 0.5},
                                     "cfg.sinkhorn_epsilon=0.5"),
    "am1_wo_local_match_dim": ({"use_local_alignment": False, "ot_match_dim": 16}, "cfg.ot_match_dim=16"),
    "am1_multi_stream_time_prior": ({"fusion": "multi_stream", "ot_time_prior": 0.5}, "cfg.ot_time_prior=0.5"),
    "am1_sinkhorn_switch": ({"use_sinkhorn": False}, "cfg.use_sinkhorn=False"),
    "am1_moe": ({"moe_hidden_mult": 4}, "cfg.moe_hidden_mult=4"),
    "am1_mmd_tokens": ({"am2_mmd_tokens": "frames"}, "cfg.am2_mmd_tokens='frames'"),
    "am1_channel_mixer": ({"am2_channel_mixer": "dense"}, "cfg.am2_channel_mixer='dense'"),
    "transformer_mmd": ({"name": "transformer_single", "use_global_alignment": False},
                        "cfg.use_global_alignment=False"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_option_the_model_does_not_read_is_refused_naming_key_and_model(case):
    overrides, named = REFUSED[case]
    name = overrides.get("name", "alignmamba")
    with pytest.raises(ValueError, match=rf"^model '{name}' does not implement {named}[ ,]") as raised:
        create_model(tiny_config(**overrides), MODS, "text", DIMS)
    assert "\n" not in str(raised.value)
    # at its default the same key is accepted
    key = named.split("=")[0][len("cfg."):]
    create_model(tiny_config(**{k: v for k, v in overrides.items() if k != key}), MODS, "text", DIMS)


def test_alignmamba2_regularisers_switch_independently():
    """Same parameters; each switch removes its own term only: wo_sinkhorn keeps MMD, wo_mmd keeps the OT term,
    wo_align keeps neither; the OT term is sinkhorn_distance of the projected tokens."""
    from alignmamba_jax.align import cosine_cost, sinkhorn_distance
    feats, masks = make_batch(seed=2)
    models = {name: create_model(tiny_config(name="alignmamba2", dropout=0.0, **over), MODS, "text", DIMS)
              for name, over in {"full": {}, "wo_sinkhorn": {"use_sinkhorn": False},
                                 "wo_mmd": {"use_global_alignment": False},
                                 "wo_align": {"use_sinkhorn": False, "use_global_alignment": False}}.items()}
    params = fast_jit(models["full"].init)(jax.random.PRNGKey(0), feats, masks)["params"]
    out = {name: fast_jit(lambda p, m=m: m.apply({"params": p}, feats, masks, train=True))(params)
           for name, m in models.items()}
    full = out["full"]["aux"]
    assert set(out["wo_sinkhorn"]["aux"]) == {"ot", "mmd", "mmd/audio", "mmd/vision"}
    assert set(out["wo_mmd"]["aux"]) == {"ot", "mmd", "ot/audio", "ot/vision"}
    assert float(full["ot"]) > 0 and float(full["mmd"]) > 0
    np.testing.assert_allclose(out["full"]["align_loss"], full["ot"] + full["mmd"], rtol=1e-6)
    np.testing.assert_allclose(out["wo_sinkhorn"]["align_loss"], full["mmd"], rtol=1e-6)
    np.testing.assert_allclose(out["wo_mmd"]["align_loss"], full["ot"], rtol=1e-6)
    assert float(out["wo_align"]["align_loss"]) == 0.0
    for name in models:
        np.testing.assert_array_equal(out[name]["prediction"], out["full"]["prediction"])
    proj = {m: feats[m] @ np.asarray(params["projections"][f"proj_{m}"]["kernel"])
            + np.asarray(params["projections"][f"proj_{m}"]["bias"]) for m in MODS}
    dist = sinkhorn_distance(cosine_cost(proj["audio"], proj["text"]), masks["audio"], masks["text"], epsilon=0.1,
                             max_iters=5, tolerance=1e-3)
    present = masks["audio"].any(-1) & masks["text"].any(-1)
    np.testing.assert_allclose(full["ot/audio"], np.asarray(dist)[present].mean(), rtol=1e-4)


@pytest.mark.parametrize("dtype, shape", [(jnp.float32, (3, 7, 5)), (jnp.float32, (4, 6)),
                                          (jnp.bfloat16, (2, 3, 4, 5))])
def test_token_dense_is_flax_dense_in_parameters_values_and_gradients(dtype, shape):
    """TokenDense's custom weight gradient against nn.Dense under plain autodiff: same parameter tree and
    initial values, same outputs, same gradients with respect to inputs, kernel and bias."""
    import flax.linen as nn
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    dense, ours = nn.Dense(8, dtype=dtype), TokenDense(8, dtype=dtype)
    params = dense.init(jax.random.PRNGKey(1), x)
    ours_params = ours.init(jax.random.PRNGKey(1), x)
    jax.tree.map(np.testing.assert_array_equal, ours_params, params)
    params = jax.tree.map(lambda p: p + 0.1, params)              # a nonzero bias
    weights = jnp.asarray(np.random.default_rng(2).normal(size=shape[:-1] + (8,)), jnp.float32)

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)) * weights)

    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours.apply(params, x).astype(jnp.float32),
                               dense.apply(params, x).astype(jnp.float32), rtol=tol, atol=tol)
    grads = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(params, x)
    reference = jax.grad(functools.partial(loss, dense), argnums=(0, 1))(params, x)
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda g: g.dtype, reference)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(np.max(np.abs(r))))


def test_alignmamba2_mmd_compares_the_fused_tokens_or_every_frame():
    """am2_mmd_tokens="aligned" (default): MMD^2 of the segment-mean resampled tokens the stream fuses against the
    anchor, as AlignMamba's global alignment; "frames": of every projected frame. Predictions do not change."""
    feats, masks = make_batch(seed=4)
    masks["text"][1] = False                    # a sample without its anchor takes no part in either
    models = {k: create_model(tiny_config(name="alignmamba2", dropout=0.0, use_sinkhorn=False, am2_mmd_tokens=k),
                              MODS, "text", DIMS) for k in ("aligned", "frames")}
    params = fast_jit(models["aligned"].init)(jax.random.PRNGKey(0), feats, masks)["params"]
    out = {k: fast_jit(lambda p, m=m: m.apply({"params": p}, feats, masks, train=True))(params)
           for k, m in models.items()}
    np.testing.assert_array_equal(out["frames"]["prediction"], out["aligned"]["prediction"])
    proj = {m: feats[m] @ np.asarray(params["projections"][f"proj_{m}"]["kernel"])
            + np.asarray(params["projections"][f"proj_{m}"]["bias"]) for m in MODS}
    for m in ("audio", "vision"):
        present = masks[m].any(-1) & masks["text"].any(-1)
        resampled, _ = segment_mean_resample(proj[m], LENS["text"], masks[m], masks["text"], return_plan=False)
        resampled_mask = masks["text"] & masks[m].any(-1, keepdims=True)
        expected = {"aligned": mmd(resampled, proj["text"], (1.0, 2.0, 4.0, 8.0, 16.0), resampled_mask,
                                   masks["text"]),
                    "frames": mmd(proj[m], proj["text"], (1.0, 2.0, 4.0, 8.0, 16.0), masks[m], masks["text"])}
        for k in models:
            np.testing.assert_allclose(out[k]["aux"][f"mmd/{m}"], np.asarray(expected[k])[present].mean(),
                                       rtol=1e-5)
        assert abs(float(out["aligned"]["aux"][f"mmd/{m}"]) - float(out["frames"]["aux"][f"mmd/{m}"])) > 1e-4


def test_alignmamba2_ot_inference_aligns_with_local_alignment_and_reads_its_options():
    """am2_inference_alignment="ot": the fusion front end is LocalAlignment's hard OT plan (also at inference),
    so its options change the prediction; "resample" is the segment-mean plan of the paper."""
    feats, masks = make_batch(seed=3)
    build = lambda **o: create_model(tiny_config(name="alignmamba2", dropout=0.0, return_plans=True, **o),  # noqa: E731
                                     MODS, "text", DIMS)
    resample, ot, ot_prior = build(), build(am2_inference_alignment="ot"), build(am2_inference_alignment="ot",
                                                                                   ot_time_prior=5.0)
    params = fast_jit(resample.init)(jax.random.PRNGKey(0), feats, masks)["params"]
    out = {k: fast_jit(lambda p, m=m: m.apply({"params": p}, feats, masks))(params)
           for k, m in {"resample": resample, "ot": ot, "ot_prior": ot_prior}.items()}
    proj = {m: feats[m] @ np.asarray(params["projections"][f"proj_{m}"]["kernel"])
            + np.asarray(params["projections"][f"proj_{m}"]["bias"]) for m in MODS}
    _, plan = ot_align(proj["audio"], proj["text"], masks["audio"], masks["text"])
    present = masks["text"].any(-1)
    np.testing.assert_allclose(out["ot"]["ot_plans"]["audio"][present], plan[present], atol=1e-6)
    assert not np.allclose(out["ot"]["prediction"], out["resample"]["prediction"])
    assert not np.allclose(out["ot_prior"]["prediction"], out["ot"]["prediction"])
    assert float(out["ot"]["align_loss"]) == 0.0


CONFIG_VARIANTS = {  # config file -> variants its model implements (every other variant is refused or unlisted)
    "synthetic.py": ("full", "paper_ot", "wo_local", "wo_global", "single_stream", "multi_stream", "wo_audio"),
    "alignmamba2_synthetic.py": ("full", "wo_sinkhorn", "wo_mmd", "wo_align", "ot_inference", "paper_ot",
                                 "mmd_frames", "wo_moe"),
    "mosi.py": ("full", "wo_local"), "mosei.py": ("full",), "alignmamba2_mosi.py": ("full", "wo_align"),
}


@pytest.mark.parametrize("config_file", list(CONFIG_VARIANTS))
def test_shipped_configs_carry_no_option_their_model_ignores(config_file):
    import pathlib
    from alignmamba_jax import config as config_lib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / config_file
    for variant in CONFIG_VARIANTS[config_file]:
        config = config_lib.sibling_config(str(path), config_file, variant)
        create_model(config.model, MODS, "text", DIMS)
    am1_refuses = config_lib.sibling_config(str(path), config_file, "wo_sinkhorn")
    if am1_refuses.model.name == "alignmamba":
        with pytest.raises(ValueError, match="model 'alignmamba' does not implement cfg.use_sinkhorn=False"):
            create_model(am1_refuses.model, MODS, "text", DIMS)
