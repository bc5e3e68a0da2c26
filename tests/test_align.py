"""ot_align, mmd, sinkhorn, segment_mean_resample against brute-force NumPy versions of their equations."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax import align
from alignmamba_jax.align import (cosine_cost, masked_centre, mmd, ot_align, relative_time, segment_mean_resample,
                                  sinkhorn, sinkhorn_distance, time_contrastive_loss)

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
    with pytest.raises(ValueError, match=r"tau must be finite and > 0, found 0.0"):
        time_contrastive_loss(x, x, tau=0.0)
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0, found nan"):
        time_contrastive_loss(x, x, sigma=np.nan)
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


# ---- blockwise == dense, masked values, argument checks, memory ----------------------------------------------

def ot_align_dense(src, anc, sm, am, centred=False, barycentric=False, source_key=None, anchor_key=None,
                   time_prior=0.0):
    """The dense formulation ot_align had before it went blockwise: the whole (T_s x T_a) cost, its argmin, the
    one-hot plan and aligned = M^T source as an einsum."""
    sk = src if source_key is None else source_key
    ak = anc if anchor_key is None else anchor_key
    if centred:
        sk, ak = masked_centre(sk, sm), masked_centre(ak, am)
    cost = cosine_cost(sk, ak)
    if time_prior:
        cost = cost + time_prior * jnp.abs(relative_time(sm)[..., :, None] - relative_time(am)[..., None, :])
    nearest = jnp.argmin(jnp.where(am[..., None, :], jax.lax.stop_gradient(cost), jnp.inf), axis=-1)
    n_src = jnp.sum(sm, axis=-1, dtype=jnp.float32)[..., None]
    mass = jnp.where(sm & jnp.any(am, axis=-1, keepdims=True), 1.0 / jnp.maximum(n_src, 1.0), 0.0)
    plan = jax.nn.one_hot(nearest, anc.shape[-2], dtype=jnp.float32) * mass[..., None]
    aligned = jnp.einsum("...ij,...id->...jd", plan, src)
    if barycentric:
        column = jnp.sum(plan, axis=-2)[..., None]
        aligned = jnp.where(column > 0, aligned / jnp.maximum(column, 1e-12), 0.0)
    return aligned, plan


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows, so that the row-tiled code runs several tiles and a padded last one on test sizes."""
    monkeypatch.setattr(align, "_TILE_ELEMENTS", 64)


def jit_value_and_grads(f, g_out):
    """args -> (f(*args), gradient of <f(*args), g_out> with respect to every arg), jitted."""
    return fast_jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) * g_out), range(len(a)))(*a)))


def value_and_grads(f, g_out, *args):
    return jit_value_and_grads(f, g_out)(*args)


def tricky_ot_inputs(rng):
    """(2, 3) batch dims; masks with holes, one-token and fully masked sequences; exact ties (zero source tokens
    cost 1 against every anchor token, duplicated anchor tokens)."""
    ts, ta, d = 7, 5, 4
    src = rng.normal(size=(2, 3, ts, d)).astype(np.float32)
    anc = rng.normal(size=(2, 3, ta, d)).astype(np.float32)
    sm = np.ones((2, 3, ts), bool)
    am = np.ones((2, 3, ta), bool)
    sm[0, 1, 1:] = False                                   # one source token
    am[0, 2, 1:] = False                                   # one anchor token
    sm[1, 0] = False                                       # fully masked source
    am[1, 1] = False                                       # fully masked anchor
    am[1, 2, :2] = False                                   # holes before the ties below
    src[0, 0, 2] = 0.0                                     # tie over all anchors: the first valid one wins
    src[1, 2, 3] = 0.0
    anc[0, 0, 3] = anc[0, 0, 1]                            # duplicated anchor: the first copy wins
    anc[1, 2, 4] = anc[1, 2, 2]
    src[1, 2, 5] = anc[1, 2, 2] * 2.0                      # ... and this token surely picks it
    return src, anc, sm, am


OT_OPTIONS = {"paper": {}, "centred": {"centred": True}, "time_prior": {"time_prior": 0.5},
              "barycentric": {"barycentric": True}, "keys": {"keys": True, "centred": True, "time_prior": 0.3}}


