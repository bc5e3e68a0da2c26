"""ot_align, mmd, sinkhorn, segment_mean_resample against brute-force NumPy versions of their equations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax.align import (cosine_cost, masked_centre, mmd, ot_align, segment_mean_resample, sinkhorn,
                                  time_contrastive_loss)

# Tiny graphs: XLA's backend optimisations cost far more compile time than they save at run time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def right_padded_mask(lengths, t):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def ot_align_numpy(src, anc, sm, am, time_prior=0.0):
    """Paper eqs. (3), (5), (6) by loops: C = 1 - cos, M(i,j) = 1/T_s at argmin_j C(i,j), aligned = M^T src.

    time_prior adds time_prior * |(r_i + 0.5) / n_s - (r_j + 0.5) / n_a| with r the rank among valid tokens.
    """
    b, ts, d = src.shape
    ta = anc.shape[1]
    plan = np.zeros((b, ts, ta))
    for n in range(b):
        n_src = sm[n].sum()
        valid_source = [i for i in range(ts) if sm[n, i]]
        valid_anchor = [j for j in range(ta) if am[n, j]]
        for i in range(ts):
            if not sm[n, i] or not valid_anchor:
                continue
            costs = []
            for j in valid_anchor:
                nx, ny = np.linalg.norm(src[n, i]), np.linalg.norm(anc[n, j])
                cos = 0.0 if nx == 0 or ny == 0 else src[n, i] @ anc[n, j] / (nx * ny)
                t_i = (valid_source.index(i) + 0.5) / len(valid_source)
                t_j = (valid_anchor.index(j) + 0.5) / len(valid_anchor)
                costs.append(1.0 - cos + time_prior * abs(t_i - t_j))
            plan[n, i, valid_anchor[int(np.argmin(costs))]] = 1.0 / n_src
    aligned = np.einsum("bij,bid->bjd", plan, src)
    return aligned, plan


def mmd_numpy(x, y, sigmas, xm, ym):
    xs, ys = x[xm], y[ym]
    if len(xs) == 0 or len(ys) == 0:
        return 0.0

    def k(a, b):
        return np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in sigmas])

    kxx = sum(k(a, b) for a in xs for b in xs) / len(xs) ** 2
    kyy = sum(k(a, b) for a in ys for b in ys) / len(ys) ** 2
    kxy = sum(k(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    return kxx + kyy - 2 * kxy


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_ot_align_matches_paper_equations_with_masks(rng):
    b, ts, ta, d = 4, 7, 5, 6
    src = rng.normal(size=(b, ts, d)).astype(np.float32)
    anc = rng.normal(size=(b, ta, d)).astype(np.float32)
    sm = right_padded_mask([7, 4, 0, 6], ts)
    am = right_padded_mask([5, 3, 5, 0], ta)
    am[0, 1] = False                         # an interior hole: argmin must skip it
    aligned, plan = fast_jit(ot_align)(src, anc, sm, am)
    ref_aligned, ref_plan = ot_align_numpy(src, anc, sm, am)
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)
    np.testing.assert_allclose(aligned, ref_aligned, rtol=1e-5, atol=1e-6)
    # Total mass 1 for samples with valid source and anchor tokens, 0 otherwise.
    np.testing.assert_allclose(np.asarray(plan).sum(axis=(1, 2)), [1, 1, 0, 0], atol=1e-6)


def test_ot_align_without_masks_and_vmap(rng):
    src = rng.normal(size=(3, 6, 4)).astype(np.float32)
    anc = rng.normal(size=(3, 5, 4)).astype(np.float32)
    aligned, plan = ot_align(src, anc)
    ref_aligned, ref_plan = ot_align_numpy(src, anc, np.ones((3, 6), bool), np.ones((3, 5), bool))
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)
    v_aligned, _ = jax.vmap(ot_align)(src, anc)
    np.testing.assert_allclose(v_aligned, ref_aligned, rtol=1e-5, atol=1e-6)


def test_ot_align_degenerate_inputs_are_finite_and_gradients_flow_to_source_only(rng):
    src = np.zeros((2, 4, 3), np.float32)
    src[0, 1] = 1.0
    anc = np.concatenate([np.zeros((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32)], axis=1)
    sm = np.array([[True] * 4, [False] * 4])

    def loss(s, a):
        aligned, _ = ot_align(s, a, sm, None)
        return jnp.sum(aligned ** 2) + jnp.sum(aligned)

    value, (gs, ga) = fast_jit(jax.value_and_grad(loss, argnums=(0, 1)))(src, anc)
    assert np.isfinite(value) and np.all(np.isfinite(gs)) and np.all(np.isfinite(ga))
    assert np.all(np.asarray(ga) == 0)
    assert np.any(np.asarray(gs) != 0)
    _, plan = ot_align(anc, anc)                       # identical tokens: cost 0 on the diagonal block
    assert np.all(np.isfinite(plan))


def test_cosine_cost_and_sinkhorn_gradients_are_finite_at_zero_tokens():
    x = np.zeros((1, 3, 2), np.float32)
    x[0, 0] = [1.0, 2.0]
    y = np.zeros((1, 2, 2), np.float32)
    y[0, 1] = [0.5, -1.0]
    cost = cosine_cost(x, y)
    np.testing.assert_allclose(cost[0], [[1, 1 - (0.5 - 2) / (np.sqrt(5) * np.sqrt(1.25))], [1, 1], [1, 1]],
                               rtol=1e-6)
    gx, gy = jax.grad(lambda a, b: jnp.sum(sinkhorn(cosine_cost(a, b), num_iters=20)[1]), argnums=(0, 1))(x, y)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
    xm = np.array([[True, False, False]])              # zero padding: no gradient reaches it
    gx = jax.grad(lambda a: jnp.sum(sinkhorn(cosine_cost(a, y), xm, num_iters=20)[1]))(x)
    assert np.all(np.asarray(gx)[0, 1:] == 0) and np.any(np.asarray(gx)[0, 0] != 0)


def test_ot_align_rejects_bad_masks(rng):
    src, anc = np.ones((2, 3, 4), np.float32), np.ones((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match="source_mask"):
        ot_align(src, anc, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="feature width"):
        ot_align(src, np.ones((2, 5, 3), np.float32))


def test_masked_centre_matches_numpy_per_sequence_mean(rng):
    x = rng.normal(size=(3, 5, 2)).astype(np.float32) + 4.0
    m = right_padded_mask([5, 2, 0], 5)
    m[0, 2] = False
    ref = np.zeros_like(x)
    for n in range(3):
        if m[n].any():
            ref[n][m[n]] = x[n][m[n]] - x[n][m[n]].mean(axis=0)
    np.testing.assert_allclose(masked_centre(x, m), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked_centre(x[:1]), x[:1] - x[:1].mean(axis=1, keepdims=True), atol=1e-6)


def test_centred_cost_removes_a_shared_offset_hub(rng):
    """Source tokens = shared offset + small codes all point at the anchor closest to the offset (a hub);
    centring each sequence recovers the planted matching."""
    codes = rng.normal(size=(4, 3)).astype(np.float32)
    offset = np.full(3, 20.0, np.float32)
    anc = (codes + offset)[None]
    src = (0.05 * np.repeat(codes, 3, axis=0) + offset + 1e-4 * rng.normal(size=(12, 3)))[None].astype(np.float32)
    truth = np.repeat(np.arange(4), 3)
    _, hub_plan = ot_align(src, anc)
    assert len(np.unique(np.argmax(hub_plan[0], -1))) == 1
    _, plan = ot_align(src, anc, centred=True)
    src_c = src[0] - src[0].mean(0)
    anc_c = anc[0] - anc[0].mean(0)
    ref_aligned, ref_plan = ot_align_numpy(src_c[None], anc_c[None], np.ones((1, 12), bool), np.ones((1, 4), bool))
    np.testing.assert_array_equal(np.argmax(plan[0], -1), truth)
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)


def test_straight_through_forward_is_the_hard_plan_and_gradient_is_the_soft_plans(rng):
    b, ts, ta, d, tau = 3, 6, 4, 5, 0.2
    src = rng.normal(size=(b, ts, d)).astype(np.float32) + 1.0
    anc = rng.normal(size=(b, ta, d)).astype(np.float32) + 1.0
    sm = right_padded_mask([6, 3, 0], ts)
    am = right_padded_mask([4, 2, 4], ta)
    g_out = rng.normal(size=(b, ta, d)).astype(np.float32)
    for centred in (False, True):
        hard = ot_align(src, anc, sm, am, centred=centred)
        st = ot_align(src, anc, sm, am, centred=centred, straight_through_tau=tau)
        np.testing.assert_array_equal(st[0], hard[0])
        np.testing.assert_array_equal(st[1], hard[1])

        def soft_plan(s, a):
            """(1/T_s) softmax_j(-C/tau) over valid anchors, written out independently of ot_align."""
            s = masked_centre(s, sm) if centred else s
            a = masked_centre(a, am) if centred else a
            su = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
            au = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
            logits = jnp.where(am[:, None, :], -(1.0 - su @ jnp.swapaxes(au, 1, 2)) / tau, -jnp.inf)
            mass = sm / np.maximum(sm.sum(-1, keepdims=True), 1)
            return jax.nn.softmax(logits, axis=-1) * mass[..., None]

        def st_loss(s, a):
            return jnp.sum(ot_align(s, a, sm, am, centred=centred, straight_through_tau=tau)[0] * g_out)

        def ref_loss(s, a):
            # d/d(s, a) of <G, S(s, a)^T s_fixed> + <G, M_hard^T s>
            return (jnp.sum(jnp.einsum("bij,bid->bjd", soft_plan(s, a), src) * g_out)
                    + jnp.sum(jnp.einsum("bij,bid->bjd", hard[1], s) * g_out))

        gs, ga = jax.grad(st_loss, argnums=(0, 1))(src, anc)
        rs, ra = jax.grad(ref_loss, argnums=(0, 1))(src, anc)
        np.testing.assert_allclose(gs, rs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-6)
        assert np.any(np.asarray(ga) != 0)
        assert np.all(np.asarray(gs)[2] == 0) and np.all(np.asarray(ga)[1, 2:] == 0)   # masked: no gradient
    with pytest.raises(ValueError, match="straight_through_tau"):
        ot_align(src, anc, straight_through_tau=0.0)


def test_barycentric_aligned_tokens_are_means_of_assigned_tokens(rng):
    src = rng.normal(size=(2, 8, 3)).astype(np.float32)
    anc = rng.normal(size=(2, 4, 3)).astype(np.float32)
    sm = right_padded_mask([8, 5], 8)
    am = right_padded_mask([4, 3], 4)
    aligned, plan = ot_align(src, anc, sm, am, barycentric=True)
    _, ref_plan = ot_align_numpy(src, anc, sm, am)
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)
    assigned = ref_plan > 0
    for n in range(2):
        for j in range(4):
            rows = assigned[n, :, j]
            expect = src[n][rows].mean(0) if rows.any() else np.zeros(3)
            np.testing.assert_allclose(aligned[n, j], expect, rtol=1e-5, atol=1e-6)


def test_ot_align_cost_on_separate_keys(rng):
    """The plan follows the keys' cosine; the aligned tokens average the source values."""
    src = rng.normal(size=(2, 6, 3)).astype(np.float32)
    anc = rng.normal(size=(2, 4, 3)).astype(np.float32)
    sk = rng.normal(size=(2, 6, 5)).astype(np.float32)
    ak = rng.normal(size=(2, 4, 5)).astype(np.float32)
    sm = right_padded_mask([6, 4], 6)
    am = right_padded_mask([4, 3], 4)
    aligned, plan = ot_align(src, anc, sm, am, source_key=sk, anchor_key=ak)
    _, ref_plan = ot_align_numpy(sk, ak, sm, am)
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)
    np.testing.assert_allclose(aligned, np.einsum("bij,bid->bjd", ref_plan, src), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="source_key"):
        ot_align(src, anc, source_key=sk[:, :5], anchor_key=ak)


