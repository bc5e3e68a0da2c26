"""Cross-modal alignment as pure functions: the paper's relaxed OT (`ot_align`), Gaussian-kernel MMD (`mmd`),
log-domain entropic OT (`sinkhorn`), mask-aware segment-mean resampling (`segment_mean_resample`), per-sequence
mean-centring (`masked_centre`) and the temporal contrastive matching loss that teaches an OT cost which token
matches which (`time_contrastive_loss`).

Conventions: tokens are (..., T, d) with any leading batch dims; masks are bool (..., T), True = valid, and
None means all valid. Masked tokens carry no mass and receive none, and their values are replaced by 0 before
any arithmetic, so whatever sits under a mask (inf, NaN) reaches neither values nor gradients. Every function
is jit/vmap/grad-safe and returns finite values (no NaN) for identical tokens, all-zero tokens and fully
masked inputs. Float parameters (epsilon, sigma, tau, time_prior, straight_through_tau) may be traced, their
range checks then skipped; what sets shapes or code paths must be static (num_iters, target_length,
return_plan, return_error, centred, barycentric, and whether straight_through_tau is None). Integer features
are promoted to float32. Forward-mode autodiff works through everything here except `mmd`, whose custom VJP
(its gradient formed in the forward pass, `_kernel_sums`) has no forward rule.

Memory: no function holds a (T_source x T_anchor) array unless the caller asks for a plan (`return_plan`) or
passes one (`sinkhorn`'s cost). Pairwise work runs over tiles of source rows against all anchor tokens
(`_map_row_tiles`, at most _TILE_ELEMENTS elements per tile), and the tiles of a differentiated loss are recomputed
in the backward pass (`jax.checkpoint`), so memory is O(tile + (T_source + T_anchor) d), values and gradients
the same as the dense formulas'.
"""
import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-12
# Elements of one tile of pairwise work (4 MiB in float32): small enough to be no memory concern at any
# length, large enough that short sequences run as a single tile, i.e. the dense computation.
_TILE_ELEMENTS = 2 ** 20
# mmd divides tokens by a power of two that brings them below this magnitude, so that a squared distance summed
# over up to 2^14 features stays finite in float32 ...
_SAFE_MAGNITUDE = 2.0 ** 56
# ... and caps scale / sigma here, so that the exponent factor (scale / sigma)^2 / 2 stays finite (a smaller
# sigma acts as scale * 1e-15, which changes only kernels between tokens closer than that).
_MAX_INVERSE_SIGMA = 1e15
# mmd's largest power of a kernel raised to reach a narrower bandwidth's (`_ladder`): its relative error,
# ~power float32 eps, stays below _GRAM_EXPONENT_ERROR's.
_MAX_LADDER_POWER = 4096
# mmd's largest tolerated error in a kernel exponent (|a - b|^2 / 2 sigma^2) from the fast matmul form of
# squared distances; beyond it (tokens spread over more than ~100 sigma) distances are summed from differences.
_GRAM_EXPONENT_ERROR = 2.0 ** -10
# sinkhorn's epsilon scaling: iterations start at max(epsilon, _SINKHORN_START * max|C|) and shrink it by
# _SINKHORN_DECAY per iteration down to epsilon; an epsilon below _SINKHORN_RESOLUTION dtype-eps max|C| is refused.
_SINKHORN_START = 1.0 / 20.0
_SINKHORN_DECAY = 0.9
_SINKHORN_RESOLUTION = 64.0


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


def _check_tokens(x, y, xname, yname):
    """Both sides need a token axis to take an argmin / a softmax over (a fully masked one is fine)."""
    for t, name in ((x, xname), (y, yname)):
        if t.shape[-2] == 0:
            raise ValueError(f"{name} has no tokens: expected T >= 1 on axis -2, found shape {t.shape} "
                             f"(mask tokens out instead of removing them)")


def _check_positive(name, value, zero_allowed=False):
    """value (scalar or sequence) must be finite and > 0 (>= 0 if zero_allowed); a traced value (jit, grad,
    vmap) cannot be checked before tracing and is let through."""
    try:
        v = np.asarray(value, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return
    if v.size == 0 or not np.all(np.isfinite(v)) or not np.all(v >= 0 if zero_allowed else v > 0):
        raise ValueError(f"{name} must be finite and {'>=' if zero_allowed else '>'} 0, found {value}")


def _floating(x):
    """x as an array of its own floating dtype, or float32 for integer / bool x (whose means would truncate)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def _zero_masked(x, mask):
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


def _flat(x, batch_ndim):
    """Leading batch dims merged into one: (..., rest) -> (n, rest)."""
    return x.reshape((math.prod(x.shape[:batch_ndim]),) + x.shape[batch_ndim:])


def _rows_per_tile(n_rows, pair_elements):
    """Rows per tile such that a tile's pairwise work, `pair_elements` per row, fits _TILE_ELEMENTS, balanced
    over the tiles so that padding the last one wastes less than one row per tile."""
    tiles = -(-n_rows // max(1, _TILE_ELEMENTS // max(pair_elements, 1)))
    return max(1, -(-n_rows // max(tiles, 1)))


def _row_tiles(x, rows):
    """(n, T, ...) -> (ceil(T / rows), n, rows, ...), zero-padded along T: the row tiles of x."""
    n, t = x.shape[:2]
    tiles = -(-t // rows)
    x = jnp.pad(x, [(0, 0), (0, tiles * rows - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((n, tiles, rows) + x.shape[2:]), 1, 0)


def _untile(y, t):
    """Inverse of _row_tiles for per-row results: (tiles, n, rows, ...) -> (n, T, ...)."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((y.shape[0], -1) + y.shape[3:])[:, :t]


def _map_row_tiles(fn, xs, pair_elements, remat=False):
    """fn(*tiles) -> per-row results (n, R, ...) for row tiles (n, R, ...) of the arrays xs (n, T, ...), mapped
    over tiles (a scan) whose pairwise work, `pair_elements` per row, fits _TILE_ELEMENTS; (n, T, ...) results.
    remat: each tile is recomputed in the backward pass rather than kept (pointless for a single tile)."""
    t = xs[0].shape[1]
    rows = _rows_per_tile(t, pair_elements)
    if rows == t:
        return fn(*xs)
    body = jax.checkpoint(fn) if remat else fn
    return _untile(jax.lax.map(lambda tiles: body(*tiles), tuple(_row_tiles(x, rows) for x in xs)), t)


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
    x = _floating(x)
    m = _mask_or_ones(x, mask, "mask")
    w = m.astype(jnp.float32)[..., None]
    x32 = _zero_masked(x, m).astype(jnp.float32)
    mean = jnp.sum(x32, axis=-2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
    return jnp.where(m[..., None], x32 - mean, 0.0).astype(x.dtype)


def relative_time(mask):
    """(..., T) validity mask -> (..., T) float32 time (k + 0.5) / n of the k-th of n valid tokens (0 if masked)."""
    m = mask.astype(bool)
    n = jnp.sum(m, axis=-1, keepdims=True, dtype=jnp.float32)
    k = jnp.cumsum(m, axis=-1, dtype=jnp.float32) - 0.5
    return jnp.where(m, k / jnp.maximum(n, 1.0), 0.0)


def _ot_cost_rows(time_prior, anchor_unit, anchor_time):
    """cost_rows(u (n, R, k), t (n, R)) -> (n, R, T_a): the OT cost of source tokens against every anchor token,
    1 - cos + time_prior |t_i - t_j|, from unit-norm keys and relative times."""
    def cost_rows(u, t):
        cost = 1.0 - jnp.einsum("nrk,njk->nrj", u, anchor_unit)
        if isinstance(time_prior, jax.Array) or time_prior:    # a traced time_prior is always added
            cost = cost + time_prior * jnp.abs(t[..., None] - anchor_time[:, None, :])
        return cost
    return cost_rows


def _segment_sum_per_example(values, segments, num_segments):
    """values (n, T, ...) summed by segments (n, T) into (n, num_segments, ...), example by example: the scatter
    keeps the batch as its own dimension, so a batch-sharded program sums on each device's rows (segment ids
    over the flattened batch x anchor would make XLA gather the global batch onto every device)."""
    return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_segments))(values, segments)