@pytest.mark.parametrize("options", ["paper", "keys"])
def test_ot_align_blockwise_equals_dense_values_plans_and_gradients(rng, small_tiles, options):
    src, anc, sm, am = tricky_ot_inputs(rng)
    g_out = rng.normal(size=anc.shape).astype(np.float32)
    cases = OT_OPTIONS if options == "paper" else {options: OT_OPTIONS[options]}
    for name, kwargs in cases.items():
        kwargs = dict(kwargs)
        if kwargs.pop("keys", False):
            kwargs["source_key"] = rng.normal(size=src.shape[:-1] + (3,)).astype(np.float32)
            kwargs["anchor_key"] = rng.normal(size=anc.shape[:-1] + (3,)).astype(np.float32)
        light, grads = value_and_grads(lambda s, a: ot_align(s, a, sm, am, return_plan=False, **kwargs)[0],
                                       g_out, src, anc)
        ref, ref_grads = value_and_grads(lambda s, a: ot_align_dense(s, a, sm, am, **kwargs)[0], g_out, src, anc)
        np.testing.assert_allclose(light, ref, rtol=1e-6, atol=1e-7, err_msg=name)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.all(np.asarray(grads[1]) == 0)
        _, plan = fast_jit(lambda s, a: ot_align(s, a, sm, am, **kwargs))(src, anc)
        ref_plan = fast_jit(lambda s, a: ot_align_dense(s, a, sm, am, **kwargs)[1])(src, anc)
        np.testing.assert_array_equal(plan, ref_plan, err_msg=name)
        if name in ("paper", "barycentric"):         # the paper's cost: the planted ties are exact
            assert np.argmax(plan[0, 0, 2]) == 0 and np.argmax(plan[1, 2, 3]) == 2 and np.argmax(plan[1, 2, 5]) == 2
    assert ot_align(src, anc, sm, am, return_plan=False)[1] is None


def mmd_dense(x, y, sigma, xm, ym):
    """The dense formulation mmd had before it went blockwise: (T_x x T_y x n_sigma) kernels from
    |a|^2 + |b|^2 - 2ab."""
    sigmas = jnp.atleast_1d(jnp.asarray(sigma, jnp.float32))
    xw, yw = xm.astype(jnp.float32), ym.astype(jnp.float32)
    wx = xw / jnp.maximum(jnp.sum(xw, -1, keepdims=True), 1.0)
    wy = yw / jnp.maximum(jnp.sum(yw, -1, keepdims=True), 1.0)

    def mean_kernel(a, b, wa, wb):
        sq = jnp.maximum(jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
                         - 2.0 * jnp.einsum("...id,...jd->...ij", a, b), 0.0)
        k = jnp.mean(jnp.exp(-sq[..., None] / (2.0 * sigmas ** 2)), axis=-1)
        return jnp.einsum("...i,...ij,...j->...", wa, k, wb)

    value = mean_kernel(x, x, wx, wx) + mean_kernel(y, y, wy, wy) - 2.0 * mean_kernel(x, y, wx, wy)
    return jnp.where((jnp.sum(xw, -1) > 0) & (jnp.sum(yw, -1) > 0), jnp.maximum(value, 0.0), 0.0)


@pytest.mark.parametrize("spread", [1.0, 300.0], ids=["matmul_form", "difference_form"])
def test_mmd_blockwise_equals_dense_values_and_gradients(rng, small_tiles, spread):
    """Both distance forms of the tiles (tokens spread over 300 sigma take the difference form) against the
    dense formula (float64 for the wide spread, where float32 |a|^2 + |b|^2 - 2ab is inaccurate)."""
    x = (spread * rng.normal(size=(2, 3, 9, 4))).astype(np.float32)
    y = (spread * (rng.normal(size=(2, 3, 6, 4)) + 0.5)).astype(np.float32)
    y[..., :2, :] = x[..., :2, :] + 0.3                     # close pairs: kernels well away from 0
    xm = rng.uniform(size=x.shape[:-1]) < 0.8
    ym = rng.uniform(size=y.shape[:-1]) < 0.8
    xm[0, 0] = False                                        # an empty side gives 0
    ym[1, 2, 1:] = False                                    # one token
    sigma = (0.5, 2.0, 8.0)
    g_out = rng.normal(size=x.shape[:2]).astype(np.float32)
    got, grads = value_and_grads(lambda a, b: mmd(a, b, sigma, xm, ym), g_out, x, y)
    with jax.enable_x64(spread > 1):
        dtype = jnp.float64 if spread > 1 else jnp.float32
        ref, ref_grads = value_and_grads(lambda a, b: mmd_dense(a, b, sigma, xm, ym), g_out.astype(dtype),
                                         x.astype(dtype), y.astype(dtype))
    assert float(got[0, 0]) == 0.0 and np.all(np.asarray(got) >= 0) and np.max(np.asarray(ref)) > 0.1
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 / spread)


