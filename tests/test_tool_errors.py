"""The command-line tools besides main: a mistake the user can fix is one `error:` line and a non-zero exit,
never a traceback; a benchmark that could not measure a backend says so in its exit status."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import scan_bench

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(*argv):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout + result.stderr


def assert_one_error_line(rc, output, expected):
    assert rc == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), output


@pytest.mark.parametrize("content", [None, "{not json", b"\xff\xfe"])
def test_reporting_on_a_missing_or_broken_results_json(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if isinstance(content, str):
        (run_dir / "results.json").write_text(content)
    elif content is not None:
        (run_dir / "results.json").write_bytes(content)
    rc, output = run("-m", "alignmamba_jax.reporting", tmp_path / "out", run_dir)
    expected = (f"error: {run_dir}/results.json does not exist: is {run_dir} a finished run?" if content is None
                else f"error: {run_dir}/results.json: not a results file")
    assert_one_error_line(rc, output, expected)


@pytest.mark.parametrize("lengths", ["abc", "0", "16,32"])
def test_scan_bench_bad_lengths(lengths):
    rc, output = run("benchmarks/scan_bench.py", "--lengths", "16", lengths, "--channels", 8)
    assert_one_error_line(rc, output, f"error: argument --lengths: expected positive integers separated by spaces, "
                                      f"found {lengths!r}")


def test_benchmark_flag_in_the_old_hyphenated_spelling_names_the_new_one():
    rc, output = run("benchmarks/scan_bench.py", "--lengths", "16", "--no-backward")
    assert_one_error_line(rc, output, "error: --no-backward is spelled --no_backward")


def test_scan_bench_unknown_backend():
    rc, output = run("benchmarks/scan_bench.py", "--lengths", "16", "--channels", 8, "--backends", "foo", "chunked")
    assert_one_error_line(rc, output, "error: --backends: unknown 'foo'; expected names from ('reference',")


def test_scan_bench_a_failed_backend_row_makes_the_exit_status_non_zero(tmp_path, monkeypatch, capsys):
    timed = scan_bench.time_scan

    def time_scan(fn, inputs, args, traffic, device):
        if fn.__kwdefaults__["backend"] == "associative":   # run_jax binds the backend name as a keyword default
            raise RuntimeError("this backend did not compile")
        return timed(fn, inputs, args, traffic, device)

    monkeypatch.setattr(scan_bench, "time_scan", time_scan)
    out = tmp_path / "scan.json"
    rc = scan_bench.main(["--lengths", "16", "--channels", "8", "--state", "4", "--repeats", "1", "--warmup", "0",
                          "--no_backward", "--backends", "associative", "reference", "--json", str(out)])
    rows = {r["backend"]: r for r in json.load(open(out))["results"]}
    assert rc == 1 and "did not compile" in rows["associative"]["error"] and rows["reference"]["forward_s"] > 0
    assert "error: 1 backend rows failed: associative at length 16" in capsys.readouterr().err
    rc = scan_bench.main(["--lengths", "16", "--channels", "8", "--state", "4", "--repeats", "1", "--warmup", "0",
                          "--no_backward", "--backends", "reference", "--json", str(out)])
    assert rc == 0


WITHOUT_THE_AOT_EXTRA = """
import runpy, sys
class Absent:
    '''What an install without the aot extra looks like: no libtpu, no CUDA plugin, no nvidia packages.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("libtpu", "jax_plugins", "nvidia"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = ["aot", *sys.argv[1:]]
runpy.run_module("alignmamba_jax.aot", run_name="__main__", alter_sys=True)
"""
AOT_ARGS = ("--config=configs/synthetic.py", "--config.train.batch_size=64", "--config.eval.batch_size=64")


def test_targets_installed_is_false_for_a_submodule_of_an_absent_package():
    from alignmamba_jax import targets
    assert not targets.installed("no_such_package_here.xla_cuda13")
    assert targets.installed("json.decoder")


def test_aot_without_the_aot_extra_is_one_line():
    rc, output = run("-c", WITHOUT_THE_AOT_EXTRA, *AOT_ARGS, "--target=h100x8")
    assert_one_error_line(rc, output, 'error: cannot compile for h100x8: the CUDA plugin is not installed (pip '
                                      'install -e ".[aot]")')


@pytest.mark.parametrize("flag, make, kind, expected", [
    ("json", lambda tmp: tmp, "file", "--json={tmp} is a directory; expected a file"),
    ("hlo_dir", lambda tmp: tmp / "a_file", "directory", "--hlo_dir={tmp}/a_file is a file; expected a directory"),
    ("json", lambda tmp: tmp / "a_file" / "aot.json", "file", "--json={tmp}/a_file/aot.json: {tmp}/a_file is a file, "
                                                              "not a directory"),
    ("json", lambda tmp: "/proc/aot.json", "file", "--json=/proc/aot.json: cannot write in /proc: "),
], ids=["json_directory", "hlo_dir_file", "json_under_a_file", "json_not_writable"])
def test_aot_output_paths_that_cannot_be_written_are_refused(tmp_path, flag, make, kind, expected):
    from alignmamba_jax import aot
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(aot.UserError) as error:
        aot.check_output(flag, str(make(tmp_path)), kind)
    assert str(error.value).startswith(expected.format(tmp=tmp_path))
    aot.check_output(flag, str(tmp_path / "new" / ("aot.json" if kind == "file" else "hlo")), kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_aot_with_a_directory_for_json_stops_before_compiling(tmp_path):
    rc, output = run("-m", "alignmamba_jax.aot", *AOT_ARGS, "--target=v5e-4", f"--json={tmp_path}")
    assert_one_error_line(rc, output, f"error: --json={tmp_path} is a directory; expected a file")
    assert "TPU" not in output, output   # libtpu never started: nothing compiled
