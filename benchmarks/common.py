"""The command line every benchmark script shares: one spelling for the common flags, one way to fail.

    p = common.parser(__doc__)           # --help: the docstring, whose first line says what the script measures
    common.add_json(p); common.add_repeats(p, 5, warmup=1); common.add_lengths(p, [256, 512])
    common.add_shapes(p, ["8,2048,2048,16,bfloat16"]); common.add_backends(p); common.add_device(p)
    args = p.parse_args(argv)
    common.select_device(args.device)    # before JAX starts a backend
    common.check_backends(p, args.backends)

Spelling: multi-word flags take underscores (`--d_model`, `--sweep_budget_s`); lists are values separated by
spaces (`--lengths 256 512`; `--shapes 8,2048,2048,16,bfloat16 1,8192,2048,16,bfloat16`, a shape being one
value). A flag given in the old hyphenated spelling (`--torch-ref`) stops with one line naming the new one. A
mistake on the command line is a usage line and one `error:` line, exit status 1.
Scripts import the installed `alignmamba_jax` and their sibling modules by name (`python benchmarks/x.py` puts
this folder first on the module search path).
"""
import argparse
import os
import sys

DEVICES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}     # --device -> JAX_PLATFORMS


class Parser(argparse.ArgumentParser):
    """argparse with the benchmarks' error format and a pointer from an old hyphenated flag to its new name."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and "-" in flag[2:] and flag not in self._option_string_actions:
                spelled = "--" + flag[2:].replace("-", "_")
                if spelled in self._option_string_actions:
                    self.error(f"{flag} is spelled {spelled}")
        return super().parse_known_args(args, namespace)


def parser(doc):
    """The script's parser; `doc` (its module docstring) is the --help text, first line first."""
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text):
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return int(text)


def positive_ints(text):
    """One value of a list flag (`--lengths 256 512`)."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by spaces, found {text!r}")
    return int(text)


def add_json(p, required=False, help="write the results to this JSON file"):
    p.add_argument("--json", required=required, metavar="PATH", help=help)


def add_repeats(p, repeats, warmup=None):
    """--repeats (timed runs; the median is reported) and, given a default, --warmup (untimed runs first)."""
    p.add_argument("--repeats", type=positive_int, default=repeats,
                   help=f"timed runs per measurement, the median reported (default {repeats})")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup,
                       help=f"untimed runs before them (default {warmup})")


def add_lengths(p, default, help="sequence lengths"):
    p.add_argument("--lengths", type=positive_ints, nargs="+", default=default, metavar="L",
                   help=f"{help} (default: {' '.join(map(str, default))})")


def scan_shape(text):
    """One value of `--shapes`: "batch,length,channels,state,dtype" -> ((batch, length, channels, state), dtype)."""
    *dims, dtype = text.split(",")
    if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims) or dtype not in ("float32", "bfloat16"):
        raise argparse.ArgumentTypeError(f"expected batch,length,channels,state,dtype (positive integers, dtype "
                                         f"float32 or bfloat16) separated by spaces, found {text!r}")
    return tuple(int(d) for d in dims), dtype


def add_shapes(p, default, help="scan shapes"):
    """--shapes B,L,D,N,DTYPE [...]: `default` is a list of such strings."""
    p.add_argument("--shapes", type=scan_shape, nargs="+", default=[scan_shape(s) for s in default],
                   metavar="B,L,D,N,DTYPE", help=f"{help} (default: {' '.join(default)})")


def add_backends(p, help="scan backends (default: every one that can run here)"):
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME", help=help)


def check_backends(p, names):
    """One error line for a name the kernel registry does not know (call it after `select_device`)."""
    from alignmamba_jax.kernels import BACKENDS
    unknown = [name for name in names or () if name not in BACKENDS]
    if unknown:
        p.error(f"--backends: unknown {', '.join(map(repr, unknown))}; expected names from {BACKENDS}")


def add_device(p, default=None):
    p.add_argument("--device", choices=sorted(DEVICES), default=default,
                   help="the platform to run on" + (f" (default {default})" if default else
                                                    " (default: JAX's, or $JAX_PLATFORMS)"))


def select_device(device):
    """Makes JAX run on `device` (cpu, gpu, tpu; None leaves JAX's choice). Call it before JAX starts a backend:
    it sets JAX_PLATFORMS, and the jax_platforms option where jax is already imported."""
    if device is None:
        return
    os.environ["JAX_PLATFORMS"] = DEVICES[device]
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", DEVICES[device])


def time_round(entry, steps):
    """Seconds per training step over `steps` steps of `entry` ({"step": jitted step, "state", "batch"}),
    carrying the state forward in `entry`: one round of a round-robin comparison."""
    import time

    import jax
    state = entry["state"]
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = entry["step"](state, entry["batch"])
    jax.block_until_ready((state, metrics))
    entry["state"] = state
    return (time.perf_counter() - t0) / steps


def round_robin_ms(fns, args, repeats):
    """{name: [ms per call]} of the jitted fns[name](*args), called in turn `repeats` times (already compiled):
    round-robin, so that load drifting on a shared machine reaches every entry alike."""
    import time

    import jax
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times