def test_mmd_bandwidth_ladder_is_one_exponential_and_equals_separate_ones(rng):
    """Bandwidths with nested integer squared ratios share one exponential (`align._ladder`): the compiled
    program computes one exponential per kernel sum and cond branch (6), not one per bandwidth (30), and values
    and gradients equal the dense formula's separate exponentials (the demo's bandwidths, the demo's token
    scale, kernels from ~0 to 1 for every sigma)."""
    assert align._ladder((1.0, 2.0, 4.0, 8.0, 16.0)) == (256, 64, 16, 4, 1)
    assert align._ladder([3.0, 1.0]) == (1, 9)
    for no_ladder in (1.0, (1.0, 2.0, 3.0), (1.0, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0), (1.0, 1.5)):
        assert align._ladder(no_ladder) is None, no_ladder       # single, 2.25, 9216 > max power, 2.25
    assert align._ladder((1.0, 3.0, 9.0)) == (81, 9, 1) and align._ladder((6.0, 3.0, 2.0)) is None   # 9 % 4 != 0
    sigma = (1.0, 2.0, 4.0, 8.0, 16.0)
    x = (4.0 * rng.normal(size=(3, 40, 8))).astype(np.float32)
    y = (4.0 * rng.normal(size=(3, 12, 8)) + 1.0).astype(np.float32)
    xm, ym = rng.uniform(size=x.shape[:-1]) < 0.8, np.ones(y.shape[:-1], bool)
    hlo = jax.jit(lambda a, b: mmd(a, b, sigma, xm, ym)).lower(x, y).compile().as_text()
    assert hlo.count("exponential(") == 6, hlo.count("exponential(")
    g_out = rng.normal(size=3).astype(np.float32)
    got, grads = value_and_grads(lambda a, b: mmd(a, b, sigma, xm, ym), g_out, x, y)
    ref, ref_grads = value_and_grads(lambda a, b: mmd_dense(a, b, sigma, xm, ym), g_out, x, y)
    assert np.min(np.asarray(ref)) > 1e-3
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_mmd_gradient_with_respect_to_a_traced_sigma(rng):
    """A traced sigma takes one exponential per bandwidth, and its gradient (the factors' cotangent, formed
    only when sigma is differentiated) equals the dense formula's."""
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    y = (rng.normal(size=(2, 6, 4)) + 0.5).astype(np.float32)
    xm, ym = rng.uniform(size=x.shape[:-1]) < 0.8, np.ones(y.shape[:-1], bool)
    g_out = np.array([1.0, -0.5], np.float32)
    sigmas = np.array([0.7, 1.5, 3.0], np.float32)
    got = fast_jit(jax.grad(lambda s: jnp.sum(mmd(x, y, s, xm, ym) * g_out)))(sigmas)
    ref = fast_jit(jax.grad(lambda s: jnp.sum(mmd_dense(x, y, s, xm, ym) * g_out)))(sigmas)
    assert np.max(np.abs(np.asarray(ref))) > 1e-2
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_mmd_is_finite_and_right_far_from_the_origin():
    """|a|^2 + |b|^2 - 2ab overflows float32 near 1e20 (NaN); differences do not. Against float64 NumPy on the
    same float32 values, with bandwidths at the tokens' scale (kernels between 0 and 1) and at 1 (exactly 0 or 1)."""
    rng = np.random.default_rng(1)
    x = (1e20 * rng.normal(size=(2, 5, 3))).astype(np.float32)
    y = (1e20 * (rng.normal(size=(2, 4, 3)) + 0.5)).astype(np.float32)
    y[1, :2] = x[1, :2]                                     # shared tokens: kernel exactly 1 at any bandwidth
    sigmas = (1.0, 1e20, 4e20)
    got, grads = value_and_grads(lambda a, b: mmd(a, b, sigmas), np.ones(2, np.float32), x, y)
    ref = [mmd_numpy(x[n].astype(np.float64), y[n].astype(np.float64), sigmas, np.ones(5, bool), np.ones(4, bool))
           for n in range(2)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in grads)