def ot_align(source, anchor, source_mask=None, anchor_mask=None, *, centred: bool = False,
             straight_through_tau: Optional[float] = None, barycentric: bool = False,
             source_key=None, anchor_key=None, time_prior: float = 0.0, return_plan: bool = True):
    """AlignMamba's local alignment: relaxed OT with the anchor's incoming-mass constraint dropped.

    source (..., T_s, d), anchor (..., T_a, d). Cost C(i, j) = 1 - cos(source_i, anchor_j) (eq. 3); each valid
    source token sends all its mass 1/T_s to its cheapest valid anchor token, M(i, j) = 1/T_s iff
    j = argmin_j' C(i, j') (eq. 5; T_s = number of valid source tokens; ties go to the first such j);
    aligned = M^T source (eq. 6). Returns (aligned (..., T_a, d), plan M (..., T_s, T_a)), or (aligned, None)
    with return_plan=False: the argmin is taken over tiles of source tokens and aligned is a segment sum, so
    that no (T_s x T_a) array is held. The defaults are the paper exactly: the plan is piecewise constant in the
    inputs, so gradients reach `source` through M^T source only, never `anchor`.

    Options (ours; the forward plan stays the hard argmin plan above in every case):
    centred: the cost is taken between `masked_centre`d source and anchor (each sequence minus the mean of its
      valid tokens); aligned still averages the uncentred source.
    straight_through_tau: a straight-through plan M + S - stop_gradient(S) with the soft plan
      S(i, j) = (1/T_s) softmax_j(-C(i, j) / tau) over valid anchor tokens: the forward values (plan and
      aligned) are exactly the hard ones, the gradient is that of S^T source with respect to the cost (so it
      reaches both `source` and `anchor`) plus the hard plan's M^T d(source). S is dense (T_s x T_a).
    barycentric: aligned_j = sum_i M(i, j) source_i / sum_i M(i, j), the mean of the tokens assigned to anchor
      token j (0 where none is), instead of the 1/T_s-scaled sum.
    time_prior: adds time_prior * |t_i - t_j| to the cost, t the `relative_time` of each valid token, so that
      the argmin starts from the time order (what segment-mean resampling assumes) and content refines it.
    source_key (..., T_s, k), anchor_key (..., T_a, k): if given, the cost is taken between these (e.g. learned
      matching features, like attention's queries and keys) instead of between source and anchor; aligned
      still averages `source`.
    """
    _check_pair(source, anchor, "source", "anchor")
    _check_tokens(source, anchor, "source", "anchor")
    source = _floating(source)
    sm = _mask_or_ones(source, source_mask, "source_mask")
    am = _mask_or_ones(anchor, anchor_mask, "anchor_mask")
    if straight_through_tau is not None:
        _check_positive("straight_through_tau", straight_through_tau)
    _check_positive("time_prior", time_prior, zero_allowed=True)
    source_key = source if source_key is None else source_key
    anchor_key = anchor if anchor_key is None else anchor_key
    _check_pair(source_key, anchor_key, "source_key", "anchor_key")
    if source_key.shape[:-1] != source.shape[:-1] or anchor_key.shape[:-1] != anchor.shape[:-1]:
        raise ValueError(f"source_key {source_key.shape} / anchor_key {anchor_key.shape} must have the token axes "
                         f"of source {source.shape} / anchor {anchor.shape}")
    batch, (t_s, d), t_a = source.shape[:-2], source.shape[-2:], anchor.shape[-2]
    nb = len(batch)
    source_key, anchor_key = _zero_masked(source_key, sm), _zero_masked(anchor_key, am)
    if centred:
        source_key, anchor_key = masked_centre(source_key, sm), masked_centre(anchor_key, am)
    su = _flat(_unit(source_key.astype(jnp.float32)), nb)
    au = _flat(_unit(anchor_key.astype(jnp.float32)), nb)
    st, at, am_flat = _flat(relative_time(sm), nb), _flat(relative_time(am), nb), _flat(am, nb)

    # The hard plan has no gradient: its argmin is taken on constants, one tile of source tokens at a time.
    hard_cost_rows = _ot_cost_rows(time_prior, jax.lax.stop_gradient(au), at)

    def nearest_rows(u, t):
        return jnp.argmin(jnp.where(am_flat[:, None, :], hard_cost_rows(u, t), jnp.inf), axis=-1)

    nearest = _map_row_tiles(nearest_rows, (jax.lax.stop_gradient(su), st), su.shape[0] * t_a)
    sm_flat = _flat(sm, nb)
    n_src = jnp.sum(sm_flat, axis=-1, dtype=jnp.float32)[:, None]
    keep = sm_flat & jnp.any(am_flat, axis=-1, keepdims=True)
    mass = jnp.where(keep, 1.0 / jnp.maximum(n_src, 1.0), 0.0)                            # (n, T_s)
    source32 = _flat(_zero_masked(source, sm).astype(jnp.float32), nb)
    aligned = _segment_sum_per_example(source32 * mass[..., None], nearest, t_a)
    plan = (jax.nn.one_hot(nearest, t_a, dtype=jnp.float32) * mass[..., None]) if return_plan else None
    if straight_through_tau is not None:
        cost = _ot_cost_rows(time_prior, au, at)(su, st)
        logits = jnp.where(am_flat[:, None, :], -cost / straight_through_tau, -1e9)
        soft = jax.nn.softmax(logits, axis=-1) * mass[..., None]
        # x - stop_gradient(x) is exactly 0 in the forward pass, so the values stay the hard ones bit for bit.
        if return_plan:
            plan = plan + (soft - jax.lax.stop_gradient(soft))
        soft_aligned = jnp.einsum("nij,nid->njd", soft, jax.lax.stop_gradient(source32))
        aligned = aligned + (soft_aligned - jax.lax.stop_gradient(soft_aligned))
    if barycentric:
        column_mass = _segment_sum_per_example(jax.lax.stop_gradient(mass), nearest, t_a)
        aligned = jnp.where(column_mass[..., None] > 0, aligned / jnp.maximum(column_mass, _EPS)[..., None], 0.0)
    aligned = aligned.reshape(batch + (t_a, d)).astype(source.dtype)
    return aligned, (None if plan is None else plan.reshape(batch + (t_s, t_a)))


