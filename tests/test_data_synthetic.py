"""The synthetic default: reproducible from its seed, MOSI-shaped, and alignment genuinely matters."""
import ml_collections
import numpy as np
import pytest

from alignmamba_jax.data import load_splits, synthetic

SMALL = dict(n_train=400, n_valid=8, n_test=200, text_dim=64)


def _ridge_r2(x_train, y_train, x_test, y_test, lam=1e-1):
    a = np.c_[x_train, np.ones(len(x_train))]
    beta = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y_train)
    pred = np.c_[x_test, np.ones(len(x_test))] @ beta
    return 1.0 - np.mean((pred - y_test) ** 2) / np.var(y_test)


def _pooled_products(split, how, proj, mu):
    """Per sample: mean over text tokens j of text_j (projected) (x) [1, audio_j, vision_j], where audio_j /
    vision_j are the source frames attached to token j by `how` ("oracle": the generator's word spans,
    "uniform": equal-length segments of the valid frames, "none": the mean of all frames)."""
    feats = []
    for s in range(len(split["labels"])):
        n_tok = int(split["text_mask"][s].sum())
        t = (split["text"][s, :n_tok] - mu) @ proj
        parts = [np.ones((n_tok, 1))]
        for m in ("audio", "vision"):
            n = int(split[m + "_mask"][s].sum())
            x = split[m][s, :n]
            if how == "oracle":
                owner = split[m + "_word"][s, :n]
            elif how == "uniform":
                owner = np.minimum(np.arange(n) * n_tok // n, n_tok - 1)
            if how == "none":
                a = np.repeat(x.mean(0, keepdims=True), n_tok, 0)
            else:
                a = np.zeros((n_tok, x.shape[1]))
                for j in range(n_tok):
                    if np.any(owner == j):
                        a[j] = x[owner == j].mean(0)
            parts.append(a)
        src = np.concatenate(parts, 1)
        feats.append((t[:, :, None] * src[:, None, :]).reshape(n_tok, -1).mean(0) * np.sqrt(n_tok))
    return np.array(feats)


def _probe(data, n_components=8):
    tr, te = data["train"], data["test"]
    tokens = tr["text"][tr["text_mask"]]
    mu = tokens.mean(0)
    proj = np.linalg.svd(tokens - mu, full_matrices=False)[2][:n_components].T
    return {how: _ridge_r2(_pooled_products(tr, how, proj, mu), tr["labels"],
                           _pooled_products(te, how, proj, mu), te["labels"])
            for how in ("oracle", "uniform", "none")}


def test_reproducible_from_seed_and_seed_matters():
    cfg = dict(n_train=6, n_valid=3, n_test=3, text_dim=32)
    a, b = synthetic.generate_sentiment(cfg), synthetic.generate_sentiment(cfg)
    c = synthetic.generate_sentiment({**cfg, "seed": 1})
    for s in a:
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k])
    assert not np.array_equal(a["train"]["labels"], c["train"]["labels"])
    bigger_test = synthetic.generate_sentiment({**cfg, "n_test": 5})  # other splits unchanged
    np.testing.assert_array_equal(bigger_test["train"]["audio"], a["train"]["audio"])


def test_mosi_shapes_padding_and_labels():
    data = load_splits(ml_collections.ConfigDict(dict(
        name="synthetic", modalities=("text", "audio", "vision"), task="regression",
        synthetic=dict(n_train=20, n_valid=4, n_test=4))))
    tr = data["train"]
    assert tr["text"].shape == (20, 50, 768) and tr["audio"].shape == (20, 375, 5)
    assert tr["vision"].shape == (20, 500, 20) and tr["labels"].shape == (20,)
    assert sorted(tr) == sorted(["text", "text_mask", "audio", "audio_mask", "vision", "vision_mask", "labels",
                                 "ids"])
    for m in ("text", "audio", "vision"):
        mask = tr[m + "_mask"]
        lengths = mask.sum(1)
        np.testing.assert_array_equal(mask, np.arange(mask.shape[1])[None] < lengths[:, None])  # right pad
        assert np.all(tr[m][~mask] == 0) and np.all(np.abs(tr[m][mask]).sum(-1) > 0)
        assert len(np.unique(lengths)) > 1
    assert tr["labels"].dtype == np.float32 and np.all(np.abs(tr["labels"]) <= 3)
    assert len(set(tr["ids"])) == 20


def test_frames_follow_words_in_time():
    data = synthetic.generate_sentiment(dict(n_train=30, n_valid=2, n_test=2, text_dim=16))["train"]
    for s in range(30):
        n_words = int(data["text_mask"][s].sum()) - 2
        for m in ("audio", "vision"):
            owner = data[m + "_word"][s, : int(data[m + "_mask"][s].sum())]
            spoken = owner[owner > 0]
            assert np.all(np.diff(spoken) >= 0) and spoken.max() <= n_words
            assert owner[0] in (0, 1)  # a lead-in (silence) or the first word
            assert np.all(data[m + "_word"][s, len(owner):] == -1)