def sinkhorn_unrolled(cost, xm, ym, epsilon, num_iters):
    """Plain log-domain Sinkhorn whose autodiff keeps every iteration's (T_x x T_y) arrays, then rounded."""
    valid = xm[..., :, None] & ym[..., None, :]
    log_a = -jnp.log(xm.sum(-1, keepdims=True).astype(jnp.float32))
    log_b = -jnp.log(ym.sum(-1, keepdims=True).astype(jnp.float32))
    f, g = jnp.zeros(xm.shape), jnp.zeros(ym.shape)
    score = lambda f, g: jnp.where(valid, (f[..., :, None] + g[..., None, :] - cost) / epsilon, -1e9)
    for _ in range(num_iters):
        f = jnp.where(xm, f + epsilon * (log_a - jax.nn.logsumexp(score(f, g), axis=-1)), 0.0)
        g = jnp.where(ym, g + epsilon * (log_b - jax.nn.logsumexp(score(f, g), axis=-2)), 0.0)
    plan = jnp.where(valid, jnp.exp(score(f, g)), 0.0)
    # Rounding onto the couplings (Altschuler et al. 2017, Algorithm 2; the columns are exact after the g step).
    a = xm / np.maximum(xm.sum(-1, keepdims=True), 1)           # a fully masked example carries no mass
    b = ym / np.maximum(ym.sum(-1, keepdims=True), 1)
    plan = plan * jnp.minimum(a / jnp.maximum(plan.sum(-1), 1e-30), 1.0)[..., None]
    err_a, err_b = a - plan.sum(-1), b - plan.sum(-2)
    plan = plan + err_a[..., :, None] * err_b[..., None, :] / jnp.maximum(err_b.sum(-1), 1e-30)[..., None, None]
    return jnp.sum(plan * jnp.where(valid, cost, 0.0), axis=(-2, -1))


def test_sinkhorn_distance_equals_the_converged_unrolled_value_and_gradient(rng):
    """The early-stopped, implicitly differentiated distance against the plain unrolled Sinkhorn run long enough
    to converge (masks with padding, one fully masked example, batch dims (2, 2))."""
    x = rng.normal(size=(2, 2, 9, 4)).astype(np.float32)
    y = rng.normal(size=(2, 2, 7, 4)).astype(np.float32)
    xm = right_padded_mask([9, 5, 1, 0], 9).reshape(2, 2, 9)
    ym = right_padded_mask([7, 6, 4, 7], 7).reshape(2, 2, 7)
    g_out = rng.normal(size=(2, 2)).astype(np.float32)
    got, grads = value_and_grads(
        lambda a, b: sinkhorn_distance(cosine_cost(a, b), xm, ym, epsilon=0.1, tolerance=1e-6), g_out, x, y)
    ref, ref_grads = value_and_grads(lambda a, b: sinkhorn_unrolled(cosine_cost(a, b), xm, ym, 0.1, 100),
                                     g_out, x, y)
    assert got[1, 1] == 0 and np.all(grads[0][1, 1] == 0) and np.all(grads[1][1, 1] == 0)
    ok = np.ones((2, 2), bool)
    ok[1, 1] = False                                  # the reference is NaN for the fully masked example
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        g, r = g[ok], r[ok]
        assert np.all(np.isfinite(g)) and np.mean(np.isfinite(r)) > 0.5   # the reference: NaN at masked tokens
        np.testing.assert_allclose(g[np.isfinite(r)], r[np.isfinite(r)], rtol=1e-3, atol=1e-5)
    # stopped at the default tolerance: the same value to well within what the loss resolves
    d, error = sinkhorn_distance(cosine_cost(x, y), xm, ym, epsilon=0.1, return_error=True)
    assert np.all(error <= 1e-4)
    np.testing.assert_allclose(d[ok], ref[ok], atol=1e-3)


def test_sinkhorn_distance_matches_the_closed_form_of_two_by_two():
    """Uniform 2 x 2 entropic OT in closed form: P = [[p, 1/2 - p], [1/2 - p, p]] with
    p / (1/2 - p) = exp(-(C11 + C22 - C12 - C21) / (2 epsilon)); value and gradient of <P, C>."""
    def closed(c, eps=0.1):
        s = jnp.exp(-(c[0, 0] + c[1, 1] - c[0, 1] - c[1, 0]) / (2 * eps))
        p = 0.5 * s / (1 + s)
        return p * (c[0, 0] + c[1, 1]) + (0.5 - p) * (c[0, 1] + c[1, 0])
    cost = np.array([[0.1, 0.7], [0.9, 0.3]], np.float64)
    f = lambda c: sinkhorn_distance(c, epsilon=0.1, tolerance=1e-9, max_iters=500)  # noqa: E731
    with jax.enable_x64(True):
        np.testing.assert_allclose(f(jnp.asarray(cost)), closed(jnp.asarray(cost)), rtol=1e-9)
        np.testing.assert_allclose(jax.grad(f)(jnp.asarray(cost)), jax.grad(closed)(jnp.asarray(cost)), rtol=1e-6)