@pytest.mark.parametrize("time_prior", [0.5, 20.0])
def test_ot_align_time_prior_matches_numpy_with_masks_and_holes(rng, time_prior):
    """The temporal prior enters the cost as in the loop reference; a strong one gives the time-order plan."""
    b, ts, ta, d = 3, 9, 5, 4
    src = rng.normal(size=(b, ts, d)).astype(np.float32)
    anc = rng.normal(size=(b, ta, d)).astype(np.float32)
    sm = right_padded_mask([9, 6, 3], ts)
    am = right_padded_mask([5, 4, 5], ta)
    am[2, 1] = False
    aligned, plan = fast_jit(functools.partial(ot_align, time_prior=time_prior))(src, anc, sm, am)
    ref_aligned, ref_plan = ot_align_numpy(src, anc, sm, am, time_prior=time_prior)
    np.testing.assert_allclose(plan, ref_plan, atol=1e-7)
    np.testing.assert_allclose(aligned, ref_aligned, rtol=1e-5, atol=1e-6)
    if time_prior > 2.0:   # the cosine part spans [0, 2]: time order wins, anchor index never decreases
        targets = np.argmax(np.asarray(plan)[0], axis=-1)
        assert np.all(np.diff(targets) >= 0) and targets[0] == 0 and targets[-1] == ta - 1


