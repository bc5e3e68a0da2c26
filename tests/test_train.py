"""Training loop: loss goes down, sharding does not change the result, resume is exact, bad runs stop early."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax import checkpoints, input_pipeline, models, train
from alignmamba_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tiny models: LLVM optimisation costs more compile time than it saves; every compared run uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"

TINY_CONFIG = """
from alignmamba_jax import train


def get_config(variant="full"):
    config = train.default_config()
    config.data.synthetic.update(n_train=64, n_valid=16, n_test=16, text_len=12, text_dim=16, audio_len=20,
                                 vision_len=24, min_words=3, max_words=8)
    config.model.update(d_model=16, n_layers=1, d_state=4, dropout=0.1)
    config.train.update(batch_size=8, steps=40, warmup_steps=5, learning_rate=3e-3, log_every=5,
                        eval_every=10, checkpoint_every=10)
    config.eval.batch_size = 8
    return train.apply_model_variant(config, variant)
"""


def tiny_config(variant="full"):
    namespace = {}
    exec(TINY_CONFIG, namespace)
    return namespace["get_config"](variant)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return str(path)


# main.py run with orbax's JSON item writer replaced at its FAULT_AT_SAVE-th call by SIGKILL (the process dies in
# the middle of a checkpoint save: the state item may be written, the checkpoint is not finalized) or, with
# FAULT=enospc, by the OSError of a full disk
FAULTY_SAVE = """
import errno, os, runpy, signal
import orbax.checkpoint as ocp
calls, fault_at = [0], int(os.environ["FAULT_AT_SAVE"])
def counting(original):
    def save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fault_at:
            if os.environ.get("FAULT") == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return save