def test_sinkhorn_gradient_equals_the_unrolled_one_and_memory_does_not_grow_with_iterations(rng):
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    y = rng.normal(size=(2, 7, 4)).astype(np.float32)
    xm, ym = right_padded_mask([9, 5], 9), right_padded_mask([7, 6], 7)
    g_out = np.ones(2, np.float32)
    got, grads = value_and_grads(
        lambda a, b: sinkhorn(cosine_cost(a, b), xm, ym, epsilon=0.2, num_iters=30)[1], g_out, x, y)
    ref, ref_grads = value_and_grads(lambda a, b: sinkhorn_unrolled(cosine_cost(a, b), xm, ym, 0.2, 30), g_out, x, y)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)

    def grad_temp_bytes(num_iters, t=256):
        f = jax.grad(lambda c: sinkhorn(c, epsilon=0.1, num_iters=num_iters)[1])
        return jax.jit(f).lower(jax.ShapeDtypeStruct((t, t), jnp.float32)).compile().memory_analysis().temp_size_in_bytes

    # Autodiff through the iterations keeps the (T x T) scores of each: 50 iterations would cost 10x 5.
    assert grad_temp_bytes(50) < 1.5 * grad_temp_bytes(5)


def test_values_under_masks_reach_neither_values_nor_gradients(rng):
    """Every function gives the same values and gradients whatever sits under its masks (NaN, inf, -inf vs 0)."""
    src = rng.normal(size=(2, 6, 3)).astype(np.float32)
    anc = rng.normal(size=(2, 4, 3)).astype(np.float32)
    sm, am = right_padded_mask([4, 6], 6), right_padded_mask([3, 4], 4)
    am[1, 1] = False
    junk = np.array([np.nan, np.inf, -np.inf], np.float32)
    dirty_src = np.where(sm[..., None], src, junk[rng.integers(0, 3, size=src.shape)])
    dirty_anc = np.where(am[..., None], anc, junk[rng.integers(0, 3, size=anc.shape)])
    src, anc = np.where(sm[..., None], src, 0.0), np.where(am[..., None], anc, 0.0)
    valid = sm[..., :, None] & am[..., None, :]
    functions = {
        "ot_align": lambda s, a: ot_align(s, a, sm, am)[0],
        "ot_align_options": lambda s, a: ot_align(s, a, sm, am, centred=True, time_prior=0.5, barycentric=True,
                                                  source_key=s * 2.0, anchor_key=a - 1.0)[0],
        "mmd": lambda s, a: mmd(s, a, (1.0, 3.0), sm, am),
        "time_contrastive_loss": lambda s, a: time_contrastive_loss(s, a, sm, am, centred=True),
        "segment_mean_resample": lambda s, a: segment_mean_resample(s, 4, sm, am, return_plan=False)[0],
        "masked_centre": lambda s, a: masked_centre(s, sm),
    }
    cost = np.asarray(cosine_cost(src, anc))
    dirty_cost = np.where(valid, cost, junk[rng.integers(0, 3, size=cost.shape)])
    cases = {name: (f, (src, anc), (dirty_src, dirty_anc)) for name, f in functions.items()}
    cases["sinkhorn"] = (lambda c: sinkhorn(c, sm, am, epsilon=0.2, num_iters=20)[1], (cost,), (dirty_cost,))
    for name, (f, clean_args, dirty_args) in cases.items():
        run = jit_value_and_grads(f, np.ones(np.shape(jax.eval_shape(f, *clean_args)), np.float32))
        (clean, clean_grads), (dirty, dirty_grads) = run(*clean_args), run(*dirty_args)
        np.testing.assert_array_equal(dirty, clean, err_msg=name)
        for gc, gd in zip(clean_grads, dirty_grads):
            assert np.all(np.isfinite(gd)), name
            np.testing.assert_array_equal(gd, gc, err_msg=name)


def test_bad_arguments_raise_clear_errors(rng):
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    empty = np.zeros((2, 0, 3), np.float32)
    for epsilon in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match=r"epsilon must be finite and > 0, found"):
            sinkhorn(cosine_cost(x, x), epsilon=epsilon)
    for sigma in (0.0, -2.0, np.inf, np.nan, (1.0, 0.0), ()):
        with pytest.raises(ValueError, match=r"sigma must be finite and > 0, found"):
            mmd(x, x, sigma)
    with pytest.raises(ValueError, match=r"num_iters must be an int >= 0"):
        sinkhorn(cosine_cost(x, x), num_iters=2.5)
    with pytest.raises(ValueError, match=r"anchor has no tokens.*\(2, 0, 3\)"):
        ot_align(x, empty)
    with pytest.raises(ValueError, match=r"source has no tokens.*\(2, 0, 3\)"):
        ot_align(empty, x)
    with pytest.raises(ValueError, match=r"source_key has no tokens"):
        time_contrastive_loss(empty, x)
    with pytest.raises(ValueError, match=r"anchor_key has no tokens"):
        time_contrastive_loss(x, empty)
    with pytest.raises(ValueError, match=r"time_prior must be finite and >= 0"):
        ot_align(x, x, time_prior=-1.0)
    np.testing.assert_array_equal(mmd(empty, x), [0.0, 0.0])     # no valid token: 0, as with masks


