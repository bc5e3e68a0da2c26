"""The GPU suite: kernel tests, scan / efficiency / throughput benchmarks and a demo run, on a fresh GPU machine.

One command proves the accelerator path.

    bash benchmarks/device_suite.sh [--dry_run] [--out DIR] [--budget_s S] [--steps STEP ...]
    (`make device-suite`; this file takes the same arguments)

Steps, in order, each in its own process group under its own timeout (its budget, cut to what is left of
--budget_s), so that a failure or a hang loses nothing else:
  install           a private virtualenv over this Python's packages (the GPU image's jax, flax, ...) with
                    .whl/*.whl (`make wheels`, pip with no index) and the project from this checkout (as an
                    editable install maps it); tensorflow, tensorflow_datasets, grain and array_record look
                    uninstalled there, as on the image
  environment       nvidia-smi, jax.devices(), versions, which modules and kernels import    -> suite.json
  gpu_tests         pytest -m gpu on the test modules that have gpu tests (tests/test_gpu.py: kernels
                    against reference, AlignMamba GPU against CPU, cuDNN attention)          -> pytest_gpu.json
  scan_bench        scan_bench.py, batch 8, length 2048, channels 2048, state 16, bf16, every
                    backend, forward and forward+backward, roofline                         -> scan_bench.json
  efficiency        efficiency.py at text lengths 2176 and 4352 (6.5k, 13k fused tokens), the
                    Transformers with XLA and cuDNN attention                               -> efficiency.json
  train_throughput  train_throughput.py                                                     -> train_throughput.json
  demo              configs/synthetic.py for 100 steps; its results.json                    -> demo_results.json
  scan_sweep        scan_bench.py --sweep: the kernels' tunables, in all the time left      -> scan_sweep.json
All of it goes to --out (default $OUT, else runs/device_suite): at most 8 files, suite.log holding every line
printed; suite.json, rewritten after every step, holds the environment and each step's status, seconds and file.
--dry_run runs the same steps on the CPU at tiny sizes, the GPU kernels in interpret mode and tests/test_gpu.py
with ALIGNMAMBA_DRY_RUN=1 (tests/test_device_suite.py runs it, so that the suite cannot rot between GPU sessions).
"""
import glob
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.abspath(__file__)
BUDGET_S = 360                # the whole suite on an H200, the install included
SWEEP_MARGIN_S = 25           # the sweep's start-up, and the setting in flight when its budget runs out
ABSENT = ("tensorflow", "tensorflow_datasets", "grain", "array_record")   # not on the GPU image
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "chex", "numpy", "ml_collections", "tensorboardX", "absl-py", "etils",
                 "matplotlib", "pytest")
SUITE_MODULES = ("alignmamba_jax.kernels", "alignmamba_jax.models", "alignmamba_jax.train", "alignmamba_jax.main",
                 "ml_collections", "tensorboardX")
# Written into the private virtualenv's site-packages and imported by a .pth file when its interpreter starts.
SITE_MODULE = '''"""Device suite: the parent interpreter's packages, with {absent} looking uninstalled, and the
project from the checkout {repo} (alignmamba_jax/, and kernels/ as alignmamba_jax.kernels, as setup.py maps it)."""
import importlib.machinery
import importlib.util
import os
import site
import sys

for directory in {parents!r}:
    site.addsitedir(directory)
PACKAGES = {{"alignmamba_jax": os.path.join({repo!r}, "alignmamba_jax"),
            "alignmamba_jax.kernels": os.path.join({repo!r}, "kernels")}}


class ProjectFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in PACKAGES:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(PACKAGES[name], "__init__.py"),
                                                      submodule_search_locations=[PACKAGES[name]])


class PathFinderWithout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in {absent!r}:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()

    find_distributions = importlib.machinery.PathFinder.find_distributions


sys.meta_path[:] = [ProjectFinder] + [PathFinderWithout if f is importlib.machinery.PathFinder else f
                                      for f in sys.meta_path]
'''


