"""Assembled networks: AlignMamba (with every Table-3 ablation) and its `LocalAlignment`, AlignMamba-2, and the
Transformer baselines of the efficiency benchmark, behind `create_model(cfg, ...)` and `default_model_config()`.

All models share one calling convention:
    out = model.apply({"params": p}, features, masks, train=False[, rngs={"dropout": k}])
features {m: (B, T_m, d_m)}, masks {m: bool (B, T_m)} (None or a missing key = all valid; right padding).
out = {"prediction": (B,) or (B, num_classes), "align_loss": unweighted scalar, "aux": {name: scalar}}
plus "ot_plans" {m: (B, T_m, T_anchor)} when cfg.return_plans.

Modality handling: `modalities` fixes the order of the time-major interleave (sources in the given order, the
anchor last in each time step, i.e. [a_1, v_1, l_1, a_2, ...] for ("text", "audio", "vision") anchored on text).
`drop_modalities` removes modalities before anything else; if the anchor is dropped ("w/o language") the first
remaining modality in `modalities` becomes the anchor. Masked (padded) feature values are replaced by 0 at the
input, so whatever they hold (inf, NaN) reaches no valid position, loss or gradient. A modality whose tokens
are all masked (missing) is carried as masked tokens: identity steps of every scan, excluded from pooling and
from the alignment losses.
Missing anchor: the sources of a sample whose anchor modality is missing entirely are segment-mean resampled
onto all of the anchor's (padded) positions, which count as valid for them (`anchor_positions`), so that the
sample's prediction still uses its other modalities; the anchor's own tokens stay masked. Samples with an
anchor are aligned to its valid tokens as usual. Both AlignMamba (interleave fusion) and AlignMamba-2 follow
this rule; with every modality missing a sample gets the "no information" output (the head of a zero pool).
"""
import dataclasses
import functools
import math
from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from alignmamba_jax.align import (cosine_cost, mmd, ot_align, segment_mean_resample, sinkhorn, sinkhorn_distance,
                                  time_contrastive_loss)
from alignmamba_jax.config import (  # noqa: F401  (models' API)
    ALIGNMENT_OPTIONS, AM2_CHANNEL_MIXERS, AM2_INFERENCE_ALIGNMENTS, AM2_MMD_TOKENS, AM2_OPTIONS,
    LOCAL_ALIGNMENT_OPTIONS, default_model_config)
from alignmamba_jax.errors import UserError
from alignmamba_jax.kernels.validation import BACKENDS as SCAN_BACKENDS
from alignmamba_jax.modules import MambaStack, ModalityAwareMambaLayer

MODEL_NAMES = ("alignmamba", "alignmamba2", "transformer_single", "transformer_multi")
FUSIONS = ("interleave", "single_stream", "multi_stream")
POOLINGS = ("mean", "last")
TASKS = ("regression", "classification")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("xla", "cudnn")
# Model config keys that are not part of the built model: the model's name, what create_model resolves into
# ModelSpec.modalities / anchor, and the trainer's loss weight.
_NOT_IN_SPEC = ("name", "drop_modalities", "align_weight")


class _ModelSpecChecks:
    """What every `ModelSpec` checks and derives; its fields come from `default_model_config()`."""

    def __post_init__(self):
        choices = {"task": TASKS, "fusion": FUSIONS, "pooling": POOLINGS, "dtype": tuple(DTYPES),
                   "attention_impl": ATTENTION_IMPLS, "scan_backend": SCAN_BACKENDS,
                   "am2_inference_alignment": AM2_INFERENCE_ALIGNMENTS, "am2_mmd_tokens": AM2_MMD_TOKENS,
                   "am2_channel_mixer": AM2_CHANNEL_MIXERS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{'task' if key == 'task' else 'cfg.' + key} must be one of {allowed}, "
                                f"found {getattr(self, key)!r}")
        if self.task == "classification" and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2 for classification, found {self.num_classes}")
        at_least = {"d_model": 1, "n_layers": 1, "d_state": 1, "d_conv": 1, "expand": 1, "ot_match_dim": 0,
                    "ot_time_prior": 0, "ot_contrastive": 0, "sinkhorn_iters": 1, "n_heads": 1, "mlp_mult": 1,
                    "moe_num_shared_experts": 0, "moe_hidden_mult": 1}
        for key, low in at_least.items():
            if not getattr(self, key) >= low:
                raise UserError(f"cfg.{key} must be >= {low}, found {getattr(self, key)}")
        positive = {"ot_contrastive_tau": (self.ot_contrastive_tau,), "ot_contrastive_sigma":
                    (self.ot_contrastive_sigma,), "sinkhorn_epsilon": (self.sinkhorn_epsilon,),
                    "sinkhorn_tolerance": (self.sinkhorn_tolerance,),
                    "mmd_sigma": self.mmd_sigma}
        for key, values in positive.items():
            if not values or not all(np.isfinite(v) and v > 0 for v in values):
                raise UserError(f"cfg.{key} must be finite and > 0, found {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"cfg.dropout must be in [0, 1), found {self.dropout}")

    @property
    def sources(self) -> Tuple[str, ...]:
        return tuple(m for m in self.modalities if m != self.anchor)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]