def test_time_contrastive_loss_and_resampling_blockwise_gradients_equal_dense(rng, small_tiles):
    src = rng.normal(size=(3, 8, 4)).astype(np.float32)
    anc = rng.normal(size=(3, 5, 4)).astype(np.float32)
    sm, am = right_padded_mask([8, 3, 0], 8), right_padded_mask([5, 5, 2], 5)

    def nce_dense(s, a):
        """time_contrastive_loss with the whole (T_s x T_a) logits at once."""
        s, a = masked_centre(s, sm), masked_centre(a, am)
        valid = am[:, None, :]
        logits = jnp.where(valid, (1.0 - cosine_cost(s, a)) / 0.5, -1e9)
        gap = jnp.abs(relative_time(sm)[..., :, None] - relative_time(am)[..., None, :])
        target = jax.nn.softmax(jnp.where(valid, -gap / 0.2, -1e9), axis=-1)
        ce = -jnp.sum(jnp.where(valid, target * jax.nn.log_softmax(logits, axis=-1), 0.0), axis=-1)
        rows = (sm & am.any(-1, keepdims=True)).astype(jnp.float32)
        return jnp.sum(ce * rows, -1) / jnp.maximum(rows.sum(-1), 1.0)

    g_out = rng.normal(size=3).astype(np.float32)
    got, grads = value_and_grads(lambda s, a: time_contrastive_loss(s, a, sm, am, tau=0.5, sigma=0.2, centred=True),
                                 g_out, src, anc)
    ref, ref_grads = value_and_grads(nce_dense, g_out, src, anc)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)

    target_mask = right_padded_mask([5, 4, 5], 5)
    out, plan = segment_mean_resample(src, 5, sm, target_mask)
    g_out = rng.normal(size=out.shape).astype(np.float32)
    light, grad = value_and_grads(lambda s: segment_mean_resample(s, 5, sm, target_mask, return_plan=False)[0],
                                  g_out, src)
    dense, dense_grad = value_and_grads(lambda s: jnp.einsum("bij,bid->bjd", plan, s), g_out, src)
    np.testing.assert_allclose(light, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[0], dense_grad[0], rtol=1e-5, atol=1e-6)
    assert segment_mean_resample(src, 5, sm, target_mask, return_plan=False)[1] is None


def compiled_bytes(f, *shapes):
    memory = jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes


def test_compiled_memory_is_linear_in_length():
    """At T = 8192 tokens per side a (T x T) float32 array is 256 MiB; each function, values or gradients, stays
    within 4 KiB per token (16 features): 32 MiB, linear in T (tiles are align._TILE_ELEMENTS = 4 MiB)."""
    t, d = 8192, 16
    mask = np.arange(t) < t - 3
    functions = {
        "ot_align": lambda s, a: ot_align(s, a, mask, mask, centred=True, time_prior=0.5, return_plan=False)[0],
        "ot_align grad": jax.grad(lambda s, a: jnp.sum(ot_align(s, a, mask, mask, return_plan=False)[0] ** 2)),
        "mmd grad": jax.grad(lambda s, a: mmd(s, a, (1.0, 2.0, 4.0, 8.0, 16.0), mask, mask), argnums=(0, 1)),
        "time_contrastive_loss grad": jax.grad(lambda s, a: time_contrastive_loss(s, a, mask, mask, centred=True),
                                               argnums=(0, 1)),
        "segment_mean_resample grad": jax.grad(
            lambda s, a: jnp.sum(segment_mean_resample(s, t, mask, mask, return_plan=False)[0] ** 2)),
    }
    for name, f in functions.items():
        used = compiled_bytes(f, (t, d), (t, d))
        assert used < 4096 * t, f"{name}: {used / 2 ** 20:.0f} MiB at T = {t}"


def assert_coupling(plan, xm, ym, tolerance):
    """plan (B, T_x, T_y) is non-negative, zero off the masks, with marginals 1/n within `tolerance` (B,) in L1."""
    plan = np.asarray(plan, np.float64)
    assert np.all(plan >= 0)
    for n in range(plan.shape[0]):
        nx, ny = xm[n].sum(), ym[n].sum()
        assert np.sum(np.abs(plan[n].sum(1)[:nx] - 1.0 / nx)) <= tolerance[n] + 1e-5
        assert np.sum(np.abs(plan[n].sum(0)[:ny] - 1.0 / ny)) <= tolerance[n] + 1e-5
        assert np.all(plan[n, nx:] == 0) and np.all(plan[n, :, ny:] == 0)