def test_aligned_variant_is_word_means_of_the_same_samples():
    cfg = dict(n_train=6, n_valid=2, n_test=2, text_dim=16)
    raw = synthetic.generate_sentiment(cfg)["train"]
    aligned = synthetic.generate_sentiment({**cfg, "aligned": True})["train"]
    np.testing.assert_array_equal(aligned["labels"], raw["labels"])
    np.testing.assert_array_equal(aligned["text"], raw["text"])
    for m in ("audio", "vision"):
        assert aligned[m].shape == (6, 50, raw[m].shape[2])
        np.testing.assert_array_equal(aligned[m + "_mask"], raw["text_mask"])
        for s in range(6):
            for j in range(int(raw["text_mask"][s].sum())):
                frames = raw[m][s][raw[m + "_word"][s] == j] if j else np.zeros((0, raw[m].shape[2]))
                want = frames.mean(0) if len(frames) else np.zeros(raw[m].shape[2])
                np.testing.assert_allclose(aligned[m][s, j], want, rtol=1e-5, atol=1e-6)


def test_oracle_alignment_beats_uniform_resampling():
    r2 = _probe(synthetic.generate_sentiment(SMALL))
    assert r2["oracle"] > 0.6
    assert r2["oracle"] > r2["uniform"] + 0.3 and r2["oracle"] > r2["none"] + 0.3


@pytest.mark.slow
def test_oracle_alignment_beats_uniform_resampling_default_sizes(capsys):
    r2 = _probe(synthetic.generate_sentiment())
    with capsys.disabled():
        print("\nsynthetic default, test R^2 of least squares on pooled token x frame products:", r2)
    assert r2["oracle"] > r2["uniform"] + 0.4


def test_image_text_classification_set():
    data = load_splits(ml_collections.ConfigDict(dict(
        name="synthetic", modalities=("image", "text"), task="classification", num_classes=3,
        synthetic=dict(n_train=300, n_valid=10, n_test=10))))
    tr = data["train"]
    assert tr["image"].shape == (300, 49, 64) and tr["text"].shape == (300, 24, 64)
    assert tr["labels"].dtype == np.int32
    assert np.all(np.bincount(tr["labels"], minlength=3) >= 90)  # classes from train terciles
    assert tr["text_mask"].sum(1).min() >= 4 and not tr["text_mask"].all()


def test_image_text_npz_round_trip(tmp_path):
    cfg = dict(n_train=12, n_valid=4, n_test=4)
    synthetic.write_image_text_npz(tmp_path, cfg)
    got = load_splits(ml_collections.ConfigDict(dict(
        name="features_npz", path=str(tmp_path), modalities=("image", "text"), task="classification",
        num_classes=3)))
    want = synthetic.generate_image_text(cfg)
    for s in want:
        for k, v in want[s].items():
            np.testing.assert_array_equal(got[s][k], v, err_msg=k)


def test_bad_synthetic_config():
    with pytest.raises(ValueError, match="unknown keys"):
        synthetic.generate_sentiment({"n_trian": 5})
    with pytest.raises(ValueError, match="code_dim"):
        synthetic.generate_sentiment({"audio_dim": 3})


def _own_word_match(plan, word, mask):
    inside = mask & (word >= 1)
    return float(np.mean((np.asarray(plan).argmax(-1) == word)[inside]))


def test_time_contrastive_keys_learn_the_word_match_that_resampling_misses():
    """The fix for the paper rule's untrained cost on this data: linear matching keys trained only by
    `time_contrastive_loss` (time order as a weak label) make the relaxed-OT argmin, on content alone (no time
    prior), send most in-word audio frames to their own word, far above chance and above segment-mean
    resampling; with the initial random keys it is near chance."""
    import jax
    import jax.numpy as jnp
    import optax
    from alignmamba_jax.align import ot_align, segment_mean_resample, time_contrastive_loss

    data = synthetic.generate_sentiment(dict(SMALL, n_test=64, text_dim=64))
    train, test = data["train"], data["test"]
    key_a, key_t = jax.random.split(jax.random.PRNGKey(0))
    params = {"audio": 0.5 * jax.random.normal(key_a, (train["audio"].shape[-1], 16)),
              "text": 0.2 * jax.random.normal(key_t, (train["text"].shape[-1], 16))}

    def keys(p, split, idx):
        return jnp.asarray(split["audio"][idx]) @ p["audio"], jnp.asarray(split["text"][idx]) @ p["text"]

    def loss(p, batch):
        nce = time_contrastive_loss(batch["audio"] @ p["audio"], batch["text"] @ p["text"], batch["audio_mask"],
                                    batch["text_mask"], tau=1.0, sigma=0.1, centred=True)
        return jnp.mean(nce)

    def match(p):
        ka, kt = keys(p, test, np.arange(len(test["labels"])))
        _, plan = ot_align(ka, kt, test["audio_mask"], test["text_mask"], centred=True)
        return _own_word_match(plan, test["audio_word"], test["audio_mask"])

    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(loss)(p, batch)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    before = match(params)
    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.choice(len(train["labels"]), 32, replace=False)
        batch = {k: train[k][idx] for k in ("audio", "audio_mask", "text", "text_mask")}
        params, state = step(params, state, batch)
    after = match(params)
    _, seg_plan = segment_mean_resample(test["audio"], test["text"].shape[1], test["audio_mask"], test["text_mask"])
    resampled = _own_word_match(seg_plan, test["audio_word"], test["audio_mask"])
    chance = float(np.mean(1.0 / test["text_mask"].sum(-1)))
    assert before < 3 * chance
    assert after > resampled + 0.1 and after > 5 * chance, (before, after, resampled, chance)