class Step(NamedTuple):
    name: str
    budget_s: float
    argv: tuple
    output: str         # the file this step writes under --out
    env: tuple = ()     # extra (name, value) environment


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU, GPU kernels in interpret mode")
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else runs/device_suite)")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"the whole suite's time (default {BUDGET_S} s; 1500 s with --dry_run)")
    p.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                   help="the steps to run (default all, in order); e.g. rerun one after a fix")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="directory of wheels to install")
    args = p.parse_args(argv)
    args.python = sys.executable  # the interpreter whose packages (the GPU image's) the suite runs on
    names = [s.name for s in plan(args, "python", "out", "work")]
    unknown = sorted(set(args.steps or ()) - set(names) - {"install"})
    if unknown:
        p.error(f"--steps: unknown {unknown}; expected some of {names}")
    if args.budget_s is None:
        args.budget_s = 1500.0 if args.dry_run else float(BUDGET_S)
    return args


def install_budget(args):
    return 120 if args.dry_run else 15


def gpu_test_files():
    """The test modules with tests marked gpu: the others are not even imported (some need TFDS or grain)."""
    paths = sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py")))
    return [os.path.relpath(p, REPO) for p in paths if "mark.gpu" in open(p).read()]


def plan(args, python, out, work):
    """The steps after `install`, with the command of each (`python`: the private virtualenv's interpreter)."""
    out_file = lambda name: os.path.join(out, name)  # noqa: E731
    bench = lambda script: (python, os.path.join(REPO, "benchmarks", script))  # noqa: E731
    if args.dry_run:
        device, platforms = ["--device", "cpu", "--kernels_for", "gpu"], "cpu"
        scan = ["--batch", "1", "--lengths", "64", "--channels", "128", "--state", "16", "--dtype", "bfloat16",
                "--warmup", "0"]
        repeats, sweep_repeats = ["--repeats", "1"], ["--repeats", "1"]
        efficiency = ["--lengths", "8", "16", "--d_model", "16", "--n_layers", "1", "--repeats", "1", "--warmup", "0",
                      "--attention_impls", "xla", "cudnn"]
        throughput = ["--batch_size", "2", "--d_model", "16", "--n_layers", "1", "--repeats", "1", "--steps", "1",
                      "--attention_impls", "xla", "cudnn"]
        demo = ["--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                "--config.train.log_every=1", "--config.train.batch_size=8", "--config.eval.batch_size=8",
                "--config.data.synthetic.n_train=32", "--config.data.synthetic.n_valid=16",
                "--config.data.synthetic.n_test=16", "--config.model.n_layers=1"]
        budgets = {"environment": 60, "gpu_tests": 400, "scan_bench": 200, "efficiency": 200,
                   "train_throughput": 150, "demo": 200, "scan_sweep": 200}
    else:
        device, platforms = ["--device", "gpu"], "cuda,cpu"
        scan = ["--batch", "8", "--lengths", "2048", "--channels", "2048", "--state", "16", "--dtype", "bfloat16",
                "--warmup", "1"]
        repeats, sweep_repeats = ["--repeats", "5"], ["--repeats", "3"]
        efficiency = ["--lengths", "2176", "4352", "--repeats", "3", "--warmup", "1"]
        throughput = ["--repeats", "3", "--steps", "3"]
        demo = ["--config.train.steps=100"]
        # Expected on an H200 (with install_budget, BUDGET_S in all): compiles dominate (Triton / Mosaic
        # kernels, XLA autotuning); one test at a realistic shape should take well under a minute.
        budgets = {"environment": 15, "gpu_tests": 130, "scan_bench": 50, "efficiency": 45,
                   "train_throughput": 30, "demo": 30, "scan_sweep": 45}
    env = (("JAX_PLATFORMS", platforms),)
    tests_env = env + (("PYTEST_TIMEOUT", "300" if args.dry_run else "60"),) + (
        (("ALIGNMAMBA_DRY_RUN", "1"),) if args.dry_run else ())
    return [
        Step("environment", budgets["environment"],
             (python, SUITE, "--worker", "environment", os.path.join(work, "environment.json")), "suite.json", env),
        Step("gpu_tests", budgets["gpu_tests"],
             (python, SUITE, "--worker", "pytest", out_file("pytest_gpu.json"), "-q", "-rfEs", "-m", "gpu",
              *gpu_test_files()),
             "pytest_gpu.json", tests_env),
        Step("scan_bench", budgets["scan_bench"],
             bench("scan_bench.py") + tuple(device + scan + repeats + ["--json", out_file("scan_bench.json")]),
             "scan_bench.json", env),
        Step("efficiency", budgets["efficiency"],
             bench("efficiency.py") + tuple(efficiency + ["--json", out_file("efficiency.json")]),
             "efficiency.json", env),
        Step("train_throughput", budgets["train_throughput"],
             bench("train_throughput.py") + tuple(throughput + ["--json", out_file("train_throughput.json")]),
             "train_throughput.json", env),
        Step("demo", budgets["demo"],
             (python, "-m", "alignmamba_jax.main", "--config", os.path.join(REPO, "configs", "synthetic.py"),
              "--workdir", os.path.join(work, "demo"), *demo), "demo_results.json", env),
        Step("scan_sweep", budgets["scan_sweep"],
             bench("scan_bench.py") + tuple(device + scan + sweep_repeats + [
                 "--sweep", "--sweep_budget_s", str(budgets["scan_sweep"] - SWEEP_MARGIN_S),
                 "--json", out_file("scan_sweep.json")]),
             "scan_sweep.json", env),
    ]


