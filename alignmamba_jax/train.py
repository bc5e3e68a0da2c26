"""The training loop: optimiser, sharded jit steps, checkpoints and evaluation.

One mesh with axes ("data", "fsdp") is declared in `create_mesh`; the batch is split over both axes and
parameters (and optimiser moments) larger than `train.fsdp_min_size` are split over "fsdp". With fsdp=1 this
is plain data parallelism. The same code runs on one CPU, forced CPU devices, a GPU, or a multi-host pod
(`jax.distributed` is initialised by `main.py`).

Determinism: the data order and the dropout keys are functions of (seed, step), so a run resumed from any
checkpoint ends bit-identical to an uninterrupted one on the same machine.

Resuming: a workdir with checkpoints is resumed only by a run with the same config up to `checkpoints.
RESUMABLE_KEYS` (train.steps, cadences, data paths, ...); see `alignmamba_jax.checkpoints`. Everything the user
can get wrong (config, data, workdir) is checked before compilation and raised as a `UserError`.
"""
import contextlib
import functools
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state as train_state_lib
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from alignmamba_jax import checkpoints
# apply_model_variant, default_config, sibling_config and MODEL_VARIANTS stay reachable as train.* for config
# files written before alignmamba_jax.config held them.
from alignmamba_jax.config import (MODEL_VARIANTS, apply_model_variant, check_config, default_config,  # noqa: F401
                                   resolve_selection, sibling_config, validate_config)
from alignmamba_jax import data as data_lib
from alignmamba_jax import input_pipeline, metrics as metrics_lib, models, preemption, reporting
from alignmamba_jax import workdir as workdir_lib
from alignmamba_jax.errors import UserError

NO_DECAY_LEAVES = ("A_log", "D", "bias", "scale")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the model's output) became NaN or Inf; the last good checkpoint is kept."""


def multihost_requested(coordinator_address, num_processes, process_id) -> bool:
    """True when any multi-host flag is given or a multi-process SLURM / Open MPI / TPU-pod job is detected."""
    if any(v is not None for v in (coordinator_address, num_processes, process_id)):
        return True
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def create_mesh(fsdp: int, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp) mesh over `devices` (default: all of this run's devices; `aot.py` passes compile-only
    devices of a target it does not have)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise UserError(f"train.fsdp={fsdp} must divide the number of devices ({n})")
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def under_mesh(fn, mesh):
    """`fn` traced with `mesh` as the abstract mesh: the scan kernels then run on each device's batch shard
    (`alignmamba_jax.kernels.sharding`) instead of being gathered or refused by XLA's partitioner."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def fsdp_spec(shape, fsdp: int, min_size: int) -> P:
    """Shards the largest divisible axis over "fsdp"; small or indivisible arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def weight_decay_mask(params):
    """True where AdamW decays: not on A_log, D, biases (dt_proj/bias included) or norm scales."""
    def decays(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(decays, params)


def create_learning_rate_schedule(train_config) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
        end_value=train_config.learning_rate * train_config.end_learning_rate_factor)


def create_optimizer(train_config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip_norm),
        optax.adamw(create_learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                    weight_decay=train_config.weight_decay, mask=weight_decay_mask))


def data_shapes(config, splits) -> dict:
    """{modality: (length, width)} of the training split."""
    return {m: tuple(splits["train"][m].shape[1:]) for m in config.data.modalities}


def create_model(config, shapes):
    """The configured model for inputs of `shapes` ({modality: (length, width)}; `aot.py` passes them without
    data)."""
    modalities = tuple(config.data.modalities)
    return models.create_model(config.model, modalities=modalities, anchor=config.data.anchor,
                               input_dims={m: int(shapes[m][1]) for m in modalities}, task=config.data.task,
                               num_classes=config.data.num_classes)


def create_model_for_data(config, splits):
    return create_model(config, data_shapes(config, splits))


def shaped_example_inputs(config, shapes):
    """(features, masks) of two all-valid examples of `shapes`: what initialising the parameters traces."""
    features = {m: jnp.zeros((2,) + tuple(shapes[m]), jnp.float32) for m in config.data.modalities}
    masks = {m: jnp.ones((2, shapes[m][0]), bool) for m in config.data.modalities}
    return features, masks


