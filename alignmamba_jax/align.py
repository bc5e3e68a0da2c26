"""Cross-modal alignment as pure functions: the paper's relaxed OT (`ot_align`), Gaussian-kernel MMD (`mmd`),
log-domain entropic OT (`sinkhorn`), mask-aware segment-mean resampling (`segment_mean_resample`), per-sequence
mean-centring (`masked_centre`) and the temporal contrastive matching loss that teaches an OT cost which token
matches which (`time_contrastive_loss`).

Conventions: tokens are (..., T, d) with any leading batch dims; masks are bool (..., T), True = valid, and
None means all valid. Masked tokens carry no mass and receive none. Every function is jit/vmap/grad-safe and
returns finite values (no NaN) for identical tokens, all-zero tokens and fully masked inputs.
"""
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

_EPS = 1e-12


def _mask_or_ones(x, mask, name):
    if mask is None:
        return jnp.ones(x.shape[:-1], bool)
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"{name} must have shape {x.shape[:-1]} (the token axes of its features), "
                         f"found {mask.shape}")
    return mask.astype(bool)


def _check_pair(x, y, xname, yname):
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"{xname} and {yname} must be (..., T, d), found {x.shape} and {y.shape}")
    if x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"{xname} {x.shape} and {yname} {y.shape} must share batch dims and feature width")


def _unit(x):
    # rsqrt(max(|x|^2, eps^2)) rather than x / max(norm(x), eps): the gradient of norm at a zero vector is NaN,
    # and 0 * NaN survives the max's zero cotangent.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS ** 2))


def cosine_cost(x, y):
    """C[..., i, j] = 1 - cos(x_i, y_j) in [0, 2]; a zero vector has cosine 0 with everything (and a finite
    gradient)."""
    return 1.0 - jnp.einsum("...id,...jd->...ij", _unit(x), _unit(y))