def _field_kind(key, default):
    """The hashable type of ModelSpec field `key`, from its default in `default_model_config()`."""
    if key == "dt_rank":
        return Union[int, str]                               # "auto" or a rank
    if isinstance(default, tuple):
        return Tuple[float, ...]
    return next(kind for kind in (bool, int, float, str) if isinstance(default, kind))


# The resolved, hashable model description a module is built from (see `create_model`): the modalities resolved
# from the data and cfg.drop_modalities, then every key of `default_model_config()` except _NOT_IN_SPEC, taken
# from the config by name and converted to its default's type (`_spec_value`). The keys are defined once, there.
ModelSpec = dataclasses.make_dataclass(
    "ModelSpec",
    [("modalities", Tuple[str, ...]),                       # active modalities, in interleave order of the config
     ("anchor", str), ("input_dims", Tuple[Tuple[str, int], ...]), ("task", str), ("num_classes", int)]
    + [(key, _field_kind(key, default)) for key, default in default_model_config().items()
       if key not in _NOT_IN_SPEC],
    bases=(_ModelSpecChecks,), frozen=True)


def _spec_value(key, value, kind):
    """cfg value `value` of ModelSpec field `key` as the field's hashable type `kind`, or a UserError."""
    def wrong(expected):
        return UserError(f"cfg.{key} must be {expected}, found {value!r}")
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        if not is_bool:
            raise wrong("True or False")
        return bool(value)
    if kind is int:
        if is_bool or not isinstance(value, (int, np.integer)):
            raise wrong("an int")
        return int(value)
    if kind is float:
        if is_bool or not isinstance(value, (int, float, np.integer, np.floating)):
            raise wrong("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if kind == Tuple[float, ...]:
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return tuple(_spec_value(key, v, float) for v in values)
    if kind == Union[int, str]:
        return value if value == "auto" else _spec_value(key, value, int)
    raise TypeError(f"ModelSpec field {key} has a type _spec_value does not convert: {kind}")


def create_model(cfg, modalities: Sequence[str], anchor: str, input_dims: Dict[str, int],
                 task: str = "regression", num_classes: int = 1) -> nn.Module:
    """Build the model named by cfg.name for the given modalities (see the module docstring)."""
    modalities = tuple(modalities)
    if cfg.name not in MODEL_NAMES:
        raise UserError(f"cfg.name must be one of {MODEL_NAMES}, found {cfg.name!r}")
    if not modalities or len(set(modalities)) != len(modalities):
        raise UserError(f"modalities must be a non-empty sequence of distinct names, found {modalities}")
    if anchor not in modalities:
        raise UserError(f"anchor {anchor!r} is not one of modalities {modalities}")
    missing_dims = [m for m in modalities if m not in input_dims]
    if missing_dims:
        raise UserError(f"input_dims lacks modalities {missing_dims}; found keys {sorted(input_dims)}")
    drop = tuple(cfg.drop_modalities)
    unknown = [m for m in drop if m not in modalities]
    if unknown:
        raise UserError(f"cfg.drop_modalities {unknown} are not among modalities {modalities}")
    active = tuple(m for m in modalities if m not in drop)
    if not active:
        raise UserError(f"cfg.drop_modalities {drop} removes every modality of {modalities}")
    resolved = dict(modalities=active, anchor=anchor if anchor in active else active[0],
                    input_dims=tuple((m, int(input_dims[m])) for m in active), task=task,
                    num_classes=int(num_classes) if task == "classification" else 1)
    kinds = {f.name: f.type for f in dataclasses.fields(ModelSpec) if f.name not in resolved}
    unknown_keys = sorted(set(cfg.keys()) - set(kinds) - set(_NOT_IN_SPEC))
    missing_keys = sorted(set(kinds) - set(cfg.keys()))
    if unknown_keys or missing_keys:
        raise UserError(f"cfg must have the keys of default_model_config(): unknown {unknown_keys}, "
                        f"missing {missing_keys}")
    spec = ModelSpec(**resolved, **{k: _spec_value(k, cfg[k], kind) for k, kind in kinds.items()})
    defaults = default_model_config()
    ignored = [k for k in unread_options(cfg.name, spec) if getattr(spec, k) != _spec_value(k, defaults[k], kinds[k])]
    if ignored:
        raise UserError(f"model {cfg.name!r} does not implement " + ", ".join(
            f"cfg.{k}={getattr(spec, k)!r}" for k in ignored) + f" (it reads none of {ignored}): leave "
            + ("it at its default" if len(ignored) == 1 else "them at their defaults")
            + ", or choose a model that implements " + ("it" if len(ignored) == 1 else "them"))
    return {"alignmamba": AlignMamba, "alignmamba2": AlignMamba2, "transformer_single": TransformerSingle,
            "transformer_multi": TransformerMulti}[cfg.name](spec)


def unread_options(name: str, spec: ModelSpec) -> Tuple[str, ...]:
    """The alignment / model-specific keys of `spec` that model `name` built from it does not read: create_model
    refuses any of them set to a non-default value, so that a config never says more than the model does."""
    if name == "alignmamba":
        unread = set(AM2_OPTIONS)
        local = spec.fusion == "interleave" and spec.use_local_alignment
    elif name == "alignmamba2":
        unread = {"use_local_alignment", "fusion"}
        local = spec.am2_inference_alignment == "ot"
        if not spec.use_sinkhorn and not spec.return_plans:
            unread |= {"sinkhorn_epsilon", "sinkhorn_iters", "sinkhorn_tolerance"}
    else:
        unread = set(AM2_OPTIONS) | {"use_local_alignment", "use_global_alignment", "mmd_sigma", "fusion"}
        local = False
    if not local:
        unread |= set(LOCAL_ALIGNMENT_OPTIONS)
    elif spec.ot_contrastive == 0:
        unread |= {"ot_contrastive_tau", "ot_contrastive_sigma"}
    if not spec.use_global_alignment:
        unread |= {"mmd_sigma", "am2_mmd_tokens"}
    return tuple(k for k in default_model_config().keys() if k in unread)


def check_inputs(spec: ModelSpec, features, masks):
    """Validate features / masks for the active modalities; return (features with every masked value replaced
    by 0, masks with None filled as all-valid)."""
    if spec.anchor not in features:
        raise ValueError(f"features lacks the anchor modality {spec.anchor!r}; found keys {sorted(features)}")
    masks = {} if masks is None else masks
    out_features, out_masks, batch = {}, {}, features[spec.anchor].shape[0]
    for m, dim in spec.input_dims:
        if m not in features:
            raise ValueError(f"features lacks modality {m!r}; found keys {sorted(features)} "
                             f"(drop it with cfg.drop_modalities, or pass an all-False mask for missing data)")
        x = features[m]
        if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] != dim:
            raise ValueError(f"features[{m!r}] must have shape ({batch}, T, {dim}), found {x.shape}")
        mask = masks.get(m)
        if mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        elif mask.shape != x.shape[:2]:
            raise ValueError(f"masks[{m!r}] must have shape {x.shape[:2]}, found {mask.shape}")
        out_masks[m] = jnp.asarray(mask, bool)
        out_features[m] = jnp.where(out_masks[m][..., None], x, jnp.zeros((), x.dtype))
    return out_features, out_masks