def example_inputs(config, splits):
    return shaped_example_inputs(config, data_shapes(config, splits))


def abstract_train_state(config, model, features, masks, mesh):
    """(init, abstract state with shardings, shardings): what `create_train_state` makes, without allocating."""
    tx = create_optimizer(config.train)

    def init(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, features, masks, train=False)
        return train_state_lib.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    init = under_mesh(init, mesh)
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, config.train.fsdp, config.train.fsdp_min_size)),
        abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return init, abstract, shardings


def create_train_state(config, model, features, masks, mesh):
    """Initialises parameters and optimiser state directly into their shardings; returns (state, shardings)."""
    init, _, shardings = abstract_train_state(config, model, features, masks, mesh)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed)), shardings


def jit_train_step(config, mesh, state_shardings):
    """`train_step` jitted for the mesh: batch rows sharded over all devices, the state donated."""
    return jax.jit(under_mesh(functools.partial(train_step, config=config), mesh),
                   in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def jit_eval_step(mesh, apply_fn, modalities):
    """`eval_step` jitted for the mesh; predictions come back replicated."""
    return jax.jit(under_mesh(functools.partial(eval_step, apply_fn=apply_fn, modalities=tuple(modalities)), mesh),
                   out_shardings=NamedSharding(mesh, P()))


def split_inputs(batch, modalities):
    return {m: batch[m] for m in modalities}, {m: batch[m + "_mask"] for m in modalities}


def task_loss(prediction, labels, weights, task):
    """Weighted mean L1 (regression, as MMSA trains sentiment) or cross-entropy (classification)."""
    if task == "regression":
        per_example = jnp.abs(prediction.astype(jnp.float32) - labels)
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(prediction.astype(jnp.float32), labels)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_step(state, batch, *, config):
    """One AdamW step; dropout keys are folded from (seed, step)."""
    modalities = tuple(config.data.modalities)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)
    features, masks = split_inputs(batch, modalities)

    def loss_fn(params):
        out = state.apply_fn({"params": params}, features, masks, train=True, rngs={"dropout": dropout_rng})
        task = task_loss(out["prediction"], batch["labels"], batch["weights"], config.data.task)
        align = jnp.asarray(out["align_loss"], jnp.float32)
        loss = task + config.model.align_weight * align
        aux = {"task_loss": task, "align_loss": align,
               **{f"aux_{k}": jnp.asarray(v, jnp.float32) for k, v in out.get("aux", {}).items()}}
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    step_metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
                    "learning_rate": create_learning_rate_schedule(config.train)(state.step), **aux}
    return new_state, step_metrics


def eval_step(params, batch, *, apply_fn, modalities):
    features, masks = split_inputs(batch, modalities)
    return apply_fn({"params": params}, features, masks, train=False)["prediction"]


def split_metrics(data_config, predictions, labels) -> dict:
    if data_config.task == "regression":
        return metrics_lib.regression_metrics(predictions, labels)
    return metrics_lib.classification_metrics(predictions, labels, num_classes=data_config.num_classes)