def time_contrastive_loss(source_key, anchor_key, source_mask=None, anchor_mask=None, *, tau: float = 1.0,
                          sigma: float = 0.1, centred: bool = False):
    """Temporal contrastive matching (InfoNCE with time-based soft targets); ours, not in the papers.

    For each valid source token i: predicted p_i = softmax_j(cos(k_i, k_j) / tau) over the valid anchor tokens j
    (k = source_key / anchor_key, `masked_centre`d first if `centred`), target q_i = softmax_j(-|t_i - t_j| / sigma)
    with t the `relative_time` of each valid token; loss = mean over valid source tokens of the cross-entropy
    -sum_j q_ij log p_ij. Returns (...) per sequence, 0 where either side has no valid token. Computed over tiles
    of source tokens, recomputed in the backward pass: no (T_s x T_a) array is held.

    Why: the relaxed-OT argmin has no gradient, so nothing else teaches the cost which anchor token a source
    token belongs to. Time order is a weak label (unaligned streams are roughly proportional in time, but word
    durations and pauses vary), yet the only way the keys' cosine can predict it is through content shared by
    the two modalities, so the learned cost matches by content, which is what the argmin needs.
    """
    _check_pair(source_key, anchor_key, "source_key", "anchor_key")
    _check_tokens(source_key, anchor_key, "source_key", "anchor_key")
    sm = _mask_or_ones(source_key, source_mask, "source_mask")
    am = _mask_or_ones(anchor_key, anchor_mask, "anchor_mask")
    _check_positive("tau", tau)
    _check_positive("sigma", sigma)
    nb = source_key.ndim - 2
    source_key, anchor_key = _zero_masked(source_key, sm), _zero_masked(anchor_key, am)
    if centred:
        source_key, anchor_key = masked_centre(source_key, sm), masked_centre(anchor_key, am)
    su = _flat(_unit(source_key.astype(jnp.float32)), nb)
    au = _flat(_unit(anchor_key.astype(jnp.float32)), nb)
    at, am_flat = _flat(relative_time(am), nb), _flat(am, nb)

    valid = am_flat[:, None, :]

    def cross_entropy_rows(u, t):                                       # a tile of source tokens: (n, R, k), (n, R)
        logits = jnp.where(valid, jnp.einsum("nrk,njk->nrj", u, au) / tau, -1e9)
        target = jax.nn.softmax(jnp.where(valid, -jnp.abs(t[..., None] - at[:, None, :]) / sigma, -1e9), axis=-1)
        return -jnp.sum(jnp.where(valid, target * jax.nn.log_softmax(logits, axis=-1), 0.0), axis=-1)

    cross_entropy = _map_row_tiles(cross_entropy_rows, (su, _flat(relative_time(sm), nb)), su.shape[0] * au.shape[1],
                                   remat=True)
    rows = (_flat(sm, nb) & jnp.any(am_flat, axis=-1, keepdims=True)).astype(jnp.float32)
    loss = jnp.sum(cross_entropy * rows, axis=-1) / jnp.maximum(jnp.sum(rows, axis=-1), 1.0)
    return loss.reshape(source_key.shape[:-2])


