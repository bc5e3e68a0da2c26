"""Every configuration key a run may set, with its default, in one place; the model variants; loading
configs/*.py files; and the checks a config passes before anything runs.

`configs/*.py` import this module and ml_collections only: loading a config imports no jax. `train.py`,
`models.py` and `data/synthetic.py` read their defaults from here.

- `default_config()`: seed, data, model, train and eval sections; `default_model_config()` and
  `default_synthetic_config()` are the model and `data.synthetic` sections.
- `MODEL_VARIANTS` / `apply_model_variant`: the paper's ablations as a config's parameter string
  (`configs/mosi.py:wo_local`).
- `load_config` / `sibling_config`: `get_config(variant)` of a config file by path.
- `check_config` (no unknown keys), `validate_config` (values that cannot define a run) and
  `resolve_selection` (the metric and mode that pick the best checkpoint).
"""
import copy
import importlib.util
import math
import os

import ml_collections

from alignmamba_jax import metrics
from alignmamba_jax.errors import UserError

# the validation metric and mode that pick the best checkpoint when eval.select_metric / select_mode are ""
TASK_SELECTION = {"regression": ("MAE", "min"), "classification": ("accuracy", "max")}
TASK_METRICS = {"regression": metrics.REGRESSION_KEYS, "classification": metrics.CLASSIFICATION_KEYS}
MINIMISED_METRICS = ("MAE",)



# Our local-alignment options (see default_model_config); their defaults are the paper's rule.
ALIGNMENT_OPTIONS = ("ot_centred", "ot_match_dim", "ot_contrastive", "ot_time_prior", "ot_barycentric")
# Every option of LocalAlignment (AlignMamba's local alignment; AlignMamba-2's with am2_inference_alignment="ot").
LOCAL_ALIGNMENT_OPTIONS = ALIGNMENT_OPTIONS + ("ot_contrastive_tau", "ot_contrastive_sigma")
# Options of AlignMamba-2 only.
AM2_OPTIONS = ("use_sinkhorn", "sinkhorn_epsilon", "sinkhorn_iters", "sinkhorn_tolerance", "am2_inference_alignment",
               "am2_mmd_tokens", "moe_num_shared_experts", "moe_hidden_mult", "am2_channel_mixer")
AM2_INFERENCE_ALIGNMENTS = ("resample", "ot")
AM2_CHANNEL_MIXERS = ("moe", "dense")
AM2_MMD_TOKENS = ("aligned", "frames")


