"""ot_align, mmd, sinkhorn, segment_mean_resample against brute-force NumPy versions of their equations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax.align import cosine_cost, mmd, ot_align, segment_mean_resample, sinkhorn

# Tiny graphs: XLA's backend optimisations cost far more compile time than they save at run time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def right_padded_mask(lengths, t):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def ot_align_numpy(src, anc, sm, am):
    """Paper eqs. (3), (5), (6) by loops: C = 1 - cos, M(i,j) = 1/T_s at argmin_j C(i,j), aligned = M^T src."""
    b, ts, d = src.shape
    ta = anc.shape[1]
    plan = np.zeros((b, ts, ta))
    for n in range(b):
        n_src = sm[n].sum()
        valid_anchor = [j for j in range(ta) if am[n, j]]
        for i in range(ts):
            if not sm[n, i] or not valid_anchor:
                continue
            costs = []
            for j in valid_anchor:
                nx, ny = np.linalg.norm(src[n, i]), np.linalg.norm(anc[n, j])
                cos = 0.0 if nx == 0 or ny == 0 else src[n, i] @ anc[n, j] / (nx * ny)
                costs.append(1.0 - cos)
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
                        anchor_tokens=["a", "b", "c"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="plan must be"):
        plot_ot_plan(plan, str(tmp_path / "bad.png"))