def segment_mean_resample(source, target_length: int, source_mask=None, target_mask=None, *,
                          return_plan: bool = True):
    """Naive time alignment: resample each sequence's valid tokens to the target's valid length by segment means.

    Segment j of n_t output tokens averages source tokens [floor(j n_s / n_t), ceil((j + 1) n_s / n_t)) of the
    n_s valid ones (adaptive average pooling; upsamples by repetition when n_s < n_t). Assumes right padding.
    Returns (resampled (..., target_length, d), plan (..., T_s, target_length)) with resampled = plan^T source,
    or (resampled, None) with return_plan=False. The segment sums are differences of prefix sums (of the
    tokens minus their mean, so that float32 keeps its precision at any length): no (T_s x target_length) array
    is held unless the plan is asked for.
    """
    source = _floating(source)
    sm = _mask_or_ones(source, source_mask, "source_mask")
    tm = (jnp.ones(source.shape[:-2] + (target_length,), bool) if target_mask is None
          else target_mask.astype(bool))
    if tm.shape != source.shape[:-2] + (target_length,):
        raise ValueError(f"target_mask must have shape {source.shape[:-2] + (target_length,)}, found {tm.shape}")
    t_s = source.shape[-2]
    n_s = jnp.sum(sm, axis=-1)[..., None]
    n_t = jnp.maximum(jnp.sum(tm, axis=-1), 1)[..., None]
    j = jnp.arange(target_length)
    start = jnp.minimum((j * n_s) // n_t, t_s)                                          # (..., target_length)
    end = jnp.minimum(-((-(j + 1) * n_s) // n_t), t_s)
    x = _zero_masked(source, sm).astype(jnp.float32)
    w = sm.astype(jnp.float32)[..., None]
    mean = jnp.sum(x, axis=-2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
    pad = [(0, 0)] * (source.ndim - 2) + [(1, 0), (0, 0)]
    # associative_scan: a tree of sums, several times faster than jnp.cumsum on a CPU, and error O(log T).
    prefix = jnp.pad(jax.lax.associative_scan(jnp.add, (x - mean) * w, axis=-2), pad)   # (..., T_s + 1, d)
    count_prefix = jnp.pad(jax.lax.associative_scan(jnp.add, sm.astype(jnp.int32), axis=-1), pad[:-1])
    total = (jnp.take_along_axis(prefix, end[..., None], axis=-2)
             - jnp.take_along_axis(prefix, start[..., None], axis=-2))
    count = jnp.take_along_axis(count_prefix, end, axis=-1) - jnp.take_along_axis(count_prefix, start, axis=-1)
    keep = (tm & (count > 0))[..., None]
    resampled = jnp.where(keep, mean + total / jnp.maximum(count, 1)[..., None], 0.0).astype(source.dtype)
    if not return_plan:
        return resampled, None
    i = jnp.arange(t_s)[:, None]
    member = (i >= start[..., None, :]) & (i < end[..., None, :]) & tm[..., None, :] & sm[..., :, None]
    plan = jnp.where(member, 1.0 / jnp.maximum(jnp.sum(member, axis=-2, keepdims=True), 1), 0.0)
    return resampled, plan.astype(jnp.float32)


def _exact_scale(*xs):
    """1, or the power of two (dividing by it is exact) that brings the largest |value| of xs down to
    _SAFE_MAGNITUDE, so that squared distances summed over features cannot overflow float32."""
    top = jax.lax.stop_gradient(jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in xs])))
    exponent = jnp.maximum(jnp.ceil(jnp.log2(top / _SAFE_MAGNITUDE)), 0.0)
    return jnp.ldexp(jnp.float32(1.0), exponent.astype(jnp.int32))


def _ladder(sigma):
    """Integer powers that turn one exponential into the kernels of every bandwidth, or None.

    exp(-sq f p) = exp(-sq f)^p: when the p_i = (sigma_max / sigma_i)^2 are integers that each divide the next
    larger one (the ladder 1, 2, 4, 8, 16 gives 256, 64, 16, 4, 1), the widest kernel's exponential raised to
    the powers in turn (repeated squaring: a few multiplies) gives every kernel, at a relative error of about
    p_i float32 eps, at most _MAX_LADDER_POWER eps (below _GRAM_EXPONENT_ERROR). Returns the p_i in sigma's
    order, or None for a traced sigma, a single one, or ratios without that structure."""
    try:
        s = np.atleast_1d(np.asarray(sigma, np.float64))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None
    if s.size < 2:
        return None
    p = (s.max() / s) ** 2
    powers = np.round(p)
    chained = np.sort(powers)
    if (np.any(np.abs(p - powers) > 1e-6 * powers) or chained[-1] > _MAX_LADDER_POWER
            or np.any(chained[1:] % chained[:-1])):
        return None
    return tuple(int(v) for v in powers)


def _kernels(sq, factors, ladder):
    """[exp(-sq f_s) for each s] for squared distances sq (...): an exponential per bandwidth, or with a ladder
    (`_ladder`; factors = f_min * p) one exponential and integer powers of it, each from the previous one."""
    if ladder is None:
        return [jnp.exp(-sq * factors[s]) for s in range(factors.size)]
    order = sorted(range(len(ladder)), key=lambda i: ladder[i])
    # max(., 0), a no-op on an exponential, keeps XLA's simplifier from turning the powers exp(z)^p back into
    # exponentials exp(p z) (tests/test_align.py counts the exponentials in the compiled program).
    kernels, power, e = {}, 1, jnp.maximum(jnp.exp(-sq * factors[order[0]]), 0.0)
    for i in order:
        if ladder[i] != power:
            e, power = jax.lax.integer_pow(e, ladder[i] // power), ladder[i]
        kernels[i] = e
    return [kernels[i] for i in range(len(ladder))]


def _gaussian_tile(a_tile, b, factors, exact, ladder):
    """Squared distances (n, R, T_b) of a row tile (n, R, d) to b (n, T_b, d), the kernels [exp(-sq f_s)] (S of
    (n, R, T_b)) and the differences (n, R, T_b, d) or None. exact: summed from differences; else
    |a|^2 + |b|^2 - 2ab, a matmul (several times faster on a CPU) whose cancellation error is about
    4 eps max(|a|^2, |b|^2) (see `mmd`)."""
    diff = None
    if exact:
        diff = a_tile[:, :, None, :] - b[:, None, :, :]
        sq = jnp.sum(diff * diff, axis=-1)
    else:
        gram = jnp.einsum("nid,njd->nij", a_tile, b, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.maximum(jnp.sum(a_tile * a_tile, -1)[..., None] + jnp.sum(b * b, -1)[:, None, :] - 2.0 * gram, 0.0)
    return sq, _kernels(sq, factors, ladder), diff


def _gaussian_rows(a, b, exact):
    per_pair = b.shape[2] if exact else 1          # the differences are (..., d); the kernels (...) each
    rows = _rows_per_tile(a.shape[1], a.shape[0] * b.shape[1] * per_pair)
    return rows, _row_tiles(a, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kernel_sums(a, b, wa, wb, factors, exact, ladder, symmetric):
    """s[n] = sum_ij wa[n, i] wb[n, j] mean_s exp(-|a[n, i] - b[n, j]|^2 f_s) for a (n, T_a, d), b (n, T_b, d),
    wa (n, T_a), wb (n, T_b), f = factors (S,), over row tiles of a, so that no pass holds more than a tile.

    s[n] depends on example n's inputs only, so the forward pass of a gradient also forms ds[n]/d(a, b, f) from
    the kernels it has (d sq_ij / d a_i = 2 (a_i - b_j), from the differences if exact, else with matmuls), for
    the inputs being differentiated only, and the backward pass scales them by the cotangent: one pass of
    exponentials in all, and residuals of the inputs' size. The weights (`mmd`'s normalised masks) get no
    gradient. exact: see `_gaussian_tile`; ladder: `_ladder`; symmetric: a is b and wa is wb (a self term),
    whose gradient is twice the row side's."""
    rows, a_tiles = _gaussian_rows(a, b, exact)

    def add_tile(total, tile):
        a_tile, wa_tile = tile
        k = sum(_gaussian_tile(a_tile, b, factors, exact, ladder)[1]) / factors.size
        return total + jnp.einsum("ni,nij,nj->n", wa_tile, k, wb), None

    return jax.lax.scan(add_tile, jnp.zeros(a.shape[0], jnp.float32), (a_tiles, _row_tiles(wa, rows)))[0]


def _kernel_sums_fwd(a, b, wa, wb, factors, exact, ladder, symmetric):
    need_a, need_b, need_f = a.perturbed, b.perturbed, factors.perturbed
    a, b, wa, wb, factors = (p.value for p in (a, b, wa, wb, factors))
    if symmetric:       # the row side's gradient, doubled, stands for both sides'
        need_a, need_b = need_a or need_b, False
    rows, a_tiles = _gaussian_rows(a, b, exact)

    def tile_sums(carry, tile):
        total, g_b, g_f = carry
        a_tile, wa_tile = tile
        sq, e, diff = _gaussian_tile(a_tile, b, factors, exact, ladder)
        # the mean kernel and the mean f_s-weighted kernel as one array: one pass over the kernels makes both
        k, k_f = jnp.stack([sum(e), sum(f * e_s for f, e_s in zip(factors, e))]) / factors.size
        total = total + jnp.einsum("ni,nij,nj->n", wa_tile, k, wb)
        weight = wa_tile[:, :, None] * wb[:, None, :]                               # d s / d k_ij
        d_sq = -weight * k_f                                                        # d s / d sq_ij
        if exact:
            g_a = 2.0 * jnp.einsum("nij,nijd->nid", d_sq, diff) if need_a else None
            g_b = g_b - 2.0 * jnp.einsum("nij,nijd->njd", d_sq, diff) if need_b else None
        else:
            g_a = 2.0 * (jnp.sum(d_sq, -1)[..., None] * a_tile
                         - jnp.einsum("nij,njd->nid", d_sq, b)) if need_a else None
            g_b = g_b + 2.0 * (jnp.sum(d_sq, 1)[..., None] * b
                               - jnp.einsum("nij,nid->njd", d_sq, a_tile)) if need_b else None
        g_f = g_f - jnp.stack([jnp.einsum("nij,nij->n", weight * sq, e_s) for e_s in e], -1) / factors.size \
            if need_f else None
        return (total, g_b, g_f), g_a

    n = a.shape[0]
    init = (jnp.zeros(n, jnp.float32), jnp.zeros_like(b) if need_b else None,
            jnp.zeros((n, factors.size), jnp.float32) if need_f else None)
    (total, g_b, g_f), g_a = jax.lax.scan(tile_sums, init, (a_tiles, _row_tiles(wa, rows)))
    if g_a is not None:
        g_a = (2.0 if symmetric else 1.0) * _untile(g_a, a.shape[1])
    return total, (g_a, g_b, g_f)


def _kernel_sums_bwd(exact, ladder, symmetric, per_example, ct):
    del exact, ladder, symmetric
    g_a, g_b, g_f = (None if g is None else g * ct.reshape(ct.shape + (1,) * (g.ndim - 1)) for g in per_example)
    return g_a, g_b, None, None, None if g_f is None else jnp.sum(g_f, axis=0)


_kernel_sums.defvjp(_kernel_sums_fwd, _kernel_sums_bwd, symbolic_zeros=True)


def mmd(x, y, sigma: Union[float, Sequence[float]] = 1.0, x_mask=None, y_mask=None):
    """Biased MMD^2 between the token sets of x (..., T_x, d) and y (..., T_y, d), Gaussian kernel.

    k(a, b) = exp(-|a - b|^2 / (2 sigma^2)); MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y) over valid tokens
    (V-statistic, so it is >= 0 and exactly 0 for identical sets). A sequence of sigmas averages the kernels
    (multi-bandwidth). Returns (...) per batch element; 0 where either side has no valid token. Kernel sums are
    accumulated over tiles of rows, and under differentiation the same pass forms the gradients (`_kernel_sums`):
    memory O(tile + (T_x + T_y) d) for values and gradients alike. Bandwidths whose squared ratios are nested
    integers (1, 2, 4, ...) share one exponential (`_ladder`).
    """
    _check_pair(x, y, "x", "y")
    _check_positive("sigma", sigma)
    xm = _mask_or_ones(x, x_mask, "x_mask")
    ym = _mask_or_ones(y, y_mask, "y_mask")
    nb = x.ndim - 2
    batch = x.shape[:-2]
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        return jnp.zeros(batch, jnp.float32)
    x32 = _flat(_zero_masked(x, xm).astype(jnp.float32), nb)
    y32 = _flat(_zero_masked(y, ym).astype(jnp.float32), nb)
    xw, yw = _flat(xm, nb).astype(jnp.float32), _flat(ym, nb).astype(jnp.float32)
    wx = xw / jnp.maximum(jnp.sum(xw, -1, keepdims=True), 1.0)
    wy = yw / jnp.maximum(jnp.sum(yw, -1, keepdims=True), 1.0)
    # The kernel is translation invariant, and k(a, b; sigma) = k(a / s, b / s; sigma / s): centred on the valid
    # tokens' mean and divided by a power of two s (exactly), any float32 tokens give finite distances.
    centre = jax.lax.stop_gradient((jnp.sum(x32, -2, keepdims=True) + jnp.sum(y32, -2, keepdims=True))
                                   / jnp.maximum(jnp.sum(xw, -1) + jnp.sum(yw, -1), 1.0)[:, None, None])
    x32, y32 = _zero_masked(x32 - centre, _flat(xm, nb)), _zero_masked(y32 - centre, _flat(ym, nb))
    scale = _exact_scale(x32, y32)
    x32, y32 = x32 / scale, y32 / scale
    sigmas = jnp.atleast_1d(jnp.asarray(sigma, jnp.float32))
    ladder = _ladder(sigma)
    if ladder is None:
        factors = 0.5 * jnp.square(jnp.minimum(scale / sigmas, _MAX_INVERSE_SIGMA))
    else:       # f_s = f_min p_s exactly, the cap applied to the narrowest kernel
        powers = jnp.asarray(ladder, jnp.float32)
        widest = jnp.minimum(scale / jnp.max(sigmas), _MAX_INVERSE_SIGMA / max(ladder) ** 0.5)
        factors = 0.5 * jnp.square(widest) * powers
    # Distances from the matmul form carry an error of ~4 eps r^2 (r the largest centred token norm): use it
    # while that moves no kernel exponent by more than _GRAM_EXPONENT_ERROR, else sum differences.
    r2 = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.sum(x32 * x32, -1)), jnp.max(jnp.sum(y32 * y32, -1))))
    exact = 4.0 * 2.0 ** -24 * r2 * jnp.max(factors) > _GRAM_EXPONENT_ERROR

    def value_with(exact_form):
        def sums(a, b, wa, wb, symmetric):
            return _kernel_sums(a, b, wa, wb, factors, exact_form, ladder, symmetric)
        return sums(x32, x32, wx, wx, True) + sums(y32, y32, wy, wy, True) - 2.0 * sums(x32, y32, wx, wy, False)

    value = jax.lax.cond(exact, lambda: value_with(True), lambda: value_with(False))
    both = (jnp.sum(xw, -1) > 0) & (jnp.sum(yw, -1) > 0)
    return jnp.where(both, jnp.maximum(value, 0.0), 0.0).reshape(batch)


def _check_resolution(cost, epsilon, dtype):
    """Refuse an epsilon below what `dtype` resolves in the scores (f + g - C) / epsilon: their rounding error
    (about eps_dtype * max |C|) divided by epsilon would decide the plan. Checked where cost and epsilon are
    concrete; a traced call gets a plan that is still valid (non-negative, mass 1) but may not converge."""
    try:
        c = np.asarray(cost, np.float64)
        eps = float(epsilon)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return
    finite = c[np.isfinite(c)]
    floor = _SINKHORN_RESOLUTION * np.finfo(dtype).eps * (float(np.max(np.abs(finite))) if finite.size else 0.0)
    if eps < floor:
        raise ValueError(f"epsilon={epsilon} is below what {np.dtype(dtype).name} resolves for this cost (largest "
                         f"|cost| {np.max(np.abs(finite)):.3g}): the plan would be rounding noise; use epsilon >= "
                         f"{floor:.2g}, or a float64 cost")


def sinkhorn(cost, x_mask=None, y_mask=None, *, epsilon: float = 0.1, num_iters: int = 100,
             return_error: bool = False):
    """Entropic OT between uniform measures on the valid rows and columns of `cost` (..., T_x, T_y).

    Log-domain Sinkhorn: potentials f, g alternate f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps), g_j likewise;
    the plan P_ij = exp((f_i + g_j - C_ij) / eps) is formed as b_j softmax_i((f_i - C_ij) / eps), so its columns
    sum to b_j exactly in any precision, then rounded onto the transport polytope (Altschuler, Weed & Rigollet
    2017): rows above a_i are scaled down and the missing mass is added as the product of the row and column
    deficits. The returned plan is therefore always a coupling: non-negative, total mass 1, both marginals exact
    (to float rounding), and the distance <P, C> is the cost of that coupling. A converged plan is unchanged.
    Returns (plan (..., T_x, T_y), distance (...)), and with return_error=True also error (...) =
    ||P 1 - a||_1 before the rounding: the mass the rounding had to move, 0 at convergence.

    Convergence: Sinkhorn needs on the order of max|C| / eps iterations, so a small epsilon is reached by epsilon
    scaling: the iterations start at max(epsilon, max|C| / 20) and shrink it by 0.9 per iteration down to
    `epsilon`. Measured on cosine costs of random tokens (T up to 50, float32): error below 1e-2 down to
    epsilon ~1e-2 with the default 100 iterations and down to ~1e-3 with 1000; below that Sinkhorn stalls and
    the rounding carries the error (the distance then exceeds the optimum by up to 2 max|C| error). An epsilon
    so small that float rounding of the scores would decide the plan (below 64 dtype-eps max|C|: 7.6e-6 max|C|
    in float32, 2.8e-14 max|C| in float64) raises ValueError where cost and epsilon are concrete; traced, the
    plan is still a coupling.

    Forbidden pairs: a cost of +inf gives that pair no mass, and neither the distance nor the gradient sees it.
    The rounding adds no mass to them either, so with forbidden pairs the marginals are exact only to within
    `error` (and if some valid row or column has every pair forbidden, no coupling exists: its mass is dropped). Masked
    rows / columns get zero mass and their cost entries are never read; a fully masked side gives a zero plan and
    distance. `epsilon` may be traced (jit, grad, vmap); `num_iters` and `return_error` must be static.

    Differentiable by unrolling the iterations, each recomputed in the backward pass from its potentials
    (jax.checkpoint), so the gradient holds O(T_x T_y) memory whatever num_iters, not one (T_x x T_y) array per
    iteration.
    """
    if not (isinstance(num_iters, (int, np.integer)) and num_iters >= 0):
        raise ValueError(f"num_iters must be an int >= 0, found {num_iters!r}")
    problem = _SinkhornProblem.build(cost, x_mask, y_mask, epsilon)
    step = jax.checkpoint(lambda fg, k: (problem.step(fg, k)[0], None))
    (f, _), _ = jax.lax.scan(step, problem.start(), jnp.arange(num_iters, dtype=problem.cost.dtype))
    plan, error = problem.coupling(f)
    distance = jnp.sum(plan * problem.cost, axis=(-2, -1))
    return (plan, distance, error) if return_error else (plan, distance)


def sinkhorn_distance(cost, x_mask=None, y_mask=None, *, epsilon: float = 0.1, max_iters: int = 200,
                      tolerance: float = 1e-4, return_error: bool = False):
    """`sinkhorn`'s distance <P, C> (..., ), run to convergence, with the gradient of the converged value: for a
    loss that needs no plan.

    The same iterations, epsilon schedule, final plan and rounding as `sinkhorn`, so the value is the same where
    both have converged; but they run in a while loop that stops once the schedule has reached `epsilon` and the
    marginal error ||P 1 - a||_1 of every problem is at most `tolerance` (or after `max_iters`), and they are not
    differentiated. The gradient with respect to the cost is the implicit one at the fixed point (the converged
    plan P with potentials f, g, P_ij = exp((f_i + g_j - C_ij) / epsilon), marginals a, b): differentiating the
    marginal constraints gives

        d<P, C> / dC_ij = P_ij (1 + (u_i + v_j - C_ij) / epsilon),   [diag(a)  P      ] [u]   [(C o P) 1  ]
                                                                     [P^T      diag(b)] [v] = [(C o P)^T 1]

    solved for v through the Schur complement (diag(b) - P^T diag(1/a) P) v = (C o P)^T 1 - P^T ((C o P) 1 / a)
    by conjugate gradients per problem (`jax.scipy.sparse.linalg.cg`, relative residual `tolerance`, at most
    max(T_x, T_y) + 10 steps), then u = ((C o P) 1 - P v) / a. Each step is O(T_x T_y): the backward pass costs
    a few iterations' worth, holds the plan and no per-iteration state, and equals the unrolled gradient of
    `sinkhorn` once that has converged. Masked rows / columns and forbidden (+inf) pairs get zero gradient.

    `epsilon`, `max_iters`, `tolerance` and `return_error` must be static (Python numbers); there is no gradient
    with respect to epsilon. With return_error=True also returns `sinkhorn`'s error (...) (before rounding).
    """
    if not (isinstance(max_iters, (int, np.integer)) and max_iters >= 0):
        raise ValueError(f"max_iters must be an int >= 0, found {max_iters!r}")
    _check_positive("tolerance", tolerance)
    try:
        epsilon = float(epsilon)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError) as error:
        raise ValueError("sinkhorn_distance needs a concrete epsilon (a Python number); use sinkhorn for a traced "
                         "one") from error
    problem = _SinkhornProblem.build(cost, x_mask, y_mask, epsilon)
    distance, error = _converged_distance(problem.cost, problem.allowed, problem.xm, problem.ym, float(epsilon),
                                          int(max_iters), float(tolerance))
    return (distance, error) if return_error else distance


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _converged_distance(cost, allowed, xm, ym, epsilon, max_iters, tolerance):
    return _converged_distance_fwd(cost, allowed, xm, ym, epsilon, max_iters, tolerance)[0]