def time_contrastive_numpy(src, anc, sm, am, tau, sigma):
    """The InfoNCE with time targets by loops: per valid source token, cross-entropy of softmax(-|dt| / sigma)
    against softmax(cos / tau) over the valid anchor tokens; mean over valid source tokens, 0 if a side is empty."""
    out = np.zeros(src.shape[0])
    for n in range(src.shape[0]):
        rows = [i for i in range(src.shape[1]) if sm[n, i]]
        cols = [j for j in range(anc.shape[1]) if am[n, j]]
        if not rows or not cols:
            continue
        losses = []
        for r, i in enumerate(rows):
            t_i = (r + 0.5) / len(rows)
            cos = np.array([src[n, i] @ anc[n, j] / (np.linalg.norm(src[n, i]) * np.linalg.norm(anc[n, j]))
                            for j in cols])
            gap = np.array([abs(t_i - (c + 0.5) / len(cols)) for c in range(len(cols))])
            target = np.exp(-gap / sigma) / np.exp(-gap / sigma).sum()
            log_p = cos / tau - np.log(np.exp(cos / tau).sum())
            losses.append(-(target * log_p).sum())
        out[n] = np.mean(losses)
    return out


@pytest.mark.parametrize("centred", [False, True])
def test_time_contrastive_loss_matches_loop_reference_with_masks(rng, centred):
    b, ts, ta, d = 4, 7, 5, 3
    src = rng.normal(size=(b, ts, d)).astype(np.float32) + 0.5
    anc = rng.normal(size=(b, ta, d)).astype(np.float32) - 0.5
    sm = right_padded_mask([7, 4, 0, 6], ts)
    am = right_padded_mask([5, 3, 5, 0], ta)
    loss = fast_jit(functools.partial(time_contrastive_loss, tau=0.3, sigma=0.2, centred=centred))(src, anc, sm, am)
    ref_src, ref_anc = (np.asarray(masked_centre(src, sm)), np.asarray(masked_centre(anc, am))) if centred \
        else (src, anc)
    np.testing.assert_allclose(loss, time_contrastive_numpy(ref_src, ref_anc, sm, am, 0.3, 0.2), rtol=1e-5,
                               atol=1e-6)
    assert loss[2] == 0.0 and loss[3] == 0.0        # an empty side contributes nothing
    grads = jax.grad(lambda s, a: jnp.sum(time_contrastive_loss(s, a, sm, am)), argnums=(0, 1))(src, anc)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[~sm] == 0.0)  # padded tokens receive no gradient