@pytest.mark.parametrize("shape", [(6, 5), (3, 7)])
def test_sinkhorn_at_any_epsilon_gives_a_coupling_or_refuses(rng, shape):
    """From epsilon 1e-1 to 1e-20: non-negative, mass 1, both marginals exact, masked rows / columns empty; an
    epsilon below float32's resolution of the cost raises ValueError, and traced (jit), where nothing can be
    refused, still gives a coupling. With a forbidden (+inf) pair, which gets no mass, the marginals are off by
    at most the reported error."""
    tx, ty = shape
    cost = np.array(cosine_cost(rng.normal(size=(2, tx, 8)).astype(np.float32),
                                rng.normal(size=(2, ty, 8)).astype(np.float32)))
    forbidden = cost.copy()
    forbidden[0, 0, 0] = np.inf
    xm, ym = right_padded_mask([tx, tx - 1], tx), right_padded_mask([ty, ty - 2], ty)
    run = jax.jit(lambda c, e: sinkhorn(c, xm, ym, epsilon=e, return_error=True))
    for epsilon in (1e-1, 1e-2, 1e-4, 1e-6, 1e-9, 1e-20):
        if epsilon < 64 * 2.0 ** -23 * np.max(np.abs(cost)):
            with pytest.raises(ValueError, match=rf"epsilon={epsilon} is below what float32 resolves for this cost"):
                sinkhorn(cost, xm, ym, epsilon=epsilon)
        plan, distance, _ = run(cost, np.float32(epsilon))
        assert_coupling(plan, xm, ym, np.zeros(2))
        np.testing.assert_allclose(distance, np.sum(np.asarray(plan) * cost, axis=(1, 2)), rtol=1e-5)
        plan, distance, error = run(forbidden, np.float32(epsilon))
        assert plan[0, 0, 0] == 0 and np.all(np.isfinite(distance))
        assert_coupling(plan, xm, ym, np.asarray(error))


def test_sinkhorn_scaled_to_small_epsilon_is_near_the_exact_transport_cost(rng):
    """At epsilon 1e-3 plain Sinkhorn is far from converged after 1000 iterations; with epsilon scaling the
    reported error is small and the distance is within epsilon log(T_x T_y) of the exact OT cost (a linear
    program), never below it (the plan is a coupling). Few iterations: the error says so."""
    from scipy.optimize import linprog
    cost = cosine_cost(rng.normal(size=(2, 6, 8)).astype(np.float32), rng.normal(size=(2, 5, 8)).astype(np.float32))
    _, _, error = sinkhorn(cost, epsilon=1e-2, num_iters=2, return_error=True)
    assert np.all(np.asarray(error) > 1e-2)
    _, distance, error = sinkhorn(cost, epsilon=1e-3, num_iters=1000, return_error=True)
    assert np.all(np.asarray(error) < 1e-3)
    for n in range(2):
        c = np.asarray(cost, np.float64)[n]
        rows = np.kron(np.eye(6), np.ones(5))
        columns = np.kron(np.ones(6), np.eye(5))
        exact = linprog(c.reshape(-1), A_eq=np.vstack([rows, columns]),
                        b_eq=np.r_[np.full(6, 1 / 6), np.full(5, 1 / 5)], bounds=(0, None)).fun
        assert exact - 1e-5 <= float(distance[n]) <= exact + 1e-3 * np.log(30)


def test_sinkhorn_forbidden_pairs_give_finite_distance_and_gradient(rng):
    cost = np.asarray(cosine_cost(rng.normal(size=(1, 4, 8)).astype(np.float32),
                                  rng.normal(size=(1, 4, 8)).astype(np.float32)))
    forbidden = np.eye(4, dtype=bool)[None]
    distance_plan_grad = fast_jit(lambda c: (*jax.value_and_grad(lambda c: sinkhorn(c, epsilon=0.05)[1][0])(c),
                                             sinkhorn(c, epsilon=0.05)[0]))
    distance, grad, plan = distance_plan_grad(np.where(forbidden, np.inf, cost).astype(np.float32))
    assert np.isfinite(distance) and np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[forbidden] == 0)
    assert np.all(np.asarray(plan)[forbidden] == 0)
    # Entropic OT gives a huge finite cost almost no mass: the same distance.
    big, _, _ = distance_plan_grad(np.where(forbidden, 1e3, cost).astype(np.float32))
    np.testing.assert_allclose(distance, big, rtol=1e-4)