def interleave_time_major(sequences: Sequence[jax.Array], masks: Sequence[jax.Array]):
    """[x^1_1, x^2_1, ..., x^M_1, x^1_2, ...]: M sequences (B, T, d) -> (B, T * M, d), masks likewise."""
    x = jnp.stack(sequences, axis=2)
    m = jnp.stack(masks, axis=2)
    b, t, k, d = x.shape
    return x.reshape(b, t * k, d), m.reshape(b, t * k)


def masked_pool(x, mask, pooling: str):
    """(B, L, d) -> (B, d): mean over valid tokens, or the last valid token; zeros when none is valid."""
    if pooling == "mean":
        w = mask.astype(jnp.float32)[..., None]
        return jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)
    picked = jnp.take_along_axis(x.astype(jnp.float32), jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where((last >= 0)[:, None], picked, 0.0)


def anchor_positions(anchor_mask):
    """(B, T_a) -> (B, T_a): the positions the sources are aligned to. The anchor's valid tokens, or, for a
    sample whose anchor is missing entirely, all T_a positions (the missing-anchor rule, module docstring)."""
    return jnp.where(jnp.any(anchor_mask, axis=-1, keepdims=True), anchor_mask, True)


def _batch_mean(values, present):
    """Mean of per-sample values over the samples where `present`; 0 if none."""
    w = present.astype(jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _present(source_mask, anchor_mask):
    """(B,) True where both (B, T) masks have a valid token."""
    return jnp.any(source_mask, axis=-1) & jnp.any(anchor_mask, axis=-1)


def mmd_losses(spec: ModelSpec, sources, source_masks, anchor, anchor_mask) -> Dict[str, jax.Array]:
    """Global alignment: {"mmd/<source>": MMD^2 of the source's tokens vs the anchor's, averaged over the
    samples where both are present}."""
    return {f"mmd/{m}": _batch_mean(mmd(sources[m], anchor, spec.mmd_sigma, source_masks[m], anchor_mask),
                                    _present(source_masks[m], anchor_mask))
            for m in spec.sources}


@jax.custom_vjp
def _affine(x, kernel, bias):
    return x @ kernel + bias


def _affine_fwd(x, kernel, bias):
    return _affine(x, kernel, bias), (x, kernel)


def _affine_bwd(residuals, ct):
    x, kernel = residuals
    token_axes = tuple(range(x.ndim - 1))
    return ct @ kernel.T, jnp.tensordot(x, ct, axes=(token_axes, token_axes)), jnp.sum(ct, axis=token_axes)


_affine.defvjp(_affine_fwd, _affine_bwd)


class TokenDense(nn.Module):
    """`nn.Dense` over the last axis of a token array (same parameters, initialisers, dtype promotion and
    values), whose weight gradient is written as one contraction of the inputs with the output cotangent over
    every token axis. Under plain autodiff XLA's CPU backend instead transposes the cotangent, recomputing in
    transposed order every elementwise term that sums into it (dropout's mask, each loss's gradient): that took
    about a fifth of the demo's training step (benchmarks/RESULTS.md, "AlignMamba-2")."""
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return _affine(*promote_dtype(x, kernel, bias, dtype=self.dtype))


class Projections(nn.Module):
    """One linear projection per modality to the common width d_model (`TokenDense`), then dropout."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, train: bool):
        return {m: nn.Dropout(self.spec.dropout)(
                    TokenDense(self.spec.d_model, dtype=self.spec.compute_dtype, name=f"proj_{m}")(features[m]),
                    deterministic=not train)
                for m, _ in self.spec.input_dims}


class Head(nn.Module):
    """Pooled features -> prediction: (B,) for regression, (B, num_classes) logits for classification."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, pooled, train: bool):
        h = nn.gelu(nn.Dense(self.spec.d_model, name="hidden")(pooled.astype(jnp.float32)))
        h = nn.Dropout(self.spec.dropout)(h, deterministic=not train)
        out = nn.Dense(self.spec.num_classes, name="out")(h).astype(jnp.float32)
        return out[:, 0] if self.spec.task == "regression" else out


def _mamba_stack(spec: ModelSpec, name: str) -> MambaStack:
    return MambaStack(spec.d_model, spec.n_layers, spec.d_state, spec.d_conv, spec.expand, spec.dt_rank,
                      spec.scan_backend, spec.dropout, spec.compute_dtype, name=name)


class LocalAlignment(nn.Module):
    """AlignMamba's local alignment of every source modality to the anchor's positions, and what it owns: the
    matching keys of the cost (`ot_match_dim`: learned linear projections of the raw features, else the
    projected tokens), the cost options (`ot_centred`, `ot_time_prior`), the hard relaxed-OT plan of `ot_align`
    (`ot_barycentric` for the aggregation) and the training-only matching loss (`ot_contrastive`:
    `time_contrastive_loss` of the keys). With use_local_alignment=False ("w/o local") the sources are
    segment-mean resampled instead, and there are no keys or losses. The sources of a sample without an anchor
    are resampled onto all anchor positions (`anchor_positions`).

    __call__(features, tokens, masks, train), with the raw features and the projected tokens per modality,
    returns (aligned {source: (B, T_a, d)}, masks {source: (B, T_a)}, plans {source: (B, T_s, T_a)} (empty
    unless spec.return_plans), aux {"contrastive/<source>": unweighted training loss}).
    """
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, tokens, masks, train: bool):
        spec = self.spec
        anchor, am = tokens[spec.anchor], masks[spec.anchor]
        positions, has_anchor = anchor_positions(am), jnp.any(am, axis=-1)[:, None, None]
        keys = tokens
        if spec.use_local_alignment and spec.ot_match_dim:
            keys = {m: nn.Dense(spec.ot_match_dim, name=f"match_{m}")(features[m].astype(jnp.float32))
                    for m in spec.modalities}
        aligned, aligned_masks, plans, aux = {}, {}, {}, {}
        for m in spec.sources:
            aligned[m], plan = segment_mean_resample(tokens[m], anchor.shape[1], masks[m], positions,
                                                     return_plan=spec.return_plans)
            if spec.use_local_alignment:
                matched, ot_plan = ot_align(tokens[m], anchor, masks[m], am, centred=spec.ot_centred,
                                            barycentric=spec.ot_barycentric, source_key=keys[m],
                                            anchor_key=keys[spec.anchor], time_prior=spec.ot_time_prior,
                                            return_plan=spec.return_plans)
                aligned[m] = jnp.where(has_anchor, matched, aligned[m])
                plan = jnp.where(has_anchor, ot_plan, plan) if spec.return_plans else None
                if train and spec.ot_contrastive > 0:
                    nce = time_contrastive_loss(keys[m], keys[spec.anchor], masks[m], am, centred=spec.ot_centred,
                                                tau=spec.ot_contrastive_tau, sigma=spec.ot_contrastive_sigma)
                    aux[f"contrastive/{m}"] = _batch_mean(nce, _present(masks[m], am))
            aligned_masks[m] = positions & jnp.any(masks[m], axis=-1, keepdims=True)
            if spec.return_plans:
                plans[m] = plan
        return aligned, aligned_masks, plans, aux


class AlignMamba(nn.Module):
    """AlignMamba: projections, local alignment to the anchor (`LocalAlignment`), MMD global loss, time-major
    interleave, a Mamba stack, masked pooling and a head; `spec.fusion` / `use_*_alignment` select the Table-3
    ablations:

    interleave + local   full model: each source -> ot_align to the anchor, interleaved [s_1, ..., anchor_1, ...]
    interleave, no local "w/o local": each source -> segment-mean resampled to the anchor length instead
    single_stream        all projected tokens concatenated modality after modality, one Mamba stack, no OT
    multi_stream         one Mamba stack per modality, pooled outputs concatenated, no OT
    MMD (if use_global_alignment) compares each source with the anchor: the aligned tokens for interleave, the
    projected tokens otherwise. align_loss = sum of the MMD terms + ot_contrastive * LocalAlignment's losses.
    """
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, masks=None, train: bool = False):
        spec = self.spec
        features, masks = check_inputs(spec, features, masks)
        x = Projections(spec, name="projections")(features, train)
        anchor, am = x[spec.anchor], masks[spec.anchor]
        sources, source_masks, plans, aux = x, masks, {}, {}
        if spec.fusion == "interleave":
            local = LocalAlignment(spec, name="local_alignment")
            nn.share_scope(self, local)  # its matching keys keep the parameter paths of earlier checkpoints
            sources, source_masks, plans, aux = local(features, x, masks, train)
            stream, stream_mask = interleave_time_major([sources[m] for m in spec.sources] + [anchor],
                                                        [source_masks[m] for m in spec.sources] + [am])
            pooled = masked_pool(_mamba_stack(spec, "mamba")(stream, stream_mask, train), stream_mask, spec.pooling)
        elif spec.fusion == "single_stream":
            stream = jnp.concatenate([x[m] for m in spec.modalities], axis=1)
            stream_mask = jnp.concatenate([masks[m] for m in spec.modalities], axis=1)
            pooled = masked_pool(_mamba_stack(spec, "mamba")(stream, stream_mask, train), stream_mask, spec.pooling)
        else:
            pooled = jnp.concatenate(
                [masked_pool(_mamba_stack(spec, f"mamba_{m}")(x[m], masks[m], train), masks[m], spec.pooling)
                 for m in spec.modalities], axis=-1)
        if spec.use_global_alignment:
            aux.update(mmd_losses(spec, sources, source_masks, anchor, am))
        mmd_terms = [v for k, v in aux.items() if k.startswith("mmd/")]
        contrastive_terms = [v for k, v in aux.items() if k.startswith("contrastive/")]
        aux["mmd"] = jnp.asarray(sum(mmd_terms) if mmd_terms else 0.0, jnp.float32)
        if contrastive_terms:
            aux["contrastive"] = jnp.asarray(sum(contrastive_terms), jnp.float32)
        align_loss = sum(mmd_terms + [spec.ot_contrastive * c for c in contrastive_terms], jnp.float32(0.0))
        out = {"prediction": Head(spec, name="head")(pooled, train), "align_loss": align_loss, "aux": aux}
        if spec.return_plans:
            out["ot_plans"] = plans
        return out


