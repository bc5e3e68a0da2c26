"""Training loop: loss goes down, sharding does not change the result, resume is exact, bad runs stop early."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax import input_pipeline, models, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tiny models: LLVM optimisation costs more compile time than it saves; every compared run uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"

TINY_CONFIG = """
from alignmamba_jax import train


def get_config():
    config = train.default_config()
    config.data.synthetic.update(n_train=64, n_valid=16, n_test=16, text_len=12, text_dim=16, audio_len=20,
                                 vision_len=24, min_words=3, max_words=8)
    config.model.update(d_model=16, n_layers=1, d_state=4, dropout=0.1)
    config.train.update(batch_size=8, steps=40, warmup_steps=5, learning_rate=3e-3, log_every=5,
                        eval_every=10, checkpoint_every=10)
    config.eval.batch_size = 8
    return config
"""


def tiny_config():
    namespace = {}
    exec(TINY_CONFIG, namespace)
    return namespace["get_config"]()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def run_main(config_file, workdir, *overrides, devices=1, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "alignmamba_jax.main", f"--config={config_file}", f"--workdir={workdir}",
               *overrides]
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


def test_sigkill_after_a_checkpoint_then_resume_ends_like_an_uninterrupted_run(config_file, reference_run,
                                                                               tmp_path):
    process = run_main(config_file, tmp_path, wait=False)
    first_checkpoint = tmp_path / "checkpoints" / "10"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"run ended before it could be killed:\n{output}"
    assert not (tmp_path / "results.json").exists()

    rc, output = run_main(config_file, tmp_path)
    assert rc == 0, output
    assert "resumed from" in output
    reference = json.loads((reference_run / "results.json").read_text())
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed == reference
    timing = ("train/samples_per_second",)
    assert read_jsonl(tmp_path, drop=timing) == read_jsonl(reference_run, drop=timing)


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
    assert "train.batch_size=6 must be divisible by the number of devices (4)" in output
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
