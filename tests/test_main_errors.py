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


def run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
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
                         "error: cfg.scan_backend must be one of ('reference', 'associative', 'chunked', 'pallas',"),
    "bad_model_value": (lambda tmp: [f"--config={SYNTHETIC}", "--config.model.dropout=1.5"],
                        "error: cfg.dropout must be in [0, 1), found 1.5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_prints_one_message_without_traceback(tmp_path, case):
    make_args, expected = CASES[case]
    rc, output = run_main(*make_args(tmp_path), f"--workdir={tmp_path / 'run'}")
    assert rc == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected.format(tmp=tmp_path)), output
    assert not (tmp_path / "run").exists()


def test_unexpected_error_keeps_its_traceback(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    raise RuntimeError('a bug in the config file')\n")
    rc, output = run_main(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert rc != 0
    assert "Traceback" in output and "RuntimeError: a bug in the config file" in output, output
