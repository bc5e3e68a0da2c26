"""The command line: expected user errors print one `error: ...` message and exit 1 without a traceback;
unexpected errors keep their traceback. Each case runs `python -m alignmamba_jax.main` as a user would."""
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

from alignmamba_jax.data import layouts

REPO = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = str(REPO / "configs" / "synthetic.py")


def run_main(*args, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu") if env is None else env
    result = subprocess.run([sys.executable, "-m", "alignmamba_jax.main", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def narrow_test_audio_pickle(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    data = layouts.write_mmsa_pickle(path, "mosi", False, sizes=(4, 2, 2))
    data["test"]["audio"] = data["test"]["audio"][:, :, :3].copy()
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


CASES = {
    "unknown_override_key": (lambda tmp: [f"--config={SYNTHETIC}", "--config.train.stepz=3"],
                             "error: --config.train.stepz: unknown config key 'train.stepz'"),
    "missing_config_file": (lambda tmp: [f"--config={tmp / 'nope.py'}"],
                            "error: --config={tmp}/nope.py: cannot load the config file: [Errno 2] No such file or "
                            "directory"),
    "unknown_config_variant": (lambda tmp: [f"--config={SYNTHETIC}:wo_globl"],
                               "error: --config: unknown config variant 'wo_globl'; expected one of ['full',"),
    "directory_as_data_path": (lambda tmp: [f"--config={SYNTHETIC}", "--config.data.name=mmsa",
                                            f"--config.data.path={tmp}"],
                               "error: data.path='{tmp}' is a directory; data.name='mmsa' expects an MMSA feature "
                               "pickle"),
    "splits_that_disagree": (lambda tmp: [f"--config={SYNTHETIC}", "--config.data.name=mmsa",
                                          f"--config.data.path={narrow_test_audio_pickle(tmp)}"],
                             "error: mmsa:{tmp}/unaligned_50.pkl:test: key 'audio': expected feature width 5 (as in "
                             "split 'train'), found 3"),
    "bad_model_choice": (lambda tmp: [f"--config={SYNTHETIC}", "--config.model.scan_backend=pallsa"],
                         "error: cfg.scan_backend must be one of ('reference', 'associative', 'chunked', 'cpu_ffi', 'pallas_triton',"),
    "bad_model_value": (lambda tmp: [f"--config={SYNTHETIC}", "--config.model.dropout=1.5"],
                        "error: cfg.dropout must be in [0, 1), found 1.5"),
    "unknown_select_mode": (lambda tmp: [f"--config={SYNTHETIC}", "--config.eval.select_mode=minimum"],
                            "error: eval.select_mode='minimum': expected 'min' or 'max'"),
    "select_metric_of_no_task": (lambda tmp: [f"--config={SYNTHETIC}", "--config.eval.select_metric=mae"],
                                 "error: eval.select_metric='mae' is not a metric of data.task='regression'; "
                                 "expected one of ['Has0_acc_2',"),
    "zero_cadence": (lambda tmp: [f"--config={SYNTHETIC}", "--config.train.log_every=0"],
                     "error: train.log_every=0: expected an integer of at least 1"),
    "negative_seed": (lambda tmp: [f"--config={SYNTHETIC}", "--config.seed=-1"],
                      "error: seed=-1: expected an integer of at least 0"),
    "negative_learning_rate": (lambda tmp: [f"--config={SYNTHETIC}", "--config.train.learning_rate=-1"],
                               "error: train.learning_rate=-1.0: expected a finite number > 0"),
    "override_of_the_wrong_type": (lambda tmp: [f"--config={SYNTHETIC}", "--config.train.steps=abc"],
                                   "error: flag --config.train.steps=abc: invalid literal for int() with base 10: "
                                   "'abc' (--helpshort or --helpfull lists the flags)"),
}


def assert_one_error_line(rc, output, expected):
    assert rc == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), output


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_prints_one_message_without_traceback(tmp_path, case):
    make_args, expected = CASES[case]
    rc, output = run_main(*make_args(tmp_path), f"--workdir={tmp_path / 'run'}")
    assert_one_error_line(rc, output, expected.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


def test_with_no_platform_set_and_no_accelerator_nothing_but_the_error_is_printed(tmp_path):
    """`make test` installs the aot extra (libtpu, the CUDA plugin): started with JAX_PLATFORMS unset on a
    machine without TPU or GPU, they must not print a cuDNN traceback or libtpu warnings before the run."""
    from alignmamba_jax.targets import accelerator_present
    if accelerator_present():
        pytest.skip("this machine has an accelerator")
    make_args, expected = CASES["directory_as_data_path"]  # fails after JAX has started its backends
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    rc, output = run_main(*make_args(tmp_path), f"--workdir={tmp_path / 'run'}", env=env)
    assert_one_error_line(rc, output, expected.format(tmp=tmp_path))
    assert "cuDNN" not in output and "TPU" not in output, output


def test_cpu_ffi_asked_for_without_a_compiler_is_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CXX=str(tmp_path / "no-such-compiler"),
               ALIGNMAMBA_CACHE_DIR=str(tmp_path / "cache"))
    rc, output = run_main(f"--config={SYNTHETIC}", "--config.model.scan_backend=cpu_ffi",
                          f"--workdir={tmp_path / 'run'}", env=env)
    assert_one_error_line(rc, output, f"error: model.scan_backend='cpu_ffi' is unavailable here: CXX="
                                      f"'{tmp_path}/no-such-compiler' is not an executable; use 'chunked', or 'auto' "
                                      f"(which falls back to it)")
    assert not (tmp_path / "run").exists()


def test_unexpected_error_keeps_its_traceback(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    raise RuntimeError('a bug in the config file')\n")
    rc, output = run_main(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert rc != 0
    assert "Traceback" in output and "RuntimeError: a bug in the config file" in output, output


def a_file(tmp):
    (tmp / "notes.txt").write_text("x")
    return tmp / "notes.txt"


WORKDIR_CASES = {
    "empty_workdir": (lambda tmp: ["--workdir="], "error: --workdir is empty (an unset variable?)"),
    "file_as_workdir": (lambda tmp: [f"--workdir={a_file(tmp)}"], "error: --workdir={tmp}/notes.txt is a file"),
    "process_id_alone": (lambda tmp: [f"--workdir={tmp / 'run'}", "--process_id=1"],
                         "error: --process_id is given without --coordinator_address"),
}


@pytest.mark.parametrize("case", list(WORKDIR_CASES))
def test_a_workdir_or_multihost_flag_mistake_is_one_line_before_anything_is_written(tmp_path, case):
    make_args, expected = WORKDIR_CASES[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, output = run_main(f"--config={SYNTHETIC}", *make_args(tmp_path))
    assert_one_error_line(rc, output, expected.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["notes.txt"] * (case == "file_as_workdir"))