def _converged_distance_fwd(cost, allowed, xm, ym, epsilon, max_iters, tolerance):
    problem = _SinkhornProblem(cost, allowed, xm, ym, jnp.asarray(epsilon, cost.dtype))
    start = problem.start()
    # the first error is measured in the first step: start from one that does not stop the loop
    initial = (jnp.zeros((), cost.dtype), *start, jnp.full(cost.shape[:-2], jnp.inf, cost.dtype))

    def unfinished(state):
        k, _, _, error = state
        scheduled = problem.epsilon_at(k) > problem.epsilon
        return (k < max_iters) & (scheduled | jnp.any(error > tolerance))

    def step(state):
        k, f, g, _ = state
        (f, g), error = problem.step((f, g), k)
        return k + 1, f, g, error

    _, f, _, _ = jax.lax.while_loop(unfinished, step, initial)
    plan, error = problem.coupling(jax.lax.stop_gradient(f))
    distance = jnp.sum(plan * problem.cost, axis=(-2, -1))
    return (distance, error), (plan, problem.cost, problem.xm, problem.ym)


def _converged_distance_bwd(epsilon, max_iters, tolerance, residuals, cotangents):
    plan, cost, xm, ym = residuals
    ct = cotangents[0]
    a = jnp.sum(plan, -1)
    b = jnp.sum(plan, -2)
    weighted = cost * plan
    row_rhs, col_rhs = jnp.sum(weighted, -1), jnp.sum(weighted, -2)
    inv_a = jnp.where(xm, 1.0 / jnp.where(xm, a, 1.0), 0.0)
    batch = plan.shape[:-2]
    flat = lambda x: x.reshape((-1,) + x.shape[len(batch):])  # noqa: E731

    def solve(p, inv_a, b, row_rhs, col_rhs):
        def schur(v):
            return b * v - p.T @ (inv_a * (p @ v))
        rhs = col_rhs - p.T @ (inv_a * row_rhs)
        v, _ = jax.scipy.sparse.linalg.cg(schur, rhs, tol=tolerance, maxiter=max(p.shape) + 10)
        return v, inv_a * (row_rhs - p @ v)

    v, u = jax.vmap(solve)(flat(plan), flat(inv_a), flat(b), flat(row_rhs), flat(col_rhs))
    u, v = u.reshape(xm.shape), v.reshape(ym.shape)
    grad = plan * (1.0 + (u[..., :, None] + v[..., None, :] - cost) / epsilon)
    grad = jnp.where(plan > 0, grad, 0.0) * ct[..., None, None]
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return grad, zero(plan), zero(xm), zero(ym)