def test_float_arguments_can_be_traced(rng):
    """epsilon, sigma, tau, straight_through_tau and time_prior are jit arguments like any array."""
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    y = rng.normal(size=(2, 5, 4)).astype(np.float32)
    calls = {
        "sinkhorn": (lambda v: sinkhorn(cosine_cost(x, y), epsilon=v, num_iters=20)[1], 0.2),
        "mmd": (lambda v: mmd(x, y, v), 0.7),
        "time_contrastive_loss tau": (lambda v: time_contrastive_loss(x, y, tau=v), 0.3),
        "time_contrastive_loss sigma": (lambda v: time_contrastive_loss(x, y, sigma=v), 0.2),
        "ot_align time_prior": (lambda v: ot_align(x, y, time_prior=v)[0], 0.5),
        "ot_align straight_through_tau": (lambda v: ot_align(x, y, straight_through_tau=v)[0], 0.3),
    }
    for name, (f, value) in calls.items():
        np.testing.assert_allclose(fast_jit(f)(np.float32(value)), fast_jit(lambda: f(value))(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    g = jax.grad(lambda t: jnp.sum(ot_align(x, y, straight_through_tau=0.3, time_prior=t)[0] ** 2))(0.5)
    assert np.isfinite(g)


def test_integer_features_are_promoted_not_truncated():
    src = np.array([[[1], [2], [4], [7]]], np.int32)
    anchor = np.array([[[1], [1]]], np.int32)
    aligned, _ = ot_align(src, anchor)
    assert aligned.dtype == jnp.float32
    np.testing.assert_allclose(aligned, ot_align(src.astype(np.float32), anchor.astype(np.float32))[0])
    resampled, _ = segment_mean_resample(src, 3)
    assert resampled.dtype == jnp.float32
    np.testing.assert_allclose(resampled[0, :, 0], [1.5, 3.0, 5.5])
    np.testing.assert_allclose(masked_centre(src)[0, :, 0], [-2.5, -1.5, 0.5, 3.5])


def test_forward_mode_autodiff_works_where_the_docs_say_and_fails_where_they_say_not(rng):
    """docs/alignment.md and docs/kernels.md: jvp through ot_align, sinkhorn, time_contrastive_loss,
    segment_mean_resample and the reference / associative scans equals the reverse-mode directional derivative; mmd
    and the chunked scan (custom VJPs) raise JAX's TypeError, and the docs tell the user to use jacrev or the
    reference backend."""
    from alignmamba_jax.kernels import selective_scan
    x, y = rng.normal(size=(1, 5, 3)).astype(np.float32), rng.normal(size=(1, 4, 3)).astype(np.float32)
    direction = rng.normal(size=x.shape).astype(np.float32)
    delta, a = np.abs(rng.normal(size=(1, 5, 3))).astype(np.float32), -np.abs(rng.normal(size=(3, 2))).astype(np.float32)
    b, c = rng.normal(size=(1, 5, 2)).astype(np.float32), rng.normal(size=(1, 5, 2)).astype(np.float32)
    scan = lambda backend: lambda u: jnp.sum(selective_scan(u, delta, a, b, c, backend=backend))
    supported = {"ot_align": lambda s: jnp.sum(ot_align(s, y, straight_through_tau=0.5)[0]),
                 "sinkhorn": lambda s: sinkhorn(cosine_cost(s, y), num_iters=5)[1][0],
                 "time_contrastive_loss": lambda s: time_contrastive_loss(s, y)[0],
                 "segment_mean_resample": lambda s: jnp.sum(segment_mean_resample(s, 3)[0] ** 2),
                 "reference": scan("reference"), "associative": scan("associative")}
    for name, f in supported.items():
        forward, reverse = fast_jit(lambda s, d: (jax.jvp(f, (s,), (d,))[1], jnp.sum(jax.grad(f)(s) * d)))(x, direction)
        np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-5, err_msg=name)
    for name, f in {"mmd": lambda s: mmd(s, y)[0], "chunked": scan("chunked")}.items():
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(f, (x,), (direction,))
    for page in ("alignment.md", "kernels.md"):
        text = open(os.path.join(os.path.dirname(__file__), "..", "docs", page), encoding="utf-8").read()
        assert "Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) works through" in text, page
        assert "`jax.jacrev`" in text, page


def test_sinkhorn_distance_refuses_a_traced_epsilon():
    cost = np.ones((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="concrete epsilon"):
        jax.jit(lambda e: sinkhorn_distance(cost, epsilon=e))(0.1)