def test_time_contrastive_loss_is_lower_for_keys_that_match_the_time_order(rng):
    """Keys that encode each token's own relative time fit the targets better than shuffled keys, and gradient
    descent on random keys raises the cosine of time-matched pairs above that of mismatched ones."""
    ts, ta = 12, 6
    t_s, t_a = (np.arange(ts) + 0.5) / ts, (np.arange(ta) + 0.5) / ta
    embed = lambda t: np.stack([np.cos(np.pi * t), np.sin(np.pi * t)], -1)[None].astype(np.float32)
    matched = time_contrastive_loss(embed(t_s), embed(t_a), tau=0.1, sigma=0.1)
    shuffled = time_contrastive_loss(embed(rng.permutation(t_s)), embed(t_a), tau=0.1, sigma=0.1)
    assert float(matched[0]) < float(shuffled[0])
    src = jnp.asarray(rng.normal(size=(1, ts, 4)), jnp.float32)
    anc = jnp.asarray(rng.normal(size=(1, ta, 4)), jnp.float32)
    grad = jax.jit(jax.grad(lambda s, a: jnp.sum(time_contrastive_loss(s, a, tau=0.2, sigma=0.05)), (0, 1)))
    for _ in range(200):
        gs, ga = grad(src, anc)
        src, anc = src - 0.5 * gs, anc - 0.5 * ga
    nearest = np.abs(t_s[:, None] - t_a[None, :]).argmin(-1)
    cos = 1.0 - np.asarray(cosine_cost(src, anc))[0]
    assert np.all(cos.argmax(-1) == nearest)


