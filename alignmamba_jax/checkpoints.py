"""A run's checkpoints, and the guards that keep two different runs from mixing in one workdir.

Every checkpoint (WORKDIR/checkpoints/<step> and WORKDIR/best/<step>, orbax, each written to a temporary
directory and renamed into place when complete) holds the train state and a JSON `meta` item that includes the
run fingerprint: the resolved config minus RESUMABLE_KEYS, flattened to {"model.d_model": 64, ...}. The
fingerprint lives inside the checkpoint, so it is exactly as crash-safe as the checkpoint: a run killed before
its first checkpoint is complete leaves nothing to compare with, and the next run starts afresh.

Before a run reads its data, `check_fingerprint` compares its fingerprint with the one in the workdir's newest
checkpoints and stops with a `UserError` naming the workdir, the differing keys (old and new values) and the
two ways on: a new --workdir, or `train.allow_config_change=True` (resume anyway; the differences are
logged). Before any restore, `check_shapes` compares the shapes stored in the checkpoint with the run's state
and says in one paragraph what does not fit, instead of orbax's tracebacks.

A checkpoint that does not restore (truncated arrays, a broken `meta`, a state whose outputs are not finite) is
skipped: `restore_newest` goes back to the newest one that does, and `move_aside` puts the skipped ones in
WORKDIR/corrupt/, where they no longer block saving that step again but stay for inspection. A restore that
fails leaves tensorstore reads in flight; when they finish, their callbacks find orbax's event loop closed and
Python would print one traceback each, so `restore_newest` installs `quiet_closed_loop_callbacks`.
"""
import json
import os
import sys

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from etils import epath

from alignmamba_jax.errors import UserError

# Keys a resumed run may change: how long it runs (the learning-rate schedule is stretched from the resumed step),
# how often it logs, evaluates and saves, where its data lives, the mesh layout (restores reshard) and the scan
# backend (all compute the same scan: a run moves between CPU, GPU and TPU), and the evaluation-only settings
# (batch size, the test-time missing-modality sweep). Every other key defines the run.
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.fsdp", "train.fsdp_min_size", "train.allow_config_change", "model.scan_backend",
    "data.path", "data.cache_dir",
    "eval.batch_size", "eval.missing_rates", "eval.missing_protocols", "eval.missing_metrics", "eval.missing_seed",
})
SUBDIRS = ("checkpoints", "best")
_ABSENT = "(absent)"


def run_fingerprint(config) -> dict:
    """{dotted key: JSON value} of every config key that defines the run (not in RESUMABLE_KEYS)."""
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in RESUMABLE_KEYS:
                flat[name] = value

    walk(json.loads(config.to_json_best_effort()), "")
    return flat


def fingerprint_changes(stored: dict, current: dict, defaults: dict) -> dict:
    """{key: (stored value, current value)} where they differ. A key the stored fingerprint lacks (written
    before the key existed) counts as its default, so adding a config key does not lock old workdirs."""
    changes = {}
    for key in sorted(set(stored) | set(current)):
        old = stored.get(key, defaults.get(key, _ABSENT))
        new = current.get(key, defaults.get(key, _ABSENT))
        if old != new:
            changes[key] = (old, new)
    return changes


def open_manager(directory, max_to_keep: int = 1) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))   # saves a kill cut short


def save(manager, step, state, meta):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager, step, abstract_state):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def restore_meta(manager, step) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def readable_meta(manager):
    """(step, meta) of the newest checkpoint whose meta reads, or (None, None); unreadable ones are left to
    `restore_newest` to report."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore_meta(manager, step)
        except Exception:  # noqa: BLE001 - any failure to read means: not this checkpoint
            continue
    return None, None


def _reason(error) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def _is_closed_loop_callback(unraisable) -> bool:
    error = unraisable.exc_value
    return unraisable.object is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def quiet_closed_loop_callbacks():
    """Drops the unraisable "Event loop is closed" errors of reads that outlive a failed restore (harmless: the
    restore has already failed and been reported); every other unraisable error goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def restore_newest(manager, abstract_state, workdir, problem, changes=None):
    """Restores the newest checkpoint that restores and for which `problem(state)` is None.

    Returns ((state, meta, step) or None, [(skipped step, reason), ...] newest first). A checkpoint of another
    model is not skipped: `check_shapes` raises its UserError.
    """
    skipped = []
    quiet_closed_loop_callbacks()  # before any attempt: the callbacks may run before a failed restore has raised
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            check_shapes(manager, step, abstract_state, workdir, changes)
            state, meta = restore(manager, step, abstract_state)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - truncated arrays and broken JSON fail in many ways
            skipped.append((step, _reason(error)))
            continue
        reason = problem(state)
        if reason is None:
            return (state, meta, step), skipped
        skipped.append((step, reason))
    return None, skipped