def default_model_config() -> ml_collections.ConfigDict:
    """Every model key with its default. Values the papers do not state are our choices (marked 'ours')."""
    c = ml_collections.ConfigDict()
    c.name = "alignmamba"            # one of MODEL_NAMES
    c.d_model = 128                  # common width after the per-modality linear projections (ours)
    c.n_layers = 2                   # Mamba blocks / AlignMamba-2 layers / Transformer layers (ours)
    c.d_state = 16                   # mamba-ssm default
    c.d_conv = 4                     # mamba-ssm default
    c.expand = 2                     # mamba-ssm default
    c.dt_rank = "auto"               # ceil(d_model / 16), mamba-ssm default
    c.scan_backend = "auto"          # alignmamba_jax.kernels.selective_scan backend
    c.dtype = "float32"              # compute dtype of the big matmuls: "float32" | "bfloat16"
    c.dropout = 0.1                  # (ours)
    c.pooling = "mean"               # "mean" over valid tokens | "last" valid token (ours)
    c.use_local_alignment = True     # AlignMamba; False: "w/o local" -> segment-mean resampling to the anchor length
    c.use_global_alignment = True    # AlignMamba and AlignMamba-2; False: "w/o global" -> no MMD term
    c.fusion = "interleave"          # "interleave" | "single_stream" | "multi_stream" (AlignMamba only)
    c.drop_modalities = ()           # e.g. ("audio",) for "w/o audio"
    # Gaussian kernel bandwidths, kernels averaged; (s,) for a single sigma (ours). A single sigma = 1 saturates
    # (kernel ~ 0 between sets, no gradient) once the projected tokens spread beyond unit distance.
    c.mmd_sigma = (1.0, 2.0, 4.0, 8.0, 16.0)
    # Local-alignment options (ours). The inference plan is the paper's hard argmin plan whatever they are; the
    # defaults are the paper exactly. With the paper's cost the argmin gets no gradient and, on the synthetic
    # default, the plan stays at chance against the true word spans; what fixed it there (configs/synthetic.py)
    # is a learned matching cost trained by ot_contrastive, centred, plus ot_time_prior. ot_barycentric did not
    # help there; see benchmarks/RESULTS.md ("Ablation").
    c.ot_centred = False             # True: cost on per-sequence mask-aware mean-centred features (against the
                                     # shared-offset "hub collapse" of un-centred cosines)
    c.ot_match_dim = 0               # > 0: the OT cost compares separate learned linear "matching" projections
                                     # of the raw features (width ot_match_dim), as attention's queries / keys;
                                     # 0: the cost compares the projected tokens themselves (paper)
    c.ot_time_prior = 0.0            # > 0: add ot_time_prior * |relative time of frame - of token| to the cost
                                     # (a temporal prior the content cost refines); 0: cosine cost only (paper)
    c.ot_contrastive = 0.0           # > 0: add ot_contrastive * time_contrastive_loss of the OT cost's features
                                     # (matching keys if ot_match_dim, else projected tokens; centred if ot_centred)
                                     # to align_loss, training only: InfoNCE with relative-time soft targets, the
                                     # signal that teaches the cost which token matches which; 0: off (paper)
    c.ot_contrastive_tau = 1.0       # its cosine temperature
    c.ot_contrastive_sigma = 0.1     # its target width in relative time (fraction of the sequence)
    c.ot_barycentric = False         # True: aligned token = mean of its assigned frames, not M^T X (1/T_s-scaled)
    c.align_weight = 0.1             # lambda in L = L_task + lambda * align_loss; used by the trainer (ours)
    c.return_plans = False           # also return the OT plans (for plot_ot_plan); else no plan is built
    # AlignMamba-2
    c.moe_num_shared_experts = 1     # modality-shared experts per layer (ours)
    c.moe_hidden_mult = 2            # expert MLP width = moe_hidden_mult * d_model (ours)
    c.am2_channel_mixer = "moe"      # "moe": the Modality-Aware MoE (paper); "dense": one GELU MLP of the same
                                     # parameter count instead, the MoE's ablation (variant wo_moe)
    c.use_sinkhorn = True            # AlignMamba-2; False: no entropic OT (Sinkhorn) term ("wo_sinkhorn")
    c.sinkhorn_epsilon = 0.1         # entropic regularisation of the training-only OT distance (ours)
    c.sinkhorn_iters = 50            # at most this many Sinkhorn iterations (ours) ...
    c.sinkhorn_tolerance = 1e-3      # ... stopping once the marginal error ||P 1 - a||_1 is below this (ours)
    # How the sources reach the anchor's positions in the fusion stream, at training and inference alike:
    # "resample": segment means, uniform in time (the paper: no alignment work at inference);
    # "ot": LocalAlignment's hard OT plan on the learned cost, as AlignMamba (our extension, not the paper's).
    c.am2_inference_alignment = "resample"
    # Which source tokens AlignMamba-2's MMD compares with the anchor's: "aligned", the tokens the fusion stream
    # receives (resampled, or OT-aligned with "ot"): MMD^2(aligned source, X_l), as AlignMamba's global
    # alignment; "frames": every projected source frame (50-100x the kernel work at 375-500 frames, same accuracy
    # on the synthetic tasks: benchmarks/RESULTS.md, "AlignMamba-2"). The paper does not say (ours).
    c.am2_mmd_tokens = "aligned"
    # Transformer baselines
    c.n_heads = 4
    c.mlp_mult = 4
    c.attention_impl = "xla"         # "xla": Flax's attention (logits materialised, the papers' kind of baseline);
                                     # "cudnn": cuDNN's fused flash attention, GPU only (see fused_attention)
    return c


