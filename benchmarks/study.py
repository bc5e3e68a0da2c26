"""Shared plumbing of the training studies (ablation, missing modalities, AlignMamba-2 vs 1).

A study is a list of runs (config file, variant, overrides, seed), each trained and evaluated by
`alignmamba_jax.train.train_and_evaluate` in its own workdir. A workdir that already holds results.json for the
same configuration is reused instead of retrained (so studies share runs and a killed study resumes); the
seeds change `config.seed` (initialisation, data order, dropout) while the synthetic data stay fixed.
"""
import json
import math
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_METRICS = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr")
# The studies' CPU budget (a shared 2-core container) does not fit 24+ runs of configs/synthetic.py as is
# (about 3.6 GFLOP per training step, 600 steps). "small" keeps the synthetic generator and its defaults but
# shortens the sequences (language 32 tokens with up to 20 words, audio 64 and vision 96 frames instead of
# 50 / 375 / 500), halves the width and batch and trains 200 steps: about 0.2 GFLOP per step.
PRESETS = {
    "default": {},
    "small": {
        "data.synthetic.text_len": 32, "data.synthetic.max_words": 20,
        "data.synthetic.audio_len": 64, "data.synthetic.vision_len": 96,
        "model.d_model": 32, "train.batch_size": 16, "train.steps": 200,
        "train.warmup_steps": 20, "train.eval_every": 50, "train.checkpoint_every": 200, "train.log_every": 50,
    },
}


def load_config(config_file="configs/synthetic.py", variant=None):
    """get_config([variant]) of a configs/*.py file, path relative to the repository root."""
    from alignmamba_jax import config as config_lib
    return config_lib.load_config(config_file if os.path.isabs(config_file) else os.path.join(REPO, config_file),
                                  variant)


def parse_value(text):
    """Command-line override value: JSON if it parses (numbers, bools, lists), Python's True / False / None, else
    the plain string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_overrides(items):
    """["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"}."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, found {item!r}")
        key, value = item.split("=", 1)
        out[key] = parse_value(value)
    return out


def apply_overrides(config, overrides):
    """Sets dotted keys (e.g. "model.use_local_alignment") on a ConfigDict; unknown keys raise ValueError."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise ValueError(f"override {dotted!r}: no config key {key!r}")
            node = node[key]
        if leaf not in node:
            raise ValueError(f"override {dotted!r}: no config key {leaf!r}; expected one of {sorted(node.keys())}")
        with node.unlocked():
            node[leaf] = value
    return config


def make_config(config_file, variant, overrides, seed):
    config = load_config(config_file, variant)
    apply_overrides(config, overrides)
    config.seed = int(seed)
    return config


def _same_training(saved, wanted, defaults):
    """True when a saved config.json trains what `wanted` would. Eval settings may differ between reuses of
    one run; a key the saved run did not have yet (added to the defaults since) matches its default value."""
    if isinstance(wanted, dict):
        if not isinstance(saved, dict):
            return False
        for key, value in wanted.items():
            if key == "eval" and defaults is not None and "train" in defaults:
                continue
            sub_defaults = defaults.get(key) if isinstance(defaults, dict) else None
            if key not in saved:
                if not (isinstance(defaults, dict) and key in defaults and defaults[key] == value):
                    return False
            elif not _same_training(saved[key], value, sub_defaults):
                return False
        return True
    return saved == wanted


def run(config, workdir, log=print, reuse_only=False):
    """Trains and evaluates in workdir, or returns the saved results when the same config already finished.

    A finished run re-entered with different eval settings (e.g. missing_rates) resumes at its last step,
    restores its best checkpoint and only evaluates. reuse_only: return None instead of training.
    """
    from alignmamba_jax.train import train_and_evaluate
    results_path = os.path.join(workdir, "results.json")
    config_path = os.path.join(workdir, "config.json")
    want_missing = bool(config.eval.missing_rates)
    if os.path.exists(results_path) and os.path.exists(config_path):
        from alignmamba_jax.train import default_config
        with open(config_path) as f:
            same = _same_training(json.load(f), json.loads(config.to_json_best_effort()),
                                  json.loads(default_config().to_json_best_effort()))
        with open(results_path) as f:
            results = json.load(f)
        if same and (not want_missing or "missing" in results):
            log(f"  reuse {workdir}")
            return results
    if reuse_only:
        log(f"  no finished run in {workdir}: left out")
        return None
    t0 = time.time()
    results = train_and_evaluate(config, workdir)
    log(f"  ran {workdir} in {time.time() - t0:.0f} s")
    return results


def am2_regulariser_inputs(config):
    """The AlignMamba-2 demo's regulariser inputs as at initialisation: one training batch (config.train.batch_size
    examples, masks included) of each modality's synthetic features through a random linear projection to
    config.model.d_model. Returns ({source: (source tokens, anchor tokens, source mask, anchor mask)} for every
    modality but the anchor, {modality: token shape}), jax arrays."""
    import jax.numpy as jnp
    from alignmamba_jax import data as data_lib
    splits = data_lib.load_splits(config.data)
    n, rng = config.train.batch_size, np.random.default_rng(0)
    tokens, masks = {}, {}
    for m in config.data.modalities:
        x = np.asarray(splits["train"][m][:n], np.float32)
        w = rng.normal(size=(x.shape[-1], config.model.d_model)).astype(np.float32) / np.sqrt(x.shape[-1])
        tokens[m], masks[m] = jnp.asarray(x @ w), jnp.asarray(splits["train"][m + "_mask"][:n])
    anchor = config.data.anchor
    sources = {m: (tokens[m], tokens[anchor], masks[m], masks[anchor]) for m in tokens if m != anchor}
    return sources, {m: list(t.shape) for m, t in tokens.items()}


def grad_rel_diff(grads, ref_grads):
    """Largest |grad - reference grad| over all the arrays, over the largest |reference grad|."""
    scale = max(float(np.max(np.abs(r))) for r in ref_grads)
    return max(float(np.max(np.abs(np.asarray(g) - np.asarray(r)))) for g, r in zip(grads, ref_grads)) / scale


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaN-free inputs expected."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(mean, std, digits=3):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(tmp, path)


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def add_common_args(parser, default_root):
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="size preset applied before --steps/--set (see PRESETS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run, e.g. data.synthetic.n_train=256")
    parser.add_argument("--workdir_root", default=default_root,
                        help="one workdir per run below this (finished runs with the same config are reused)")
    parser.add_argument("--reuse_only", action="store_true",
                        help="train nothing: tabulate the finished runs (rows report how many seeds they have)")


def common_overrides(args):
    overrides = dict(PRESETS[args.preset])
    overrides.update(parse_overrides(args.set))
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    return overrides