class AlignMamba2(nn.Module):
    """AlignMamba-2: alignment as training-only regularisers, fusion by Modality-Aware Mamba layers.

    Fusion (train and inference alike): each source is brought to the anchor's positions and the streams are
    interleaved time-major; n_layers ModalityAwareMambaLayers (shared Mamba mixer + modality-aware MoE) follow.
    How the sources reach the anchor's positions is spec.am2_inference_alignment: "resample" (the paper) takes
    segment means, uniform in time (onto all anchor positions for a sample without an anchor,
    `anchor_positions`), so inference does no alignment work; "ot" (our extension) runs AlignMamba's
    `LocalAlignment` (its learned-cost hard OT plan and its ot_* options) at training and inference.
    Regularisers, training only, each switched on its own: use_sinkhorn adds the entropic OT distance
    (`sinkhorn_distance`, cosine cost) between every projected source and the anchor tokens;
    use_global_alignment adds MMD^2 between each source and the anchor tokens, the source's tokens being the
    aligned ones the fusion stream receives (am2_mmd_tokens="aligned", as AlignMamba) or every projected frame
    ("frames"); align_loss = their sum (+ ot_contrastive * LocalAlignment's losses with "ot"). With train=False
    align_loss = 0. cfg.return_plans returns LocalAlignment's plans with "ot", else the Sinkhorn plans.
    """
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, masks=None, train: bool = False):
        spec = self.spec
        features, masks = check_inputs(spec, features, masks)
        x = Projections(spec, name="projections")(features, train)
        anchor, am = x[spec.anchor], masks[spec.anchor]
        if spec.am2_inference_alignment == "ot":
            seqs, seq_masks, plans, aux = LocalAlignment(spec, name="local_alignment")(features, x, masks, train)
        else:
            positions, plans, aux = anchor_positions(am), {}, {}
            seqs = {m: segment_mean_resample(x[m], anchor.shape[1], masks[m], positions, return_plan=False)[0]
                    for m in spec.sources}
            seq_masks = {m: positions & jnp.any(masks[m], axis=-1, keepdims=True) for m in spec.sources}
        for m in spec.sources:
            if spec.return_plans and spec.am2_inference_alignment == "resample":
                plans[m] = sinkhorn(cosine_cost(x[m], anchor), masks[m], am, epsilon=spec.sinkhorn_epsilon,
                                    num_iters=spec.sinkhorn_iters)[0]
            if train and spec.use_sinkhorn:
                dist = sinkhorn_distance(cosine_cost(x[m], anchor), masks[m], am, epsilon=spec.sinkhorn_epsilon,
                                         max_iters=spec.sinkhorn_iters, tolerance=spec.sinkhorn_tolerance)
                aux[f"ot/{m}"] = _batch_mean(dist, _present(masks[m], am))
        if train and spec.use_global_alignment:
            mmd_sources = (seqs, seq_masks) if spec.am2_mmd_tokens == "aligned" else (x, masks)
            aux.update(mmd_losses(spec, *mmd_sources, anchor, am))
        terms = {kind: [v for k, v in aux.items() if k.startswith(kind + "/")] for kind in ("ot", "mmd", "contrastive")}
        aux["ot"] = jnp.asarray(sum(terms["ot"]) if terms["ot"] else 0.0, jnp.float32)
        aux["mmd"] = jnp.asarray(sum(terms["mmd"]) if terms["mmd"] else 0.0, jnp.float32)
        align_loss = aux["ot"] + aux["mmd"]
        if terms["contrastive"]:
            aux["contrastive"] = jnp.asarray(sum(terms["contrastive"]), jnp.float32)
            align_loss = align_loss + spec.ot_contrastive * aux["contrastive"]

        stream, stream_mask = interleave_time_major([seqs[m] for m in spec.sources] + [anchor],
                                                    [seq_masks[m] for m in spec.sources] + [am])
        n_mod = len(spec.modalities)
        for i in range(spec.n_layers):
            stream = ModalityAwareMambaLayer(
                n_mod, spec.d_model, spec.d_state, spec.d_conv, spec.expand, spec.dt_rank, spec.scan_backend,
                1.0 / math.sqrt(spec.n_layers), spec.moe_num_shared_experts, spec.moe_hidden_mult,
                spec.dropout, spec.compute_dtype, spec.am2_channel_mixer, name=f"layer_{i}")(stream, stream_mask, train)
        h = nn.RMSNorm(epsilon=1e-5, dtype=jnp.float32, name="norm_f")(stream)
        pooled = masked_pool(h, stream_mask, spec.pooling)
        out = {"prediction": Head(spec, name="head")(pooled, train), "align_loss": align_loss, "aux": aux}
        if spec.return_plans:
            out["ot_plans"] = plans
        return out