ocp.JsonCheckpointHandler.async_save = counting(ocp.JsonCheckpointHandler.async_save)
ocp.JsonCheckpointHandler.save = counting(ocp.JsonCheckpointHandler.save)
runpy.run_module("alignmamba_jax.main", run_name="__main__", alter_sys=True)
"""


def run_main(config_file, workdir, *overrides, devices=1, wait=True, kill_at_save=None, disk_full_at_save=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}")
    entry = ["-m", "alignmamba_jax.main"]
    if kill_at_save is not None or disk_full_at_save is not None:
        env["FAULT_AT_SAVE"] = str(kill_at_save or disk_full_at_save)
        env["FAULT"] = "sigkill" if kill_at_save is not None else "enospc"
        entry = ["-c", FAULTY_SAVE]
    command = [sys.executable, *entry, f"--config={config_file}", f"--workdir={workdir}", *overrides]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def read_jsonl(workdir, drop=()):
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_jsonl(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference_run(config_file, tmp_path_factory):
    """One uninterrupted single-device run that other tests compare against."""
    workdir = tmp_path_factory.mktemp("reference")
    rc, output = run_main(config_file, workdir)
    assert rc == 0, output
    return workdir


def test_a_few_jit_steps_decrease_the_loss():
    config = tiny_config()
    config.model.dropout = 0.0
    config.train.update(learning_rate=1e-2, warmup_steps=1, steps=25)
    splits = train.data_lib.load_splits(config.data)
    mesh = train.create_mesh(1)
    model = train.create_model_for_data(config, splits)
    features, masks = train.example_inputs(config, splits)
    state, shardings = train.create_train_state(config, model, features, masks, mesh)
    rows = input_pipeline.process_rows(train.batch_sharding(mesh), 8)
    batch = input_pipeline.to_global(
        input_pipeline.local_train_batch(splits["train"], config.data.modalities, 0, 0, 8, rows),
        train.batch_sharding(mesh), 8)
    step = jax.jit(lambda s, b: train.train_step(s, b, config=config))
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[5:10]) < np.mean(losses[:5]), losses


def test_weight_decay_mask_follows_the_mamba_convention():
    config = tiny_config()
    model = models.create_model(config.model, ("text", "audio", "vision"), "text",
                                {"text": 16, "audio": 5, "vision": 20})
    features = {m: jnp.zeros((2, 6, d)) for m, d in (("text", 16), ("audio", 5), ("vision", 20))}
    masks = {m: jnp.ones((2, 6), bool) for m in features}
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), features, masks))["params"]
    decays = {"/".join(str(getattr(k, "key", k)) for k in path): flag for path, flag in
              jax.tree_util.tree_flatten_with_path(train.weight_decay_mask(params))[0]}
    names = {path.split("/")[-1] for path in decays}
    assert {"A_log", "D", "kernel"} <= names
    for path, flag in decays.items():
        leaf = path.split("/")[-1]
        expected = leaf not in ("A_log", "D", "bias", "scale")
        assert flag == expected, path
    assert any(p.endswith("dt_proj/bias") and not f for p, f in decays.items())


def test_data_order_is_a_function_of_seed_and_step():
    n, batch = 50, 8
    per_epoch = n // batch
    epoch0 = np.concatenate([input_pipeline.train_indices(3, s, n, batch) for s in range(per_epoch)])
    assert len(set(epoch0.tolist())) == per_epoch * batch
    assert np.array_equal(input_pipeline.train_indices(3, per_epoch + 2, n, batch),
                          np.random.default_rng([3, 1]).permutation(n)[2 * batch:3 * batch])
    assert not np.array_equal(input_pipeline.train_indices(3, 0, n, batch),
                              input_pipeline.train_indices(4, 0, n, batch))


def test_one_device_and_four_devices_train_the_same_model(config_file, reference_run, tmp_path):
    rc, output = run_main(config_file, tmp_path, "--config.train.fsdp=2", "--config.train.fsdp_min_size=1",
                          devices=4)
    assert rc == 0, output
    one, four = train_losses(reference_run), train_losses(tmp_path)
    assert one.keys() == four.keys()
    np.testing.assert_allclose([four[s] for s in one], [one[s] for s in one], rtol=2e-4)
    test_one = json.loads((reference_run / "results.json").read_text())["test"]
    test_four = json.loads((tmp_path / "results.json").read_text())["test"]
    assert test_four["MAE"] == pytest.approx(test_one["MAE"], rel=1e-3)


def finished_steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def kill_during_save(config_file, workdir, kill_at_save):
    """Runs main.py until its `kill_at_save`-th checkpoint item write, where it is SIGKILLed mid-save; returns
    the completed steps of checkpoints/."""
    rc, output = run_main(config_file, workdir, kill_at_save=kill_at_save)
    assert rc == -signal.SIGKILL, f"run ended before it could be killed:\n{output}"
    half_written = [p for d in (workdir / "best", workdir / "checkpoints") if d.exists() for p in d.iterdir()
                    if ".orbax-checkpoint-tmp" in p.name]
    assert len(half_written) == 1, half_written
    assert not (workdir / "results.json").exists()
    return finished_steps(workdir / "checkpoints")


def assert_resumes_like_the_reference(config_file, reference_run, workdir):
    rc, output = run_main(config_file, workdir)
    assert rc == 0, output
    assert "resumed from" in output
    assert json.loads((workdir / "results.json").read_text()) == json.loads(
        (reference_run / "results.json").read_text())
    timing = ("train/samples_per_second",)
    assert read_jsonl(workdir, drop=timing) == read_jsonl(reference_run, drop=timing)
    assert not [p for p in workdir.rglob("*") if ".orbax-checkpoint-tmp" in p.name]   # the killed save's


def test_sigkill_in_the_first_save_and_after_a_checkpoint_then_resume_ends_like_an_uninterrupted_run(
        config_file, reference_run, tmp_path):
    # Killed in the very first save (best/10): the run fingerprint lives in the checkpoints, so the half-written
    # one must leave a workdir that simply starts afresh, not one that refuses to resume.
    assert kill_during_save(config_file, tmp_path, kill_at_save=1) == []
    assert finished_steps(tmp_path / "best") == []
    process = run_main(config_file, tmp_path, wait=False)
    first_checkpoint = tmp_path / "checkpoints" / "10"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"run ended before it could be killed:\n{output}"
    assert "resumed from" not in output
    assert not (tmp_path / "results.json").exists()
    assert_resumes_like_the_reference(config_file, reference_run, tmp_path)


@pytest.mark.slow
def test_sigkill_in_a_later_save_then_resume_ends_like_an_uninterrupted_run(config_file, reference_run, tmp_path):
    assert kill_during_save(config_file, tmp_path, kill_at_save=4)   # the 4th save comes after checkpoints/10
    assert_resumes_like_the_reference(config_file, reference_run, tmp_path)


def copy_of(workdir, tmp_path):
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy)
    return copy


def snapshot(workdir):
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_resuming_a_workdir_with_another_config_stops_before_any_step_naming_the_changes(config_file,
                                                                                         reference_run, tmp_path):
    # the sequence: the full model trained in a workdir, then w/o global alignment into the same workdir
    workdir = copy_of(reference_run, tmp_path)
    before = snapshot(workdir)
    rc, output = run_main(f"{config_file}:wo_global", workdir, "--config.train.steps=42")
    assert rc == 1, output
    assert f"error: workdir {workdir} holds checkpoints (checkpoints/40, best/" in output, output
    assert "model.use_global_alignment: true -> false" in output, output
    assert "train.steps" not in output  # a resumable key
    assert "new --workdir" in output and "--config.train.allow_config_change=True" in output, output
    assert "Traceback" not in output
    assert snapshot(workdir) == before


def test_a_model_of_another_shape_says_so_in_one_paragraph_even_when_config_changes_are_allowed(
        config_file, reference_run, tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    before = snapshot(workdir)
    rc, output = run_main(config_file, workdir, "--config.model.d_model=8", "--config.train.allow_config_change=True")
    assert rc == 1, output
    assert "Traceback" not in output and "asyncio" not in output and len(output.splitlines()) < 6, output
    assert (f"error: workdir {workdir}: checkpoint checkpoints/40 does not fit this run's model (" in output
            and "stored (16,), this run (8,)" in output and "the config changed: model.d_model: 16 -> 8" in output
            and "new --workdir" in output), output
    assert snapshot(workdir) == before


def test_allow_config_change_returns_the_changes_instead_of_stopping(reference_run, tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    current = checkpoints.run_fingerprint(train.resolve_selection(tiny_config("wo_global")))
    defaults = checkpoints.run_fingerprint(train.default_config())
    assert checkpoints.check_fingerprint(str(workdir), current, defaults, allow_change=True) == {
        "model.use_global_alignment": (True, False)}
    with pytest.raises(UserError, match=r"model.use_global_alignment: true -> false"):
        checkpoints.check_fingerprint(str(workdir), current, defaults, allow_change=False)
    assert checkpoints.check_fingerprint(str(workdir), checkpoints.run_fingerprint(
        train.resolve_selection(tiny_config())), defaults, allow_change=False) == {}


@pytest.mark.slow
def test_allow_config_change_resumes_a_workdir_of_another_config(config_file, reference_run, tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    rc, output = run_main(f"{config_file}:wo_global", workdir, "--config.train.allow_config_change=True")
    assert rc == 0, output
    assert "under a changed config" in output and "model.use_global_alignment: true -> false" in output, output
    assert "resumed from" in output


def test_run_fingerprint_leaves_out_exactly_the_keys_a_resumed_run_may_change():
    config = tiny_config()
    base = checkpoints.run_fingerprint(config)
    assert "model.d_model" in base and "train.learning_rate" in base and "seed" in base
    for key, value in [("train.steps", 7), ("train.log_every", 3), ("train.eval_every", 3),
                       ("train.checkpoint_every", 3), ("train.keep_checkpoints", 5), ("train.fsdp", 2),
                       ("train.allow_config_change", True), ("model.scan_backend", "associative"),
                       ("data.path", "/elsewhere"), ("data.cache_dir", "/c"),
                       ("eval.batch_size", 16), ("eval.missing_rates", (0.1,)), ("eval.missing_seed", 3)]:
        changed = tiny_config()
        changed.update_from_flattened_dict({key: value})
        assert checkpoints.run_fingerprint(changed) == base, key
    for key, value in [("model.d_model", 8), ("train.learning_rate", 0.1), ("seed", 1), ("train.batch_size", 4),
                       ("data.synthetic.n_train", 32), ("eval.select_metric", "Corr")]:
        changed = tiny_config()
        changed.update_from_flattened_dict({key: value})
        assert checkpoints.fingerprint_changes(base, checkpoints.run_fingerprint(changed), {}) == {
            key: (base[key], value)}, key
    # a key added to the code after a checkpoint was written counts as its default there
    defaults = checkpoints.run_fingerprint(train.default_config())
    older = {k: v for k, v in base.items() if k != "model.d_state"}
    assert checkpoints.fingerprint_changes(older, base, {"model.d_state": base["model.d_state"]}) == {}
    assert checkpoints.fingerprint_changes(older, base, {"model.d_state": -1}) == {
        "model.d_state": (-1, base["model.d_state"])}
    assert set(defaults) == set(base)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config()
    config.train.update(log_every=1, checkpoint_every=2, eval_every=100)
    clean = train.data_lib.load_splits(config.data)
    poisoned_step = 5
    row = input_pipeline.train_indices(config.seed, poisoned_step, 64, 8)[0]
    for step in range(poisoned_step):
        assert row not in input_pipeline.train_indices(config.seed, step, 64, 8)
    splits = {name: dict(split) for name, split in clean.items()}
    splits["train"]["text"] = splits["train"]["text"].copy()
    splits["train"]["text"][row, 0, 0] = np.nan
    monkeypatch.setattr(train.data_lib, "load_splits", lambda data_config: splits)

    with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step 5.*Last good checkpoint: step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert not (tmp_path / "results.json").exists()


def test_selection_defaults_follow_the_task_and_bad_values_are_refused():
    config = tiny_config()
    resolved = train.resolve_selection(config)
    assert (resolved.eval.select_metric, resolved.eval.select_mode) == ("MAE", "min")
    assert config.eval.select_metric == ""  # the caller's config is left as given
    config.eval.select_metric = "Corr"
    assert train.resolve_selection(config).eval.select_mode == "max"
    config.data.update(task="classification", num_classes=3)
    config.eval.select_metric = ""
    resolved = train.resolve_selection(config)
    assert (resolved.eval.select_metric, resolved.eval.select_mode) == ("accuracy", "max")
    config.eval.select_metric = "MAE"
    with pytest.raises(UserError, match=r"eval.select_metric='MAE' is not a metric of data.task='classification'"):
        train.resolve_selection(config)
    # the regression default resolves to what older checkpoints stored, so their workdirs still resume
    regression = tiny_config()
    stored = dict(checkpoints.run_fingerprint(regression), **{"eval.select_metric": "MAE", "eval.select_mode": "min"})
    assert checkpoints.run_fingerprint(train.resolve_selection(regression)) == stored


@pytest.mark.parametrize("key,value,expected", [
    ("train.steps", -1, "train.steps=-1: expected an integer of at least 0"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0: expected an integer of at least 1"),
    ("train.batch_size", 0, "train.batch_size=0: expected an integer of at least 1"),
    ("eval.batch_size", -8, "eval.batch_size=-8: expected an integer of at least 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0: expected an integer of at least 1"),
    ("eval.missing_rates", (0.1, 1.5), r"eval.missing_rates=\(0.1, 1.5\): rates must lie in \[0, 1\], found \[1.5\]"),
])
def test_config_values_that_cannot_define_a_run_are_refused_before_the_workdir_is_made(key, value, expected,
                                                                                      tmp_path):
    config = tiny_config()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(UserError, match=expected):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_rejected():
    config = tiny_config()
    config.train.stepz = 3
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'"):
        train.check_config(config)


def test_missing_data_file_is_rejected_before_training(tmp_path):
    config = tiny_config()
    config.data.update(name="mmsa", path=str(tmp_path / "MOSI" / "unaligned_50.pkl"))
    with pytest.raises(ValueError, match=r"data.path=.*unaligned_50.pkl.* does not exist"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_global_batch_not_divisible_by_devices_is_rejected_before_training(config_file, tmp_path):
    rc, output = run_main(config_file, tmp_path, "--config.train.batch_size=6", devices=4)
    assert rc != 0
    assert "error: train.batch_size=6 must be divisible by the number of devices (4)" in output
    assert "Traceback" not in output
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(config_file, tmp_path):
    rc, output = run_main(config_file, tmp_path / "single", devices=2)
    assert rc == 0, output
    env = dict(os.environ, JAX_PLATFORMS="cpu", PORT="23456",
               XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=1")
    result = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", f"--config={config_file}",
                             f"--workdir={tmp_path / 'multi'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    single, multi = train_losses(tmp_path / "single"), train_losses(tmp_path / "multi")
    assert single.keys() == multi.keys()
    np.testing.assert_allclose([multi[s] for s in single], [single[s] for s in single], rtol=2e-4)
    test_single = json.loads((tmp_path / "single" / "results.json").read_text())["test"]
    test_multi = json.loads((tmp_path / "multi" / "results.json").read_text())["test"]
    assert test_multi["MAE"] == pytest.approx(test_single["MAE"], rel=1e-3)


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_diverged_run_saves_only_finite_checkpoints_and_a_rerun_with_a_sane_learning_rate_trains(tmp_path):
    config = tiny_config()
    config.train.update(steps=3, learning_rate=1e30, checkpoint_every=1, log_every=1, eval_every=100)
    # step 1 (learning rate 2e29 after warmup's 0) leaves finite parameters of ~1e29 whose outputs are NaN
    with pytest.raises(train.NonFiniteLossError, match=r"after step 2 give non-finite outputs.*Last good "
                                                       r"checkpoint: step 1"):
        train.train_and_evaluate(config, str(tmp_path))
    assert finished_steps(tmp_path / "checkpoints") == [1]
    config.train.update(learning_rate=3e-3, allow_config_change=True)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["final_step"] == 3 and np.isfinite(results["test"]["MAE"])
    assert all(np.isfinite(loss) for loss in train_losses(tmp_path).values())


def corrupt_arrays(checkpoint):
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_corrupt_latest_checkpoint_and_a_torn_metrics_line_resume_like_the_reference(config_file, reference_run,
                                                                                       tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    assert finished_steps(workdir / "checkpoints") == [30, 40]
    corrupt_arrays(workdir / "checkpoints" / "40")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "train/lo')
    rc, output = run_main(config_file, workdir)
    assert rc == 0, output
    skipped = [line for line in output.splitlines() if line.startswith("skipped checkpoint")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped checkpoint checkpoints/40: ") and skipped[0].endswith(
        f"moved to {workdir}/corrupt/checkpoints-40"), output
    assert f"resumed from {workdir}/checkpoints/30" in output
    assert json.loads((workdir / "results.json").read_text()) == json.loads(
        (reference_run / "results.json").read_text())
    timing = ("train/samples_per_second",)
    assert read_jsonl(workdir, drop=timing) == read_jsonl(reference_run, drop=timing)


def test_no_checkpoint_that_restores_is_one_error_naming_each(config_file, reference_run, tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    corrupt_arrays(workdir / "checkpoints" / "40")
    (workdir / "checkpoints" / "30" / "meta" / "metadata").write_text('{"step": 3')
    (workdir / "checkpoints" / "7").mkdir()  # a foreign folder
    (workdir / "checkpoints" / "7" / "notes.txt").write_text("not a checkpoint")
    before = snapshot(workdir)
    rc, output = run_main(config_file, workdir)
    assert rc == 1, output
    assert "Traceback" not in output and len(error_lines(output)) == 1, output
    assert error_lines(output)[0].startswith(f"error: workdir {workdir}: no checkpoint in {workdir}/checkpoints "
                                             f"restores: checkpoints/40 ("), output
    assert "; checkpoints/30 (" in output and "; checkpoints/7 (" in output, output
    assert snapshot(workdir) == before


def test_reads_that_outlive_a_failed_restore_print_nothing_and_other_unraisable_errors_still_do(
        reference_run, tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    workdir = copy_of(reference_run, tmp_path)
    for step in ("30", "40"):
        corrupt_arrays(workdir / "checkpoints" / step)
    with pytest.raises(UserError, match="no checkpoint in .* restores"):
        train.train_and_evaluate(tiny_config(), str(workdir))
    time.sleep(1)  # the in-flight reads finish on tensorstore's threads
    assert reported == []
    other = type("Unraisable", (), {"exc_value": RuntimeError("Event loop is closed"), "object": print})
    sys.unraisablehook(other)  # the same message from an object is not a read's callback
    assert reported == [other]


def test_resuming_with_fewer_steps_than_reached_evaluates_and_reports_the_step_reached(reference_run, tmp_path):
    workdir = copy_of(reference_run, tmp_path)
    config = tiny_config()
    config.train.steps = 20
    results = train.train_and_evaluate(config, str(workdir))
    reference = json.loads((reference_run / "results.json").read_text())
    assert results["final_step"] == 40 and results["best_step"] == reference["best_step"]
    assert results["test"] == reference["test"]
    assert finished_steps(workdir / "checkpoints") == [30, 40]


def test_a_second_run_in_a_busy_workdir_stops_at_once(config_file, tmp_path):
    from alignmamba_jax.workdir import WorkdirLock
    with WorkdirLock(str(tmp_path)):  # what a first run holds for its lifetime
        rc, output = run_main(config_file, tmp_path, "--config.seed=1")
    assert rc == 1, output
    assert error_lines(output) == [f"error: workdir {tmp_path} is in use by another run (it holds the workdir's "
                                   f"lock); wait for it to end, or give this run another --workdir"], output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock.0"]


def test_a_full_disk_is_one_line_saying_resuming_is_safe(config_file, tmp_path):
    rc, output = run_main(config_file, tmp_path, disk_full_at_save=2)
    assert rc == 1, output
    assert "Traceback" not in output and "asyncio" not in output, output
    assert error_lines(output) == [f"error: disk full while writing to workdir {tmp_path}; every checkpoint "
                                   f"written before is intact: free some space and rerun the same command to "
                                   f"resume"], output


def start_and_signal(config_file, workdir, signum, *overrides):
    """Starts a long run, sends `signum` once it has logged a step; returns (rc, output)."""
    process = run_main(config_file, workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                       "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000", *overrides,
                       wait=False)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline and not (
            metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.02)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def test_sigterm_saves_a_checkpoint_of_the_current_step_and_exits_nonzero(config_file, tmp_path):
    rc, output = start_and_signal(config_file, tmp_path, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, output
    assert "Traceback" not in output, output
    saved = finished_steps(tmp_path / "checkpoints")
    assert len(saved) == 1 and 0 < saved[0] < 100000, output
    assert (f"stopped by SIGTERM; saved checkpoint {tmp_path}/checkpoints/{saved[0]}: rerun the same command to "
            f"resume") in output, output
    assert max(r["step"] for r in read_jsonl(tmp_path)) == saved[0]


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_the_rerun_resumes_from_it(config_file, tmp_path):
    rc, output = start_and_signal(config_file, tmp_path, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, output
    saved = finished_steps(tmp_path / "checkpoints")
    assert len(saved) == 1, output
    rc, output = run_main(config_file, tmp_path, f"--config.train.steps={saved[0] + 3}")
    assert rc == 0, output
    assert f"resumed from {tmp_path}/checkpoints/{saved[0]}" in output
    assert json.loads((tmp_path / "results.json").read_text())["final_step"] == saved[0] + 3


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_with_one_checkpoint(config_file, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=1")
    processes = [subprocess.Popen(
        [sys.executable, "-m", "alignmamba_jax.main", f"--config={config_file}", f"--workdir={tmp_path}",
         "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.eval_every=100000",
         "--config.train.checkpoint_every=100000", "--coordinator_address=localhost:23457", "--num_processes=2",
         f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while all(p.poll() is None for p in processes) and time.time() < deadline and not (
            metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs
    saved = finished_steps(tmp_path / "checkpoints")
    assert len(saved) == 1, outputs
    for output in outputs:
        assert f"stopped by SIGTERM; saved checkpoint {tmp_path}/checkpoints/{saved[0]}" in output, output


@pytest.mark.slow
def test_the_logged_train_means_do_not_depend_on_the_evaluation_and_checkpoint_cadence(config_file, reference_run,
                                                                                        tmp_path):
    """Evaluations and checkpoints fetch the step metrics in between log lines; each line is still the mean
    over all the steps since the previous one (the reference logs every 5, evaluates and saves every 10)."""
    rc, output = run_main(config_file, tmp_path, "--config.train.eval_every=3", "--config.train.checkpoint_every=7")
    assert rc == 0, output
    drop = ("train/samples_per_second",)

    def train_rows(workdir):
        return [{k: v for k, v in r.items() if k.startswith("train/") or k == "step"}
                for r in read_jsonl(workdir, drop) if "train/loss" in r]
    assert train_rows(tmp_path) == train_rows(reference_run)


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_says_training_is_complete(tmp_path, monkeypatch):
    config = tiny_config()
    config.train.update(steps=2, log_every=1, eval_every=100, checkpoint_every=100)
    evaluate = train.Evaluator.evaluate
    final = []

    def signalled_at_the_final_test_evaluation(self, params, split, *args, **kwargs):
        result = evaluate(self, params, split, *args, **kwargs)
        if split is self_splits["test"] and not final:
            final.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    self_splits = train.data_lib.load_splits(config.data)
    monkeypatch.setattr(train.data_lib, "load_splits", lambda data_config: self_splits)
    monkeypatch.setattr(train.Evaluator, "evaluate", signalled_at_the_final_test_evaluation)
    with pytest.raises(train.preemption.Preempted) as stopped:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(stopped.value) == (f"stopped by SIGTERM during the final evaluation; training is complete (last "
                                  f"checkpoint {tmp_path}/checkpoints/2): rerun the same command to evaluate")
    assert stopped.value.signum == signal.SIGTERM and not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_a_workdir_deleted_mid_run_stops_the_run_in_one_line_and_is_not_recreated(config_file, tmp_path):
    workdir = tmp_path / "run"
    process = run_main(config_file, workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                       "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000", wait=False)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline and not (
            metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.02)
    os.rename(workdir, tmp_path / "deleted")   # rmtree in one step: the run writes into it at every step
    shutil.rmtree(tmp_path / "deleted")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output
    assert "Traceback" not in output, output
    assert error_lines(output) == [f"error: workdir {workdir} was removed while this run was using it; stopping "
                                   f"(it is not recreated: rerun to start afresh)"], output
    assert not workdir.exists()