def test_time_contrastive_loss_rejects_bad_arguments(rng):
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="tau and sigma"):
        time_contrastive_loss(x, x, tau=0.0)
    with pytest.raises(ValueError, match="source_mask"):
        time_contrastive_loss(x, x, np.ones((2, 4), bool))


def test_segment_mean_resample_matches_adaptive_average_pooling(rng):
    b, ts, tt, d = 3, 7, 5, 2
    src = rng.normal(size=(b, ts, d)).astype(np.float32)
    sm = right_padded_mask([7, 3, 0], ts)
    tm = right_padded_mask([5, 5, 4], tt)
    out, plan = segment_mean_resample(src, tt, sm, tm)
    ref = np.zeros((b, tt, d), np.float32)
    for n in range(b):
        ns, nt = sm[n].sum(), tm[n].sum()
        for j in range(nt):
            lo, hi = (j * ns) // nt, -((-(j + 1) * ns) // nt)
            if hi > lo:
                ref[n, j] = src[n, lo:hi].mean(axis=0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plan)[1].sum(0), [1.0] * 5, atol=1e-6)   # upsampling 3 -> 5


def test_mmd_matches_double_loop_with_masks_and_bandwidths(rng):
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    y = (rng.normal(size=(3, 6, 4)) + 0.5).astype(np.float32)
    xm = right_padded_mask([5, 2, 0], 5)
    ym = right_padded_mask([6, 4, 6], 6)
    for sigma in (1.0, (0.5, 2.0)):
        got = fast_jit(mmd)(x, y, sigma, xm, ym)
        sig = sigma if isinstance(sigma, tuple) else (sigma,)
        ref = [mmd_numpy(x[n], y[n], sig, xm[n], ym[n]) for n in range(3)]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_mmd_zero_for_identical_positive_otherwise_and_differentiable(rng):
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    assert np.all(np.abs(np.asarray(mmd(x, x, 1.0))) < 1e-6)
    y = x + 1.0
    assert np.all(np.asarray(mmd(x, y, 1.0)) > 1e-3)
    g = jax.grad(lambda a: jnp.sum(mmd(a, y, 1.0)))(x)
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)
    g_same = jax.grad(lambda a: jnp.sum(mmd(a, x, 1.0)))(x)          # at the minimum: finite, ~zero
    assert np.all(np.isfinite(g_same)) and np.max(np.abs(g_same)) < 1e-4
    z = np.zeros((2, 4, 3), np.float32)
    assert np.all(np.isfinite(jax.grad(lambda a: jnp.sum(mmd(a, z, 1.0, np.zeros((2, 4), bool))))(z)))