def sinusoidal_positions(length: int, d_model: int):
    """(length, d_model) fixed sinusoidal position encodings (Vaswani et al.)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    enc = jnp.zeros((length, d_model), jnp.float32)
    enc = enc.at[:, 0::2].set(jnp.sin(pos * freq))
    return enc.at[:, 1::2].set(jnp.cos(pos * freq[: d_model // 2]))


def fused_attention(query, key, value, mask=None, *, implementation="cudnn"):
    """`jax.nn.dot_product_attention` as a Flax `attention_fn` (query, key, value: (batch, length, heads,
    head_dim); mask: broadcastable to (batch, heads, q_length, kv_length), True = attend).

    Inputs run in bfloat16 (cuDNN's fused kernels take 16-bit inputs only), the output is cast back; the mask
    (Flax makes it float) becomes an additive bias; the attention weights get no dropout (the fused kernel has
    none). Odd lengths get one padding query (dropped) and one masked key: cuDNN's backward pass with a bias
    takes even lengths only."""
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask.astype(bool)
    mask = jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))
    pad_q, pad_kv = q_len % 2, kv_len % 2
    pad = lambda x, n: jnp.pad(x.astype(jnp.bfloat16), ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)))
    out = jax.nn.dot_product_attention(pad(query, pad_q), pad(key, pad_kv), pad(value, pad_kv), mask=mask,
                                       implementation=implementation)
    return out[:, :q_len].astype(query.dtype)


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block; self-attention when `context` is None, else cross-attention to it.
    spec.attention_impl: "xla" (Flax's attention) or "cudnn" (`fused_attention`)."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, x, mask, context=None, context_mask=None, train: bool = False):
        spec = self.spec
        h = nn.LayerNorm(dtype=jnp.float32, name="norm_q")(x)
        if context is None:
            kv, kv_mask = h, mask
        else:
            kv, kv_mask = nn.LayerNorm(dtype=jnp.float32, name="norm_kv")(context), context_mask
        attention_fn = (nn.dot_product_attention if spec.attention_impl == "xla"
                        else functools.partial(fused_attention, implementation=spec.attention_impl))
        h = nn.MultiHeadDotProductAttention(
            num_heads=spec.n_heads, dtype=spec.compute_dtype, dropout_rate=spec.dropout,
            deterministic=not train, attention_fn=attention_fn, name="attention")(
                h, kv, mask=nn.make_attention_mask(mask, kv_mask))
        x = x + h.astype(x.dtype)
        h = nn.LayerNorm(dtype=jnp.float32, name="norm_mlp")(x)
        h = nn.Dense(spec.mlp_mult * spec.d_model, dtype=spec.compute_dtype, name="mlp_up")(h)
        h = nn.Dense(spec.d_model, dtype=spec.compute_dtype, name="mlp_down")(nn.gelu(h))
        return x + nn.Dropout(spec.dropout)(h, deterministic=not train).astype(x.dtype)


def _positioned_projections(spec, features, train, name):
    x = Projections(spec, name=name)(features, train)
    return {m: v + sinusoidal_positions(v.shape[1], spec.d_model).astype(v.dtype) for m, v in x.items()}


class TransformerSingle(nn.Module):
    """Single-stream Transformer baseline: all projected tokens (own positions per modality) concatenated,
    n_layers of full self-attention (quadratic in the fused length), masked pooling, head."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, masks=None, train: bool = False):
        spec = self.spec
        features, masks = check_inputs(spec, features, masks)
        x = _positioned_projections(spec, features, train, "projections")
        h = jnp.concatenate([x[m] for m in spec.modalities], axis=1)
        mask = jnp.concatenate([masks[m] for m in spec.modalities], axis=1)
        for i in range(spec.n_layers):
            h = TransformerBlock(spec, name=f"block_{i}")(h, mask, train=train)
        h = nn.LayerNorm(dtype=jnp.float32, name="norm_f")(h)
        pooled = masked_pool(h, mask, spec.pooling)
        return {"prediction": Head(spec, name="head")(pooled, train), "align_loss": jnp.float32(0.0), "aux": {}}


class TransformerMulti(nn.Module):
    """Multi-stream (MulT-like) Transformer baseline: for every target modality, n_layers of cross-modal
    attention from each other modality, the results concatenated, projected and passed through n_layers of
    self-attention, pooled; all targets' pooled features concatenated into the head."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, features, masks=None, train: bool = False):
        spec = self.spec
        features, masks = check_inputs(spec, features, masks)
        x = _positioned_projections(spec, features, train, "projections")
        pooled = []
        for tgt in spec.modalities:
            others = [s for s in spec.modalities if s != tgt] or [tgt]
            crossed = []
            for src in others:
                h = x[tgt]
                for i in range(spec.n_layers):
                    h = TransformerBlock(spec, name=f"cross_{src}_to_{tgt}_{i}")(
                        h, masks[tgt], x[src], masks[src], train=train)
                crossed.append(h)
            h = nn.Dense(spec.d_model, dtype=spec.compute_dtype, name=f"merge_{tgt}")(
                jnp.concatenate(crossed, axis=-1))
            for i in range(spec.n_layers):
                h = TransformerBlock(spec, name=f"self_{tgt}_{i}")(h, masks[tgt], train=train)
            h = nn.LayerNorm(dtype=jnp.float32, name=f"norm_{tgt}")(h)
            pooled.append(masked_pool(h, masks[tgt], spec.pooling))
        pooled = jnp.concatenate(pooled, axis=-1)
        return {"prediction": Head(spec, name="head")(pooled, train), "align_loss": jnp.float32(0.0), "aux": {}}