class Evaluator:
    """Predictions over a whole split (optionally with missing modalities) and their MMSA metrics."""

    def __init__(self, config, mesh, apply_fn):
        self.config = config
        self.modalities = tuple(config.data.modalities)
        self.sharding = batch_sharding(mesh)
        self.global_batch = config.eval.batch_size
        self.rows = input_pipeline.process_rows(self.sharding, self.global_batch)
        self._step = jit_eval_step(mesh, apply_fn, self.modalities)

    def predict(self, params, split, protocol=None, rate=0.0):
        predictions = []
        for i, batch in enumerate(input_pipeline.local_eval_batches(
                split, self.modalities, self.global_batch, self.rows)):
            if protocol is not None:
                # consecutive per batch (imder's low-discrepancy schedule), distinct per process
                seed = (self.config.eval.missing_seed * 1_000_003 + i * jax.process_count()
                        + jax.process_index())
                batch = {**batch, **protocol(batch, rate, seed, self.modalities, self.config.data.anchor)}
            global_batch = input_pipeline.to_global(batch, self.sharding, self.global_batch)
            predictions.append(np.asarray(self._step(params, global_batch)))
        n = input_pipeline.split_size(split)
        return np.concatenate(predictions)[:n]

    def outputs_finite(self, params, split) -> bool:
        """Whether the model's outputs on the first batch of `split` are finite: the check that a checkpoint
        is good. A diverged run's parameters can be finite (1e29) and still give NaN at the next step."""
        batch = next(input_pipeline.local_eval_batches(split, self.modalities, self.global_batch, self.rows))
        global_batch = input_pipeline.to_global(batch, self.sharding, self.global_batch)
        n = min(input_pipeline.split_size(split), self.global_batch)
        return bool(np.all(np.isfinite(np.asarray(self._step(params, global_batch))[:n])))

    def evaluate(self, params, split, protocol=None, rate=0.0) -> dict:
        predictions = self.predict(params, split, protocol, rate)
        return split_metrics(self.config.data, predictions, np.asarray(split["labels"]))