def masked_centre(x, mask=None):
    """x minus the mean of its valid tokens, per sequence: (..., T, d) -> (..., T, d); masked tokens -> 0.

    Features that share a large common offset all have cosine ~1 with each other, so the relaxed-OT argmin
    sends every source token to the same anchor token ("hub collapse"); centring each sequence removes it.
    """
    m = _mask_or_ones(x, mask, "mask")
    w = m.astype(jnp.float32)[..., None]
    x32 = x.astype(jnp.float32)
    mean = jnp.sum(x32 * w, axis=-2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
    return jnp.where(m[..., None], x32 - mean, 0.0).astype(x.dtype)


def relative_time(mask):
    """(..., T) validity mask -> (..., T) float32 time (k + 0.5) / n of the k-th of n valid tokens (0 if masked)."""
    m = mask.astype(bool)
    n = jnp.sum(m, axis=-1, keepdims=True, dtype=jnp.float32)
    k = jnp.cumsum(m, axis=-1, dtype=jnp.float32) - 0.5
    return jnp.where(m, k / jnp.maximum(n, 1.0), 0.0)


def ot_align(source, anchor, source_mask=None, anchor_mask=None, *, centred: bool = False,
             straight_through_tau: Optional[float] = None, barycentric: bool = False,
             source_key=None, anchor_key=None, time_prior: float = 0.0):
    """AlignMamba's local alignment: relaxed OT with the anchor's incoming-mass constraint dropped.

    source (..., T_s, d), anchor (..., T_a, d). Cost C(i, j) = 1 - cos(source_i, anchor_j) (eq. 3); each valid
    source token sends all its mass 1/T_s to its cheapest valid anchor token, M(i, j) = 1/T_s iff
    j = argmin_j' C(i, j') (eq. 5; T_s = number of valid source tokens); aligned = M^T source (eq. 6).
    Returns (aligned (..., T_a, d), plan M (..., T_s, T_a)). The defaults are the paper exactly: the plan is
    piecewise constant in the inputs, so gradients reach `source` through M^T source only, never `anchor`.

    Options (ours; the forward plan stays the hard argmin plan above in every case):
    centred: the cost is taken between `masked_centre`d source and anchor (each sequence minus the mean of its
      valid tokens); aligned still averages the uncentred source.
    straight_through_tau: a straight-through plan M + S - stop_gradient(S) with the soft plan
      S(i, j) = (1/T_s) softmax_j(-C(i, j) / tau) over valid anchor tokens: the forward values (plan and
      aligned) are exactly the hard ones, the gradient is that of S^T source with respect to the cost (so it
      reaches both `source` and `anchor` and teaches the projections which token matches which) plus the hard
      plan's M^T d(source).
    barycentric: aligned_j = sum_i M(i, j) source_i / sum_i M(i, j), the mean of the tokens assigned to anchor
      token j (0 where none is), instead of the 1/T_s-scaled sum.
    time_prior: adds time_prior * |t_i - t_j| to the cost, t the `relative_time` of each valid token, so that
      the argmin starts from the time order (what segment-mean resampling assumes) and content refines it.
    source_key (..., T_s, k), anchor_key (..., T_a, k): if given, the cost is taken between these (e.g. learned
      matching features, like attention's queries and keys) instead of between source and anchor; aligned
      still averages `source`.
    """
    _check_pair(source, anchor, "source", "anchor")
    sm = _mask_or_ones(source, source_mask, "source_mask")
    am = _mask_or_ones(anchor, anchor_mask, "anchor_mask")
    if straight_through_tau is not None and not straight_through_tau > 0:
        raise ValueError(f"straight_through_tau must be None or > 0, found {straight_through_tau}")
    source_key = source if source_key is None else source_key
    anchor_key = anchor if anchor_key is None else anchor_key
    _check_pair(source_key, anchor_key, "source_key", "anchor_key")
    if source_key.shape[:-1] != source.shape[:-1] or anchor_key.shape[:-1] != anchor.shape[:-1]:
        raise ValueError(f"source_key {source_key.shape} / anchor_key {anchor_key.shape} must have the token axes "
                         f"of source {source.shape} / anchor {anchor.shape}")
    cost = (cosine_cost(masked_centre(source_key, sm), masked_centre(anchor_key, am)) if centred
            else cosine_cost(source_key, anchor_key))
    if time_prior:
        cost = cost + time_prior * jnp.abs(relative_time(sm)[..., :, None] - relative_time(am)[..., None, :])
    if straight_through_tau is None:
        cost = jax.lax.stop_gradient(cost)
    masked_cost = jnp.where(am[..., None, :], cost, jnp.inf)
    nearest = jnp.argmin(jax.lax.stop_gradient(masked_cost), axis=-1)
    n_src = jnp.sum(sm, axis=-1, dtype=jnp.float32)[..., None, None]
    keep = sm[..., :, None] & jnp.any(am, axis=-1)[..., None, None]
    mass = jnp.where(keep, 1.0 / jnp.maximum(n_src, 1.0), 0.0)[..., 0]            # (..., T_s)
    plan = jax.nn.one_hot(nearest, anchor.shape[-2], dtype=jnp.float32) * mass[..., None]
    # M^T source as a segment sum over each token's nearest anchor, so that the dense plan is only
    # materialised when the caller uses it.
    t_s, t_a, d = source.shape[-2], anchor.shape[-2], source.shape[-1]
    n = math.prod(source.shape[:-2])
    segment = (nearest.reshape(n, t_s) + t_a * jnp.arange(n)[:, None]).reshape(-1)
    source32 = source.astype(jnp.float32)
    weighted = (source32 * mass[..., None]).reshape(n * t_s, d)
    aligned = jax.ops.segment_sum(weighted, segment, num_segments=n * t_a).reshape(source.shape[:-2] + (t_a, d))
    if straight_through_tau is not None:
        logits = jnp.where(am[..., None, :], -cost.astype(jnp.float32) / straight_through_tau, -1e9)
        soft = jax.nn.softmax(logits, axis=-1) * mass[..., None]
        # x - stop_gradient(x) is exactly 0 in the forward pass, so the values stay the hard ones bit for bit.
        plan = plan + (soft - jax.lax.stop_gradient(soft))
        soft_aligned = jnp.einsum("...ij,...id->...jd", soft, jax.lax.stop_gradient(source32))
        aligned = aligned + (soft_aligned - jax.lax.stop_gradient(soft_aligned))
    if barycentric:
        column_mass = jax.lax.stop_gradient(jnp.sum(jax.nn.one_hot(nearest, t_a) * mass[..., None], axis=-2))
        aligned = jnp.where(column_mass[..., None] > 0, aligned / jnp.maximum(column_mass, _EPS)[..., None], 0.0)
    return aligned.astype(source.dtype), plan


def time_contrastive_loss(source_key, anchor_key, source_mask=None, anchor_mask=None, *, tau: float = 1.0,
                          sigma: float = 0.1, centred: bool = False):
    """Temporal contrastive matching (InfoNCE with time-based soft targets); ours, not in the papers.

    For each valid source token i: predicted p_i = softmax_j(cos(k_i, k_j) / tau) over the valid anchor tokens j
    (k = source_key / anchor_key, `masked_centre`d first if `centred`), target q_i = softmax_j(-|t_i - t_j| / sigma)
    with t the `relative_time` of each valid token; loss = mean over valid source tokens of the cross-entropy
    -sum_j q_ij log p_ij. Returns (...) per sequence, 0 where either side has no valid token.

    Why: the relaxed-OT argmin has no gradient, so nothing else teaches the cost which anchor token a source
    token belongs to. Time order is a weak label (unaligned streams are roughly proportional in time, but word
    durations and pauses vary), yet the only way the keys' cosine can predict it is through content shared by
    the two modalities, so the learned cost matches by content, which is what the argmin needs.
    """
    _check_pair(source_key, anchor_key, "source_key", "anchor_key")
    sm = _mask_or_ones(source_key, source_mask, "source_mask")
    am = _mask_or_ones(anchor_key, anchor_mask, "anchor_mask")
    if not tau > 0 or not sigma > 0:
        raise ValueError(f"tau and sigma must be > 0, found tau={tau}, sigma={sigma}")
    if centred:
        source_key, anchor_key = masked_centre(source_key, sm), masked_centre(anchor_key, am)
    valid = am[..., None, :]
    logits = jnp.where(valid, (1.0 - cosine_cost(source_key, anchor_key).astype(jnp.float32)) / tau, -1e9)
    gap = jnp.abs(relative_time(sm)[..., :, None] - relative_time(am)[..., None, :])
    target = jax.nn.softmax(jnp.where(valid, -gap / sigma, -1e9), axis=-1)
    cross_entropy = -jnp.sum(jnp.where(valid, target * jax.nn.log_softmax(logits, axis=-1), 0.0), axis=-1)
    rows = (sm & jnp.any(am, axis=-1, keepdims=True)).astype(jnp.float32)
    return jnp.sum(cross_entropy * rows, axis=-1) / jnp.maximum(jnp.sum(rows, axis=-1), 1.0)


def segment_mean_resample(source, target_length: int, source_mask=None, target_mask=None):
    """Naive time alignment: resample each sequence's valid tokens to the target's valid length by segment means.

    Segment j of n_t output tokens averages source tokens [floor(j n_s / n_t), ceil((j + 1) n_s / n_t)) of the
    n_s valid ones (adaptive average pooling; upsamples by repetition when n_s < n_t). Assumes right padding.
    Returns (resampled (..., target_length, d), plan (..., T_s, target_length)) with resampled = plan^T source.
    """
    sm = _mask_or_ones(source, source_mask, "source_mask")
    tm = (jnp.ones(source.shape[:-2] + (target_length,), bool) if target_mask is None
          else target_mask.astype(bool))
    if tm.shape != source.shape[:-2] + (target_length,):
        raise ValueError(f"target_mask must have shape {source.shape[:-2] + (target_length,)}, found {tm.shape}")
    n_s = jnp.sum(sm, axis=-1)[..., None, None]
    n_t = jnp.maximum(jnp.sum(tm, axis=-1), 1)[..., None, None]
    i = jnp.arange(source.shape[-2])[:, None]
    j = jnp.arange(target_length)[None, :]
    start = (j * n_s) // n_t
    end = -((-(j + 1) * n_s) // n_t)
    member = (i >= start) & (i < end) & tm[..., None, :] & sm[..., :, None]
    count = jnp.sum(member, axis=-2, keepdims=True)
    plan = jnp.where(member, 1.0 / jnp.maximum(count, 1), 0.0).astype(jnp.float32)
    resampled = jnp.einsum("...ij,...id->...jd", plan, source.astype(jnp.float32)).astype(source.dtype)
    return resampled, plan


def mmd(x, y, sigma: Union[float, Sequence[float]] = 1.0, x_mask=None, y_mask=None):
    """Biased MMD^2 between the token sets of x (..., T_x, d) and y (..., T_y, d), Gaussian kernel.

    k(a, b) = exp(-|a - b|^2 / (2 sigma^2)); MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y) over valid tokens
    (V-statistic, so it is >= 0 and exactly 0 for identical sets). A sequence of sigmas averages the kernels
    (multi-bandwidth). Returns (...) per batch element; 0 where either side has no valid token.
    """
    _check_pair(x, y, "x", "y")
    xm = _mask_or_ones(x, x_mask, "x_mask").astype(jnp.float32)
    ym = _mask_or_ones(y, y_mask, "y_mask").astype(jnp.float32)
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    sigmas = jnp.atleast_1d(jnp.asarray(sigma, jnp.float32))
    wx = xm / jnp.maximum(jnp.sum(xm, -1, keepdims=True), 1.0)
    wy = ym / jnp.maximum(jnp.sum(ym, -1, keepdims=True), 1.0)

    def mean_kernel(a, b, wa, wb):
        sq = (jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
              - 2.0 * jnp.einsum("...id,...jd->...ij", a, b))
        sq = jnp.maximum(sq, 0.0)
        k = jnp.mean(jnp.exp(-sq[..., None] / (2.0 * sigmas ** 2)), axis=-1)
        return jnp.einsum("...i,...ij,...j->...", wa, k, wb)

    value = mean_kernel(x32, x32, wx, wx) + mean_kernel(y32, y32, wy, wy) - 2.0 * mean_kernel(x32, y32, wx, wy)
    both = (jnp.sum(xm, -1) > 0) & (jnp.sum(ym, -1) > 0)
    return jnp.where(both, jnp.maximum(value, 0.0), 0.0)


def sinkhorn(cost, x_mask=None, y_mask=None, *, epsilon: float = 0.1, num_iters: int = 100):
    """Entropic OT between uniform measures on the valid rows and columns of `cost` (..., T_x, T_y).

    Log-domain Sinkhorn (stable for small epsilon): potentials f, g alternate
    f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps), g_j likewise; plan P_ij = exp((f_i + g_j - C_ij) / eps).
    Returns (plan (..., T_x, T_y), distance <P, C> (...)). Differentiable by unrolling the fixed number of
    iterations; masked rows/columns get zero mass; a fully masked side gives a zero plan and distance.
    """
    if cost.ndim < 2:
        raise ValueError(f"cost must be (..., T_x, T_y), found {cost.shape}")
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    cost = cost.astype(dtype)
    xm = (jnp.ones(cost.shape[:-1], bool) if x_mask is None else x_mask.astype(bool))
    ym = (jnp.ones(cost.shape[:-2] + cost.shape[-1:], bool) if y_mask is None else y_mask.astype(bool))
    if xm.shape != cost.shape[:-1]:
        raise ValueError(f"x_mask must have shape {cost.shape[:-1]}, found {xm.shape}")
    if ym.shape != cost.shape[:-2] + cost.shape[-1:]:
        raise ValueError(f"y_mask must have shape {cost.shape[:-2] + cost.shape[-1:]}, found {ym.shape}")
    # A side with no valid token makes the whole problem empty: no mass anywhere.
    xm, ym = xm & jnp.any(ym, -1, keepdims=True), ym & jnp.any(xm, -1, keepdims=True)
    log_a = -jnp.log(jnp.maximum(jnp.sum(xm, -1, keepdims=True), 1).astype(dtype))
    log_b = -jnp.log(jnp.maximum(jnp.sum(ym, -1, keepdims=True), 1).astype(dtype))
    valid = xm[..., :, None] & ym[..., None, :]
    # Masked entries are pushed to a large finite negative score, never -inf, so every gradient stays finite.
    neg = jnp.asarray(-1e9, dtype)
    scaled_cost = jnp.where(valid, cost / epsilon, 0.0)

    def scores(f, g):
        return jnp.where(valid, (f[..., :, None] + g[..., None, :]) / epsilon - scaled_cost, neg)

    def step(carry, _):
        f, g = carry
        f = jnp.where(xm, f + epsilon * (log_a - jax.nn.logsumexp(scores(f, g), axis=-1)), 0.0)
        g = jnp.where(ym, g + epsilon * (log_b - jax.nn.logsumexp(scores(f, g), axis=-2)), 0.0)
        return (f, g), None

    f0 = jnp.zeros(xm.shape, dtype)
    g0 = jnp.zeros(ym.shape, dtype)
    (f, g), _ = jax.lax.scan(step, (f0, g0), None, length=num_iters)
    plan = jnp.where(valid, jnp.exp(scores(f, g)), 0.0)
    distance = jnp.sum(plan * jnp.where(valid, cost, 0.0), axis=(-2, -1))
    return plan, distance