def default_synthetic_config() -> ml_collections.ConfigDict:
    """The `data.synthetic` sub-config with its documented defaults (sizes fit a 2-core CPU demo)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.n_train = 1280
    c.n_valid = 256
    c.n_test = 512
    # sentiment (language / audio / vision), MOSI unaligned shapes
    c.text_len = 50
    c.text_dim = 768
    c.audio_len = 375
    c.audio_dim = 5
    c.vision_len = 500
    c.vision_dim = 20
    c.vocab_size = 24
    c.code_dim = 4
    c.min_words = 6
    c.max_words = 30
    c.duration_sigma = 0.6
    c.pause_prob = 0.25
    c.max_lead_in = 0.3
    c.min_frac = 0.6
    c.text_noise = 0.3
    c.frame_noise = 0.15
    c.text_weight = 0.5
    c.label_noise = 0.1
    # True: audio / vision given word-aligned, like MMSA's aligned_50.pkl: each text token gets the mean of its
    # word's frames (zeros for [CLS], [SEP] and padding), shapes (N, text_len, d). The upper bound alignment
    # can reach on this data; False (default): the raw unaligned frames.
    c.aligned = False
    # image-text classification (features_npz layout)
    c.image_len = 49
    c.image_dim = 64
    c.caption_len = 24
    c.caption_dim = 64
    c.num_classes = 3
    return c


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        batch_size=32,            # global, over all devices and processes
        steps=1000,
        learning_rate=1e-3,
        warmup_steps=100,
        end_learning_rate_factor=0.01,
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        grad_clip_norm=1.0,
        log_every=50,
        eval_every=200,           # validation (and best-checkpoint selection) every this many steps
        checkpoint_every=200,
        keep_checkpoints=2,
        allow_config_change=False,  # True: resume a workdir whose checkpoints had another config (logged)
        fsdp=1,                   # size of the mesh's "fsdp" axis; the "data" axis takes the other devices
        fsdp_min_size=2 ** 14,    # parameters with fewer elements stay replicated
    ))


def default_eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        batch_size=64,
        select_metric="",         # validation metric that picks the best checkpoint; "": the task's
        select_mode="",           # (MAE, min for regression as MMSA; accuracy, max for classification)
        missing_rates=(),         # e.g. (0.1, ..., 0.7): sweep missing-modality protocols on test
        missing_protocols=("random_tokens", "imder", "per_sample"),
        missing_metrics=("Non0_acc_2", "Non0_F1_score"),
        missing_seed=0,
    ))


def default_data_config() -> ml_collections.ConfigDict:
    """The keys `alignmamba_jax.data.load_splits` reads; the synthetic sentiment task by default."""
    return ml_collections.ConfigDict(dict(
        name="synthetic",         # synthetic | mmsa | mult | tfds | features_npz
        path="",                  # file or directory of the real data (unused for synthetic)
        tfds_name="mosi",         # for name="tfds": mosi | mosei (data_dir = path)
        tfds_config="unaligned",  # for name="tfds": unaligned | aligned
        cache_dir="",             # for name="mmsa": convert the pickle once to memory-mapped .npy files here
        modalities=("text", "audio", "vision"),
        anchor="text",            # the modality the others are aligned to
        task="regression",        # regression (sentiment in [-3, 3]) | classification
        num_classes=1,
        synthetic=default_synthetic_config(),
    ))


def default_config() -> ml_collections.ConfigDict:
    """Every key a run may set; configs/*.py start here and override."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        data=default_data_config(),
        model=default_model_config(),
        train=default_train_config(),
        eval=default_eval_config(),
    ))


# every option of the local alignment at the paper's rule: part of each variant that removes the local alignment
# (a model refuses options it does not read, models.unread_options)
_PAPER_LOCAL = {k: default_model_config()[k] for k in LOCAL_ALIGNMENT_OPTIONS}
_NO_SINKHORN = {"use_sinkhorn": False, **{k: default_model_config()[k] for k in
                                          ("sinkhorn_epsilon", "sinkhorn_iters", "sinkhorn_tolerance")}}
MODEL_VARIANTS = {
    # Paper Table 3: config parameter string -> model overrides (e.g. `configs/mosi.py:wo_local`).
    "full": {},
    "wo_local": {"use_local_alignment": False, **_PAPER_LOCAL},
    "wo_global": {"use_global_alignment": False},
    "single_stream": {"fusion": "single_stream", "use_local_alignment": False, **_PAPER_LOCAL},
    "multi_stream": {"fusion": "multi_stream", "use_local_alignment": False, **_PAPER_LOCAL},
    "wo_audio": {"drop_modalities": ("audio",)},
    "wo_video": {"drop_modalities": ("vision",)},
    "wo_language": {"drop_modalities": ("text",)},
    # the config's model with every alignment option of ours reset to the paper's rule
    "paper_ot": _PAPER_LOCAL,
    # AlignMamba-2's regularisers, each alone or both off; its OT front end (our extension); its MMD over every
    # source frame instead of the aligned tokens; a dense MLP of the same parameter count in place of its MoE
    "wo_sinkhorn": _NO_SINKHORN,
    "wo_mmd": {"use_global_alignment": False},
    "wo_align": {**_NO_SINKHORN, "use_global_alignment": False},
    "ot_inference": {"am2_inference_alignment": "ot"},
    "mmd_frames": {"am2_mmd_tokens": "frames"},
    "wo_moe": {"am2_channel_mixer": "dense"},
}


def apply_model_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    if variant not in MODEL_VARIANTS:
        raise UserError(f"unknown config variant {variant!r}; expected one of {sorted(MODEL_VARIANTS)}")
    config.model.update(MODEL_VARIANTS[variant])
    return config


def load_config(path: str, variant=None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(variant)`) of the config file at `path` (configs/ is not a package)."""
    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(f"config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)


def sibling_config(config_file: str, name: str, variant: str = "full") -> ml_collections.ConfigDict:
    """`get_config(variant)` of configs file `name` beside `config_file`."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name), variant)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects keys that no part of the code reads (a typo would otherwise be silently ignored)."""
    def walk(given, reference, prefix):
        for key in given.keys():
            name = f"{prefix}{key}"
            if key not in reference:
                raise UserError(f"unknown config key {name!r}; expected one of {sorted(reference.keys())}")
            if isinstance(reference[key], ml_collections.ConfigDict) and isinstance(
                    given[key], ml_collections.ConfigDict):
                walk(given[key], reference[key], name + ".")
    walk(config, default_config(), "")


def resolve_selection(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with eval.select_metric / select_mode set (the task's defaults where ""); a UserError
    for a metric the task does not produce or a mode other than min / max, before anything is compiled."""
    config = copy.deepcopy(config)
    task = config.data.task
    if task not in TASK_SELECTION:
        raise UserError(f"data.task={task!r}: expected one of {sorted(TASK_SELECTION)}")
    metric = config.eval.select_metric or TASK_SELECTION[task][0]
    if metric not in TASK_METRICS[task]:
        raise UserError(f"eval.select_metric={metric!r} is not a metric of data.task={task!r}; expected one of "
                        f"{list(TASK_METRICS[task])}")
    mode = config.eval.select_mode or ("min" if metric in MINIMISED_METRICS else "max")
    if mode not in ("min", "max"):
        raise UserError(f"eval.select_mode={mode!r}: expected 'min' or 'max' (or '' for the metric's own)")
    config.eval.select_metric, config.eval.select_mode = metric, mode
    return config


# optimiser settings: (train key, lowest, highest, (lowest allowed, highest allowed)); outside them AdamW
# ascends, diverges or never moves
OPTIMIZER_RANGES = (("learning_rate", 0.0, math.inf, (False, False)),
                    ("end_learning_rate_factor", 0.0, 1.0, (True, True)),
                    ("weight_decay", 0.0, math.inf, (True, False)),
                    ("b1", 0.0, 1.0, (True, False)),
                    ("b2", 0.0, 1.0, (True, False)),
                    ("grad_clip_norm", 0.0, math.inf, (False, False)))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Config values that cannot define a run, refused before the workdir or the data is touched."""
    positive = ("train.batch_size", "train.log_every", "train.eval_every", "train.checkpoint_every",
                "train.keep_checkpoints", "eval.batch_size")
    for key in positive:
        section, name = key.split(".")
        value = config[section][name]
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: expected an integer of at least 1")
    for key, value in (("train.steps", config.train.steps), ("seed", config.seed)):
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{key}={value!r}: expected an integer of at least 0")
    if not isinstance(config.train.warmup_steps, int) or config.train.warmup_steps < 0:
        raise UserError(f"train.warmup_steps={config.train.warmup_steps!r}: expected an integer of at least 0")
    for key, lowest, highest, closed in OPTIMIZER_RANGES:
        value = config.train[key]
        inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            value >= lowest if closed[0] else value > lowest) and (value <= highest if closed[1] else value < highest)
        if not inside:
            bounds = (f"{'>=' if closed[0] else '>'} {lowest:g}" if highest == math.inf else
                      f"in {'[' if closed[0] else '('}{lowest:g}, {highest:g}{']' if closed[1] else ')'}")
            raise UserError(f"train.{key}={value!r}: expected a finite number {bounds}")
    outside = [r for r in config.eval.missing_rates if not 0.0 <= float(r) <= 1.0]
    if outside:
        raise UserError(f"eval.missing_rates={tuple(config.eval.missing_rates)}: rates must lie in [0, 1], found "
                        f"{outside}")