def move_aside(manager, step, workdir, is_chief) -> str:
    """Moves checkpoint `step` to WORKDIR/corrupt/<kind>-<step> (process 0 moves, every process waits)."""
    target = epath.Path(workdir) / "corrupt" / f"{manager.directory.name}-{step}"
    if is_chief:
        target.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{manager.directory.name}-{step}.{n}")
        (epath.Path(manager.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"moved aside {manager.directory.name}/{step}")
    manager.reload()
    return os.fspath(target)


def _format(value):
    return value if value == _ABSENT else json.dumps(value)


def check_fingerprint(workdir: str, fingerprint: dict, defaults: dict, allow_change: bool) -> dict:
    """Compares `fingerprint` with the newest checkpoint of each kind in `workdir` (nothing is created there).

    Returns {key: (old, new)} of the differences that `allow_change` let through; raises a UserError otherwise.
    """
    changes, where = {}, []
    for sub in SUBDIRS:
        directory = epath.Path(workdir) / sub
        if not directory.exists():
            continue
        step, meta = readable_meta(open_manager(directory))
        if step is None:
            continue
        stored = meta.get("fingerprint")
        if stored is None:
            logging.warning("%s/%d was written before run fingerprints: its config cannot be compared with this "
                            "run's", directory, step)
            continue
        found = fingerprint_changes(stored, fingerprint, defaults)
        if found:
            changes.update(found)
            where.append(f"{sub}/{step}")
    if not changes:
        return {}
    lines = "\n".join(f"  {key}: {_format(old)} -> {_format(new)}" for key, (old, new) in changes.items())
    if allow_change:
        logging.warning("workdir %s: resuming %s under a changed config (train.allow_config_change=True); "
                        "checkpoint -> this run:\n%s", workdir, ", ".join(where), lines)
        return changes
    raise UserError(
        f"workdir {workdir} holds checkpoints ({', '.join(where)}) of a run with a different config; resuming "
        f"would mix the two runs. Differing keys (checkpoint -> this run):\n{lines}\n"
        f"To proceed: give this run a new --workdir, or resume this one anyway with "
        f"--config.train.allow_config_change=True.")


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict:
    return {_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(manager, step, abstract_state, workdir, changes=None) -> None:
    """Raises a UserError in one paragraph unless checkpoint `step` stores exactly the arrays of
    `abstract_state` with the same shapes. `changes`: the config differences already known (named in it)."""
    metadata = manager.item_metadata(step)
    stored = _shapes(metadata["state"]) if metadata is not None and metadata.get("state") is not None else None
    if not stored:  # an orbax without per-array metadata: the restore itself is the check
        return
    expected = _shapes(abstract_state)
    differ = [k for k in expected if k in stored and stored[k] != expected[k]]
    only_stored = sorted(set(stored) - set(expected))
    only_run = sorted(set(expected) - set(stored))
    if not (differ or only_stored or only_run):
        return
    problems = []
    if differ:
        problems.append(f"{len(differ)} of {len(expected)} arrays differ in shape, e.g. "
                        + "; ".join(f"{k} stored {stored[k]}, this run {expected[k]}" for k in differ[:3]))
    if only_stored:
        problems.append(f"{len(only_stored)} arrays only in the checkpoint, e.g. {', '.join(only_stored[:3])}")
    if only_run:
        problems.append(f"{len(only_run)} arrays only in this run, e.g. {', '.join(only_run[:3])}")
    cause = ("; the config changed: " + ", ".join(f"{k}: {_format(o)} -> {_format(n)}" for k, (o, n) in
                                                   changes.items()) if changes else "")
    raise UserError(f"workdir {workdir}: checkpoint {manager.directory.name}/{step} does not fit this run's model "
                    f"({'; '.join(problems)}){cause}. A checkpoint resumes only the model it was trained with: "
                    f"give this run a new --workdir.")
