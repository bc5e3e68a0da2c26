"""The benchmark scripts share one command line (benchmarks/common.py): each answers --help, whose first line says
what it measures; the common flags parse alike everywhere; none edits Python's module search path."""
import ast
import os
import pathlib
import runpy
import sys

import pytest

import common

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_the_scripts_are_found():
    assert {"scan_bench.py", "efficiency.py", "device_suite.py", "aot_table.py"} <= {p.name for p in SCRIPTS}
    assert "common.py" not in {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help_with_what_it_measures(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert exited.value.code == 0, out
    first_line = ast.get_docstring(ast.parse(script.read_text())).splitlines()[0]
    assert out.startswith("usage: ") and f"\n\n{first_line}\n" in out
    assert first_line.endswith(".") and len(first_line) <= 120


@pytest.mark.parametrize("path", [p for p in sorted(BENCH.rglob("*")) if p.suffix in (".py", ".sh", ".md")],
                         ids=lambda p: str(p.relative_to(BENCH)))
def test_no_benchmark_file_edits_sys_path(path):
    assert "sys.path" not in path.read_text()


def parse(*argv):
    p = common.parser("Measures nothing.")
    common.add_json(p)
    common.add_repeats(p, 5, warmup=1)
    common.add_lengths(p, [256, 512])
    common.add_shapes(p, ["8,2048,2048,16,bfloat16"])
    common.add_backends(p)
    common.add_device(p)
    p.add_argument("--no_backward", action="store_true")
    return p.parse_args(list(argv))


def test_common_flags():
    args = parse("--lengths", "16", "32", "--backends", "chunked", "reference", "--repeats", "3", "--json", "x.json",
                 "--device", "cpu", "--shapes", "1,64,32,4,float32", "2,16,8,4,bfloat16")
    assert (args.lengths, args.backends, args.repeats, args.warmup, args.json, args.device, args.shapes) == (
        [16, 32], ["chunked", "reference"], 3, 1, "x.json", "cpu",
        [((1, 64, 32, 4), "float32"), ((2, 16, 8, 4), "bfloat16")])
    defaults = parse()
    assert (defaults.lengths, defaults.backends, defaults.repeats, defaults.json, defaults.device, defaults.shapes) == (
        [256, 512], None, 5, None, None, [((8, 2048, 2048, 16), "bfloat16")])


@pytest.mark.parametrize("argv, error", [
    (("--lengths", "16,32"), "error: argument --lengths: expected positive integers separated by spaces, found "
                             "'16,32'"),
    (("--lengths", "0"), "error: argument --lengths: expected positive integers separated by spaces, found '0'"),
    (("--repeats", "0"), "error: argument --repeats: expected a positive integer, found '0'"),
    (("--shapes", "8,2048,2048,16,bfloat16;1,64,32,4,float32"), "error: argument --shapes: expected batch,length,"),
    (("--shapes", "8,2048,2048,bfloat16"), "error: argument --shapes: expected batch,length,"),
    (("--no-backward",), "error: --no-backward is spelled --no_backward"),
    (("--device", "npu"), "error: argument --device: invalid choice: 'npu'"),
])
def test_a_command_line_mistake_is_one_error_line(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exited.value.code == 1 and len(errors) == 1 and errors[0].startswith(error), err


def test_unknown_backend_names_the_registry(capsys):
    p = common.parser("Measures nothing.")
    with pytest.raises(SystemExit):
        common.check_backends(p, ["chunked", "fast"])
    assert "error: --backends: unknown 'fast'; expected names from ('reference'," in capsys.readouterr().err
    common.check_backends(p, ["chunked"])
    common.check_backends(p, None)


def test_select_device_sets_the_platform_before_jax_starts_a_backend(monkeypatch):
    import jax
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    before = jax.config.jax_platforms
    common.select_device(None)
    assert jax.config.jax_platforms == before
    try:
        common.select_device("gpu")
        assert (jax.config.jax_platforms, os.environ["JAX_PLATFORMS"]) == ("cuda", "cuda")
    finally:
        jax.config.update("jax_platforms", before)