def validate_run(config, splits) -> None:
    """Errors that would otherwise surface only after compilation or mid-run."""
    n = jax.device_count()
    for key, value in (("train.batch_size", config.train.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if value % n:
            raise UserError(f"{key}={value} must be divisible by the number of devices ({n})")
    input_pipeline.steps_per_epoch(input_pipeline.split_size(splits["train"]), config.train.batch_size)
    if config.model.scan_backend == "cpu_ffi":
        from alignmamba_jax.kernels import cpu_ffi
        ok, reason = cpu_ffi.available()
        if not ok:
            raise UserError(f"model.scan_backend='cpu_ffi' is unavailable here: {reason}; use 'chunked', or 'auto' "
                            f"(which falls back to it)")
    if config.eval.missing_rates:
        unknown = set(config.eval.missing_protocols) - set(data_lib.missing.PROTOCOLS)
        if unknown:
            raise UserError(f"eval.missing_protocols has unknown {sorted(unknown)}; "
                            f"expected names from {sorted(data_lib.missing.PROTOCOLS)}")


def is_better(value, best, mode) -> bool:
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, selects the best checkpoint on validation, evaluates it on valid/test; returns results.json.

    The workdir is checked and locked before anything else (see `alignmamba_jax.workdir`); a full disk is
    reported as a UserError (every checkpoint written before it is intact).
    """
    check_config(config)
    config = resolve_selection(config)
    validate_config(config)
    workdir = workdir_lib.check_workdir(workdir)
    try:
        with workdir_lib.WorkdirLock(workdir) as lock:
            return _train_and_evaluate(config, workdir, lock)
    except Exception as error:
        if workdir_lib.disk_full_in(error):
            raise UserError(f"disk full while writing to workdir {workdir}; every checkpoint written before is "
                            f"intact: free some space and rerun the same command to resume") from None
        if isinstance(error, FileNotFoundError) and workdir_lib.is_local(workdir) and not os.path.isdir(workdir):
            raise workdir_lib.removed_error(workdir) from None   # removed between the last check and a write
        raise


def restore_or_skip(manager, abstract_state, workdir, problem, changes, is_chief):
    """(state, meta, step) of the newest checkpoint of `manager` that restores and has no `problem`, or None if
    there are none; newer ones are moved aside, one line each. A UserError if there are some and none restores."""
    found, skipped = checkpoints.restore_newest(manager, abstract_state, workdir, problem, changes)
    if skipped and found is None:
        raise UserError(f"workdir {workdir}: no checkpoint in {manager.directory} restores: "
                        + "; ".join(f"{manager.directory.name}/{step} ({why})" for step, why in skipped)
                        + ". Move them away to start afresh, or give this run another --workdir")
    for step, why in skipped:
        moved = checkpoints.move_aside(manager, step, workdir, is_chief)
        if is_chief:
            print(f"skipped checkpoint {manager.directory.name}/{step}: {why}; moved to {moved}")
    return found


def _train_and_evaluate(config, workdir, lock):
    is_chief = jax.process_index() == 0
    fingerprint = checkpoints.run_fingerprint(config)
    config_changes = checkpoints.check_fingerprint(workdir, fingerprint,
                                                   checkpoints.run_fingerprint(default_config()),
                                                   config.train.allow_config_change)
    splits = data_lib.load_splits(config.data)
    validate_run(config, splits)

    mesh = create_mesh(config.train.fsdp)
    data_sharding = batch_sharding(mesh)
    rows = input_pipeline.process_rows(data_sharding, config.train.batch_size)
    model = create_model_for_data(config, splits)
    features, masks = example_inputs(config, splits)
    state, state_shardings = create_train_state(config, model, features, masks, mesh)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
    logging.info("parameters: %d on mesh %s",
                 sum(x.size for x in jax.tree.leaves(state.params)), dict(mesh.shape))
    evaluator = Evaluator(config, mesh, model.apply)

    def problem(restored_state):
        return None if evaluator.outputs_finite(restored_state.params, splits["valid"]) else "outputs not finite"

    latest = checkpoints.open_manager(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    best = checkpoints.open_manager(os.path.join(workdir, "best"))
    found = restore_or_skip(latest, abstract_state, workdir, problem, config_changes, is_chief)
    if found is not None:
        state = found[0]
        if is_chief:
            print(f"resumed from {latest.directory}/{found[2]}")
    found_best = restore_or_skip(best, abstract_state, workdir, problem, config_changes, is_chief)
    best_value = None if found_best is None else found_best[1]["value"]
    start_step = int(state.step)
    writer = reporting.MetricWriter(workdir, active=is_chief)
    writer.truncate_after(start_step)
    tc = config.train
    if start_step > tc.steps and is_chief:
        print(f"workdir {workdir} is already at step {start_step}, past train.steps={tc.steps}: nothing to train; "
              f"evaluating its best checkpoint")

    step_fn = jit_train_step(config, mesh, state_shardings)
    pending = []   # (step, metrics on device) not yet fetched
    window = []    # fetched metrics of the steps since the last logged line: its means
    last_good = latest.latest_step()

    def stop_non_finite(what):
        raise NonFiniteLossError(
            f"{what}; stopping. Last good checkpoint: "
            f"{'none' if last_good is None else f'step {last_good}'} in {latest.directory}")

    def drain():
        """Fetches the metrics of the steps since the last drain into `window`; stops the run on a non-finite
        loss. Also stops if the workdir was removed: every drain precedes a write into it."""
        fetched = jax.device_get([m for _, m in pending])
        lock.check()
        for (s, _), m in zip(pending, fetched):
            if not np.isfinite(m["loss"]):
                stop_non_finite(f"loss is {float(m['loss'])} at step {s}")
        pending.clear()
        window.extend(fetched)

    def save_checked(manager, done, meta):
        """Saves only a state whose outputs are finite: the next run resumes from a finite state."""
        if not evaluator.outputs_finite(state.params, splits["valid"]):
            stop_non_finite(f"the parameters after step {done} give non-finite outputs (not saved)")
        checkpoints.save(manager, done, state, meta)

    window_start, window_steps = time.perf_counter(), 0
    with contextlib.ExitStack() as stack:  # the progress bar ends before any error line
        signals = stack.enter_context(preemption.StopSignals())
        progress = None
        if is_chief:
            from tqdm import tqdm
            progress = stack.enter_context(tqdm(total=tc.steps, initial=min(start_step, tc.steps), desc="train",
                                                unit="step", dynamic_ncols=True, mininterval=1.0))
        for step in range(start_step, tc.steps):
            local = input_pipeline.local_train_batch(splits["train"], config.data.modalities, config.seed, step,
                                                     tc.batch_size, rows)
            state, step_metrics = step_fn(state, input_pipeline.to_global(local, data_sharding, tc.batch_size))
            pending.append((step, step_metrics))
            window_steps += 1
            done = step + 1
            stopping = signals.stop_requested(done)
            if progress is not None:
                progress.update(1)
            if done % tc.log_every == 0 or done == tc.steps or stopping:
                drain()
                elapsed = time.perf_counter() - window_start
                scalars = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
                window.clear()
                scalars["train/samples_per_second"] = window_steps * tc.batch_size / elapsed
                writer.write(done, scalars)
                if progress is not None:
                    progress.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                                         samples_s=f"{scalars['train/samples_per_second']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % tc.eval_every == 0 or done == tc.steps:
                drain()
                valid = evaluator.evaluate(state.params, splits["valid"])
                writer.write(done, {f"valid/{k}": v for k, v in valid.items()})
                value = float(valid[config.eval.select_metric])
                if is_better(value, best_value, config.eval.select_mode) and (
                        best.latest_step() is None or best.latest_step() < done):
                    best_value = value
                    save_checked(best, done, {"value": value, "step": done, "valid": valid,
                                              "fingerprint": fingerprint})
            if done % tc.checkpoint_every == 0 or done == tc.steps or stopping:
                drain()
                save_checked(latest, done, {"step": done, "fingerprint": fingerprint})
                last_good = done
            if stopping:
                latest.wait_until_finished()
                best.wait_until_finished()
                writer.close()
                raise preemption.Preempted(signals.signum, f"{latest.directory}/{done}")
            if done % tc.eval_every == 0 or done % tc.checkpoint_every == 0:
                window_start = time.perf_counter()  # throughput counts training steps only
    latest.wait_until_finished()
    best.wait_until_finished()

    final_step = int(state.step)
    after_training = "after this evaluation pass: training is complete and saved (send it again to stop at once)"
    with preemption.StopSignals(stopping=after_training) as signals:
        def stop_if_signalled():
            if signals.signum is not None:
                writer.close()
                raise preemption.Preempted(signals.signum, f"{latest.directory}/{latest.latest_step()}",
                                           during="the final evaluation")

        if best.latest_step() is not None:
            state, _ = checkpoints.restore(best, best.latest_step(), abstract_state)
        results = {"best_step": int(state.step), "final_step": final_step}
        for name in ("valid", "test"):
            results[name] = evaluator.evaluate(state.params, splits[name])
            stop_if_signalled()
        if config.eval.missing_rates:
            results["missing"] = missing_sweep(config, evaluator, state.params, splits["test"])
            stop_if_signalled()
        lock.check()
        if is_chief:
            write_outputs(workdir, results, config)
    writer.close()
    return results


def missing_sweep(config, evaluator, params, split) -> dict:
    """Test metrics with modalities removed at each rate, per protocol, in the paper's Table 1 layout."""
    sweep = {}
    for name in config.eval.missing_protocols:
        protocol = data_lib.missing.PROTOCOLS[name]
        sweep[name] = {}
        for rate in config.eval.missing_rates:
            try:
                sweep[name][f"{rate:g}"] = evaluator.evaluate(params, split, protocol, float(rate))
            except ValueError as error:  # e.g. per_sample allows at most (M - 1) / M of the modalities missing
                if not str(error).startswith("rate:"):
                    raise
                logging.warning("missing-modality protocol %s skips rate %g: %s", name, rate, error)
    metrics = [m for m in config.eval.missing_metrics
               if all(m in r for rates in sweep.values() for r in rates.values())]
    return {"by_rate": sweep, **reporting.missing_table(sweep, metrics)}


def write_outputs(workdir: str, results: Mapping[str, Any], config) -> None:
    reporting.write_results(workdir, results)
    reporting.write_text(workdir, "config.json", config.to_json_best_effort(indent=2))
    if "missing" in results:
        reporting.write_text(workdir, "missing_modality.md", results["missing"]["markdown"] + "\n")
        reporting.write_text(workdir, "missing_modality.json",
                             json.dumps(results["missing"]["table"], indent=2, sort_keys=True))
    reporting.plot_curves(workdir)
    table = reporting.metrics_table(results)
    reporting.write_text(workdir, "results.md", f"best checkpoint: step {results['best_step']}\n\n{table}\n")
    print(f"\nResults (best validation checkpoint, step {results['best_step']}) in {workdir}\n{table}")
    if "missing" in results:
        print("\nMissing-modality robustness (test)\n" + results["missing"]["markdown"])