def test_sinkhorn_marginals_and_distance(rng):
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    y = rng.normal(size=(2, 5, 4)).astype(np.float32)
    xm = right_padded_mask([6, 4], 6)
    ym = right_padded_mask([5, 3], 5)
    cost = cosine_cost(x, y)
    plan, dist = fast_jit(lambda c: sinkhorn(c, xm, ym, epsilon=0.1, num_iters=300))(cost)
    plan = np.asarray(plan)
    for n in range(2):
        nx, ny = xm[n].sum(), ym[n].sum()
        np.testing.assert_allclose(plan[n].sum(1)[:nx], 1.0 / nx, atol=1e-4)
        np.testing.assert_allclose(plan[n].sum(0)[:ny], 1.0 / ny, atol=1e-4)
        assert np.all(plan[n, nx:] == 0) and np.all(plan[n, :, ny:] == 0)
    np.testing.assert_allclose(dist, np.sum(plan * np.asarray(cost), axis=(1, 2)), rtol=1e-5)
    # Against plain (non-log) Sinkhorn-Knopp in float64 on the valid block.
    c = np.asarray(cost, np.float64)[1, :4, :3]
    k = np.exp(-c / 0.1)
    u, v = np.ones(4), np.ones(3)
    for _ in range(2000):
        u = (1 / 4) / (k @ v)
        v = (1 / 3) / (k.T @ u)
    np.testing.assert_allclose(plan[1, :4, :3], u[:, None] * k * v[None, :], atol=1e-5)


def test_sinkhorn_gradient_matches_finite_differences_and_masked_is_finite(rng):
    with jax.enable_x64(True):
        cost = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float64)
        direction = jnp.asarray(rng.normal(size=(4, 3)), jnp.float64)
        f = lambda c: sinkhorn(c, epsilon=0.2, num_iters=200)[1]
        g = jax.grad(f)(cost)
        h = 1e-5
        fd = (f(cost + h * direction) - f(cost - h * direction)) / (2 * h)
        np.testing.assert_allclose(jnp.sum(g * direction), fd, rtol=1e-5)
    empty = np.zeros((1, 3), bool)
    g = jax.grad(lambda c: jnp.sum(sinkhorn(c, empty, None, num_iters=10)[1]))(np.ones((1, 3, 2), np.float32))
    assert np.all(np.isfinite(g))
    plan, dist = sinkhorn(np.ones((1, 3, 2), np.float32), empty, None, num_iters=10)
    assert np.all(np.asarray(plan) == 0) and float(dist[0]) == 0.0


def test_plot_ot_plan_writes_a_png_cropped_to_valid_tokens(tmp_path, rng):
    from alignmamba_jax.visualize import plot_ot_plan
    src, anc = rng.normal(size=(1, 6, 3)).astype(np.float32), rng.normal(size=(1, 4, 3)).astype(np.float32)
    sm, am = right_padded_mask([5], 6), right_padded_mask([3], 4)
    _, plan = ot_align(src, anc, sm, am)
    path = plot_ot_plan(plan[0], str(tmp_path / "plan.png"), source_mask=sm[0], anchor_mask=am[0],
                        anchor_tokens=["a", "b", "c"], reference=[0, 1, -1, 2, 2, -1])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="plan must be"):
        plot_ot_plan(plan, str(tmp_path / "bad.png"))