# ------------------------------------------------------------------------------------------------- running
class Log:
    """Every line goes to stdout and to suite.log."""

    def __init__(self, path):
        self.file = open(path, "w", buffering=1)
        self.lock = threading.Lock()

    def write(self, line):
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.file.write(line)

    def say(self, text):
        self.write(f"[device-suite {time.strftime('%H:%M:%S')}] {text}\n")


def run_process(argv, timeout, log, env=None):
    """Runs argv in its own process group, its output into the log; kills the whole group at the timeout.
    Returns (returncode or None when timed out, seconds)."""
    start = time.perf_counter()
    if timeout <= 0:
        return None, 0.0
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")
    pump = threading.Thread(target=lambda: [log.write(line) for line in proc.stdout], daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    pump.join(timeout=5)
    return rc, time.perf_counter() - start


def install(python, args, work, deadline, log):
    """The private virtualenv: this interpreter's packages and the project's checkout (SITE_MODULE), and the
    wheels, with nothing resolved from the network. Returns (its interpreter, or None on failure, a note)."""
    venv = os.path.join(work, "venv")
    venv_python = os.path.join(venv, "bin", "python")
    rc, _ = run_process([python, "-m", "venv", "--without-pip", venv], deadline - time.perf_counter(), log)
    if rc != 0:
        return None, f"python -m venv failed (rc {rc})"
    query = ("import json, site, sysconfig; "
             "print(json.dumps([site.getsitepackages(), sysconfig.get_paths()['purelib']]))")
    parents = json.loads(subprocess.run([python, "-c", query], capture_output=True, text=True, check=True,
                                        timeout=60).stdout)[0]
    purelib = json.loads(subprocess.run([venv_python, "-c", query], capture_output=True, text=True, check=True,
                                        timeout=60).stdout)[1]
    with open(os.path.join(purelib, "_alignmamba_suite_site.py"), "w") as f:
        f.write(SITE_MODULE.format(parents=parents, absent=ABSENT, repo=REPO))
    with open(os.path.join(purelib, "_alignmamba_suite_site.pth"), "w") as f:
        f.write("import _alignmamba_suite_site\n")
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    note = f"{len(wheels)} wheel(s) from {args.wheels}: {[os.path.basename(w) for w in wheels]}"
    if wheels:
        rc, _ = run_process([venv_python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                             "--no-compile", "--ignore-installed", "--disable-pip-version-check", "-q"] + wheels,
                            deadline - time.perf_counter(), log)
        if rc != 0:
            return None, f"{note}; pip install of the wheels failed (rc {rc})"
    return venv_python, note


def write_summary(path, summary):
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def run_timed(name, budget_s, action, deadline, log):
    """Runs `action(timeout) -> (returncode or None if timed out, note)` under min(budget, time left of the
    suite); returns the step's record. Nothing a step does stops the suite."""
    left = deadline - time.perf_counter()
    timeout = min(budget_s, left)
    record = {"name": name, "budget_s": budget_s, "timeout_s": round(max(timeout, 0.0), 1)}
    if timeout < 5:
        log.say(f"{name}: skipped, {left:.0f} s left of the suite's budget")
        return dict(record, status="skipped", note=f"{left:.0f} s left of the suite's budget")
    log.say(f"{name}: start (timeout {timeout:.0f} s)")
    start = time.perf_counter()
    try:
        rc, note = action(timeout)
    except Exception as error:  # noqa: BLE001
        rc, note = 1, f"{type(error).__name__}: {error}"
    status = "ok" if rc == 0 else "timeout" if rc is None else "failed"
    seconds = time.perf_counter() - start
    log.say(f"{name}: {status} in {seconds:.0f} s" + (f" ({note})" if note else ""))
    return dict(record, status=status, returncode=rc, seconds=round(seconds, 1), note=note)


def run_suite(args):
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(REPO, "runs", "device_suite"))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="alignmamba-suite-")
    log = Log(os.path.join(out, "suite.log"))
    start = time.perf_counter()
    deadline = start + args.budget_s
    summary = {"dry_run": args.dry_run, "budget_s": args.budget_s, "out": out, "python": args.python,
               "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": None, "steps": []}
    summary_path = os.path.join(out, "suite.json")
    log.say(f"{'dry run, ' if args.dry_run else ''}budget {args.budget_s:.0f} s, results in {out}")

    def add(record):
        summary["steps"].append(record)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_summary(summary_path, summary)

    python = args.python

    def install_action(timeout):
        nonlocal python
        venv_python, note = install(args.python, args, work, time.perf_counter() + timeout, log)
        python = venv_python or args.python
        return (0, note) if venv_python else (1, f"{note}; the steps run with {args.python}")

    add(run_timed("install", install_budget(args), install_action, deadline, log))
    for step in plan(args, python, out, work):
        if args.steps and step.name not in args.steps:
            continue

        def action(timeout, step=step):
            if step.output != "suite.json" and os.path.exists(os.path.join(out, step.output)):
                os.remove(os.path.join(out, step.output))  # a stale file from an earlier run is no result
            argv = list(step.argv)
            if "--sweep_budget_s" in argv:  # no new setting in the last SWEEP_MARGIN_S of the step's time
                argv[argv.index("--sweep_budget_s") + 1] = str(round(timeout - SWEEP_MARGIN_S))
            env = dict(os.environ, PYTHONUNBUFFERED="1", **dict(step.env))
            rc, _ = run_process(argv, timeout, log, env)
            finish(step, out, work, summary)
            return rc, ""

        # the sweep, last, takes whatever time the others left over
        budget = max(step.budget_s, deadline - time.perf_counter()) if step.name == "scan_sweep" else step.budget_s
        record = run_timed(step.name, budget, action, deadline, log)
        path = os.path.join(out, step.output)
        record["output"] = path if os.path.exists(path) and record["status"] != "skipped" else None
        add(record)
    files = sorted(os.listdir(out))
    log.say(f"done in {time.perf_counter() - start:.0f} s; {len(files)} files in {out}:")
    for record in summary["steps"]:
        log.say(f"  {record['name']:17s} {record['status']:8s} {record.get('seconds', 0):6.1f} s  "
                f"{record.get('output') or record.get('note') or ''}")
    log.say(f"  summary: {summary_path}; log: {os.path.join(out, 'suite.log')}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in summary["steps"]) else 1


def finish(step, out, work, summary):
    """Moves what a step left in the work directory into the results."""
    if step.name == "environment" and os.path.exists(step.argv[-1]):
        with open(step.argv[-1]) as f:
            summary["environment"] = json.load(f)
    if step.name == "demo":
        results = os.path.join(work, "demo", "results.json")
        if os.path.exists(results):
            shutil.copyfile(results, os.path.join(out, step.output))


# ------------------------------------------------------------------------------------------------- workers
def command_output(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {type(error).__name__}: {error}"


def environment(path):
    """Machine, versions, devices and what imports, written to `path` (and the full nvidia-smi to stdout)."""
    info = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
            "nvidia_smi": command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                          "clocks.max.sm,clocks.max.memory,power.limit", "--format=csv"])}
    print(command_output(["nvidia-smi"]), flush=True)
    info["versions"] = {}
    for name in DISTRIBUTIONS:
        try:
            info["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][name] = None
    info["imports"] = {}
    for module in SUITE_MODULES:
        try:
            importlib.import_module(module)
            info["imports"][module] = "ok"
        except Exception as error:  # noqa: BLE001
            info["imports"][module] = f"{type(error).__name__}: {error}"
    info["absent_but_imported"] = [m for m in ABSENT if m in sys.modules]
    info["project"] = getattr(sys.modules.get("alignmamba_jax"), "__file__", None)
    import jax
    devices = jax.devices()
    info["jax"] = {"default_backend": jax.default_backend(), "devices": [str(d) for d in devices],
                   "device_kind": devices[0].device_kind, "core_count": getattr(devices[0], "core_count", None)}
    try:
        info["jax"]["memory_stats"] = devices[0].memory_stats()
    except Exception as error:  # noqa: BLE001  (CPU devices have none)
        info["jax"]["memory_stats"] = f"{type(error).__name__}: {error}"
    from alignmamba_jax import kernels
    info["kernels"] = {}
    for name in kernels.TUNABLE_BACKENDS:
        try:
            info["kernels"][name] = {"tunables": kernels.tunables(name)}
        except Exception as error:  # noqa: BLE001
            info["kernels"][name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(info, indent=1), flush=True)
    with open(path, "w") as f:
        json.dump(info, f, indent=1)


class PytestRecorder:
    """A pytest plugin writing each test's outcome to a JSON file as it finishes (so a timeout keeps them)."""

    def __init__(self, path):
        self.path, self.tests, self.collection_errors, self.exitstatus = path, {}, {}, None

    def write(self):
        counts = {}
        for entry in self.tests.values():
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        with open(self.path, "w") as f:
            json.dump({"exitstatus": self.exitstatus, "counts": counts, "tests": self.tests,
                       "collection_errors": self.collection_errors}, f, indent=1)

    def pytest_collectreport(self, report):
        if report.failed:
            self.collection_errors[report.nodeid] = str(report.longrepr)[-3000:]
            self.write()

    def pytest_runtest_logreport(self, report):
        previous = self.tests.get(report.nodeid)
        if report.when != "call" and report.passed or previous and previous["outcome"] != "passed":
            return
        entry = {"outcome": report.outcome, "when": report.when, "seconds": round(report.duration, 2)}
        if report.skipped and isinstance(report.longrepr, tuple):
            entry["message"] = report.longrepr[2]
        elif report.failed:
            entry["message"] = str(report.longrepr)[-4000:]
        self.tests[report.nodeid] = entry
        self.write()

    def pytest_sessionfinish(self, session, exitstatus):
        self.exitstatus = int(exitstatus)
        self.write()


def worker(argv):
    kind, path, *rest = argv
    if kind == "environment":
        return environment(path)
    import pytest
    return pytest.main(rest, plugins=[PytestRecorder(path)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    return run_suite(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