_converged_distance.defvjp(_converged_distance_fwd, _converged_distance_bwd)


class _SinkhornProblem:
    """One batch of entropic OT problems as `sinkhorn` solves them: the cleaned cost (0 outside `allowed`),
    uniform log-marginals on the valid rows / columns, the log-domain updates with epsilon scaling, and the
    final plan (columns exact, then rounded onto the transport polytope) with its marginal error."""

    def __init__(self, cost, allowed, xm, ym, epsilon):
        self.cost, self.allowed, self.xm, self.ym, self.epsilon = cost, allowed, xm, ym, epsilon
        dtype = cost.dtype
        self.log_a = -jnp.log(jnp.maximum(jnp.sum(xm, -1, keepdims=True), 1).astype(dtype))
        self.log_b = -jnp.log(jnp.maximum(jnp.sum(ym, -1, keepdims=True), 1).astype(dtype))
        # Excluded entries get a score far below any valid one (|valid scores| < max|C| / eps < 2^17 / dtype-eps),
        # never -inf, so that every gradient stays finite.
        self.excluded = jnp.asarray(jnp.finfo(dtype).min / 4, dtype)
        self.first_epsilon = jnp.maximum(
            epsilon, jax.lax.stop_gradient(jnp.max(jnp.abs(cost), initial=0.0)) * _SINKHORN_START)

    @classmethod
    def build(cls, cost, x_mask, y_mask, epsilon):
        """Validate `sinkhorn`'s arguments and set up its problem."""
        if cost.ndim < 2:
            raise ValueError(f"cost must be (..., T_x, T_y), found {cost.shape}")
        _check_positive("epsilon", epsilon)
        dtype = jnp.promote_types(cost.dtype, jnp.float32)
        xm = (jnp.ones(cost.shape[:-1], bool) if x_mask is None else x_mask.astype(bool))
        ym = (jnp.ones(cost.shape[:-2] + cost.shape[-1:], bool) if y_mask is None else y_mask.astype(bool))
        if xm.shape != cost.shape[:-1]:
            raise ValueError(f"x_mask must have shape {cost.shape[:-1]}, found {xm.shape}")
        if ym.shape != cost.shape[:-2] + cost.shape[-1:]:
            raise ValueError(f"y_mask must have shape {cost.shape[:-2] + cost.shape[-1:]}, found {ym.shape}")
        # A side with no valid token makes the whole problem empty: no mass anywhere.
        xm, ym = xm & jnp.any(ym, -1, keepdims=True), ym & jnp.any(xm, -1, keepdims=True)
        allowed = xm[..., :, None] & ym[..., None, :] & (cost != jnp.inf)
        cost = jnp.where(allowed, cost.astype(dtype), 0.0)
        _check_resolution(cost, epsilon, dtype)
        return cls(cost, allowed, xm, ym, jnp.asarray(epsilon, dtype))

    def start(self):
        return jnp.zeros(self.xm.shape, self.cost.dtype), jnp.zeros(self.ym.shape, self.cost.dtype)

    def epsilon_at(self, k):
        return jnp.maximum(self.epsilon, self.first_epsilon * _SINKHORN_DECAY ** k)

    def scores(self, f, g, eps):
        return jnp.where(self.allowed, (f[..., :, None] + g[..., None, :] - self.cost) / eps, self.excluded)

    def step(self, fg, k):
        """Iteration k: ((f, g) updated, the marginal error ||P 1 - a||_1 of the (f, g) it started from)."""
        f, g = fg
        eps = self.epsilon_at(k)
        row_lse = jax.nn.logsumexp(self.scores(f, g, eps), axis=-1)
        error = jnp.sum(jnp.where(self.xm, jnp.abs(jnp.exp(row_lse) - jnp.exp(self.log_a)), 0.0), -1)
        f = jnp.where(self.xm, f + eps * (self.log_a - row_lse), 0.0)
        g = jnp.where(self.ym, g + eps * (self.log_b - jax.nn.logsumexp(self.scores(f, g, eps), axis=-2)), 0.0)
        return (f, g), error

    def coupling(self, f):
        """(plan, error): the plan of potentials f at epsilon, columns exact, rounded onto the polytope; error is
        ||P 1 - a||_1 before the rounding."""
        column_share = jax.nn.softmax(self.scores(f, jnp.zeros(self.ym.shape, f.dtype), self.epsilon), axis=-2)
        plan = jnp.where(self.allowed, column_share * jnp.exp(self.log_b)[..., None, :], 0.0)
        a = jnp.where(self.xm, jnp.exp(self.log_a), 0.0)
        b = jnp.where(self.ym, jnp.exp(self.log_b), 0.0)
        error = jnp.sum(jnp.abs(jnp.sum(plan, -1) - a), -1)
        return _round_to_marginals(plan, a, b, self.allowed), error


def _round_to_marginals(plan, a, b, allowed):
    """Altschuler, Weed & Rigollet (2017), Algorithm 2 (rounding onto the transport polytope), for a plan whose
    column sums are at most b: rows above a_i are scaled down to it, then the missing mass is added as the
    product of the row and column deficits (over allowed pairs), so that both marginals are exact. It moves
    as much mass as the rows were off, so a converged plan is unchanged."""
    rows = jnp.sum(plan, -1)
    plan = plan * jnp.where(rows > a, a / jnp.maximum(rows, _EPS), 1.0)[..., None]
    row_deficit = jnp.maximum(a - jnp.sum(plan, -1), 0.0)
    column_deficit = jnp.maximum(b - jnp.sum(plan, -2), 0.0)
    column_share = column_deficit / jnp.maximum(jnp.sum(column_deficit, -1, keepdims=True), _EPS)
    return plan + jnp.where(allowed, row_deficit[..., :, None] * column_share[..., None, :], 0.0)
