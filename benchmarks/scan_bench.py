"""Selective-scan time and memory of every backend, forward and forward+backward, over sequence lengths.

For each length it reports the median wall time of several runs after warm-up, the compiled temporary
memory (XLA's `memory_analysis().temp_size_in_bytes`), and speed/memory ratios against `associative`,
measured side by side in one run. The default backends are reference, associative, chunked and every Pallas
kernel of the device (from `alignmamba_jax.kernels.TUNABLE_BACKENDS`), on CPU every built CPU kernel (from
`alignmamba_jax.kernels.CPU_KERNELS` and `backends()`), so a new kernel joins by registering;
a backend that fails to import or compile gets a row with its error and the others go on, and the exit status
is then 1; the JSON is rewritten after every row. Unknown backend names and lengths that are not positive
integers stop it before anything runs, with one `error:` line. On an H100/H200 each row also has its roofline:
the floor time from the least HBM traffic at the device's bandwidth and from the exp count at 16 exp/clock/SM at the SM clock read after the
timing (`scan_traffic`, `roofline`), and the achieved fraction; at batch 8, length 2048, channels 2048,
state 16, bf16 the Pallas kernels are checked against the goals (forward <= 250 us, forward+backward >= 10x
`associative`); at batch 4, length 1024, channels 256, state 16, float32 the CPU kernels are checked against
theirs (forward >= 15x mamba-ssm's `selective_scan_ref` with --torch_ref, forward+backward >= 10x
`associative` with no more temporary memory than `chunked`). `--sweep` times each kernel's tunables instead (`sweep_candidates`) within a time budget
and records the best setting. `--torch_ref` also times mamba-ssm's pure-PyTorch `selective_scan_ref` on
the same shapes (channels-first, as it expects) in a separate interpreter that has torch installed; point
`--mamba_src` at an unpacked mamba-ssm sdist (its `ops/selective_scan_interface.py` is loaded with the CUDA
extension stubbed out; nothing from it is copied here).

    python benchmarks/scan_bench.py                                   # CPU, default lengths 256..8192
    python benchmarks/scan_bench.py --device gpu --batch 8 --channels 2048 --lengths 2048 --dtype bfloat16
    python benchmarks/scan_bench.py --device gpu --batch 8 --channels 2048 --lengths 2048 --dtype bfloat16 \
        --sweep --sweep_budget_s 60 --repeats 3 --json runs/scan_sweep.json
    python benchmarks/scan_bench.py --torch_ref --torch_python /tmp/torchvenv/bin/python \
        --mamba_src /tmp/mamba_sdist/mamba_ssm-2.3.2.post1 --json runs/scan_bench.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import common


def build_parser():
    p = common.parser(__doc__)
    common.add_lengths(p, [256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    common.add_backends(p, help="default reference, associative, chunked plus the Pallas kernels of --kernels_for "
                                "(with --sweep: default those kernels only)")
    common.add_device(p, default="cpu")
    p.add_argument("--kernels_for", default=None, choices=sorted(common.DEVICES),
                   help="whose Pallas kernels the default backends include (default: --device; cpu: none); "
                        "off their device they run in interpret mode (the device suite's dry run)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the backend table, time each kernel's tunables (defaults, then each one "
                        "halved and doubled) at the first length and record the best setting")
    p.add_argument("--sweep_budget_s", type=float, default=120.0,
                   help="with --sweep, start no new setting this many seconds after the first one started")
    common.add_repeats(p, 5, warmup=1)
    p.add_argument("--no_backward", action="store_true", help="time the forward pass only")
    p.add_argument("--torch_ref", action="store_true", help="also time mamba-ssm's selective_scan_ref (forward)")
    p.add_argument("--torch_backward", action="store_true",
                   help="with --torch_ref, also time its autograd backward (very slow: one graph node per step)")
    p.add_argument("--torch_python", default="/tmp/torchvenv/bin/python")
    p.add_argument("--mamba_src", default="/tmp/mamba_sdist/mamba_ssm-2.3.2.post1")
    common.add_json(p, help="write all results to this file (rewritten after every row)")
    p.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
    return p


def median_seconds(fn, repeats, warmup, sync):
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- torch side
def load_selective_scan_ref(mamba_src):
    """Import mamba-ssm's pure-PyTorch reference from an unpacked sdist, with its CUDA/Triton imports stubbed."""
    import importlib.util
    import types
    for name in ("selective_scan_cuda", "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton",
                 "mamba_ssm.ops.triton.layer_norm"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mamba_ssm.ops.triton.layer_norm"]._layer_norm_fwd = None
    spec = importlib.util.spec_from_file_location("mamba_ssm.utils.torch",
                                                  os.path.join(mamba_src, "mamba_ssm/utils/torch.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sys.modules["mamba_ssm.utils"] = types.ModuleType("mamba_ssm.utils")
    sys.modules["mamba_ssm.utils.torch"] = utils
    spec = importlib.util.spec_from_file_location(
        "mamba_ssm.ops.selective_scan_interface", os.path.join(mamba_src, "mamba_ssm/ops/selective_scan_interface.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.selective_scan_ref


def torch_worker(args):
    import torch
    selective_scan_ref = load_selective_scan_ref(args.mamba_src)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    results = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(0)
        b, c, n = args.batch, args.channels, args.state
        u = torch.randn(b, c, length, generator=g).to(dtype)
        delta = torch.nn.functional.softplus(torch.randn(b, c, length, generator=g)).to(dtype)
        A = -torch.exp(0.5 * torch.randn(c, n, generator=g))
        B = torch.randn(b, n, length, generator=g).to(dtype)
        C = torch.randn(b, n, length, generator=g).to(dtype)
        with torch.no_grad():
            fwd = median_seconds(lambda: selective_scan_ref(u, delta, A, B, C), args.repeats, args.warmup,
                                 lambda _: None)
        row = {"backend": "torch_selective_scan_ref", "length": length, "forward_s": fwd}
        if args.torch_backward:
            leaves = [x.clone().requires_grad_(True) for x in (u, delta, A, B, C)]

            def fwd_bwd():
                for x in leaves:
                    x.grad = None
                selective_scan_ref(*leaves).float().sum().backward()
            row["forward_backward_s"] = median_seconds(fwd_bwd, args.repeats, args.warmup, lambda _: None)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                      "results": results}))


def run_torch_reference(args):
    cmd = [args.torch_python, os.path.abspath(__file__), "--torch_worker", "--lengths", *map(str, args.lengths),
           "--batch", str(args.batch), "--channels", str(args.channels), "--state", str(args.state),
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--mamba_src", args.mamba_src] + (["--torch_backward"] if args.torch_backward else [])
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"--torch_ref unavailable: {err}\n{getattr(err, 'stderr', '')}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ jax side
# Roofline of a GPU row: HBM bandwidth by device kind (vendor figures, SXM parts) and the special-function
# units' exp throughput (Hopper: 16 per clock per SM).
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
EXP_PER_CLOCK_PER_SM = 16
FORWARD_GOAL_S = 250e-6                 # the Pallas GPU kernel's forward at GOAL_SHAPE (bf16)
FWD_BWD_GOAL_SPEEDUP = 10.0             # its forward+backward against `associative` (the CPU kernel's too)
CPU_GOAL_SHAPE = {"batch": 4, "channels": 256, "state": 16, "dtype": "float32"}
CPU_GOAL_LENGTH = 1024
CPU_FORWARD_GOAL_VS_TORCH = 15.0        # the CPU kernel's forward against mamba-ssm's selective_scan_ref
CPU_KERNELS_FOR_GOALS = ("cpu_ffi",)
GOAL_SHAPE = {"batch": 8, "channels": 2048, "state": 16, "dtype": "bfloat16"}
GOAL_LENGTH = 2048


def pallas_kernels(platform_name):
    """The Pallas kernels written for `platform_name` (cpu: none), from the kernel registry."""
    from alignmamba_jax.kernels import TUNABLE_BACKENDS
    if platform_name == "cpu":
        return []
    return [b for b in TUNABLE_BACKENDS if b.endswith("_tpu") == (platform_name == "tpu")]


def scan_traffic(batch, length, channels, state, itemsize):
    """The least HBM traffic (bytes) and exp count of one forward and one forward+backward pass.

    Forward: read u, delta (batch, length, channels) and B, C (batch, length, state) in the input dtype, A
    (float32) once, write y; one exp(delta A) per (batch, length, channels, state) element. The backward pass
    reads u, delta, B, C, dy, writes du, ddelta, dB, dC, dA, and recomputes the states (one more exp each)."""
    big, small, a = batch * length * channels * itemsize, batch * length * state * itemsize, channels * state * 4
    exps = batch * length * channels * state
    forward = 3 * big + 2 * small + a
    backward = 5 * big + 4 * small + 2 * a
    return {"forward": (forward, exps), "forward_backward": (forward + backward, 2 * exps)}


def roofline(seconds, traffic, hbm_bytes_per_s, exps_per_s):
    """The floor time of (bytes, exps) at the given rates, what bounds it and the achieved fraction."""
    n_bytes, exps = traffic
    memory_s, exp_s = n_bytes / hbm_bytes_per_s, exps / exps_per_s
    floor = max(memory_s, exp_s)
    return {"floor_s": floor, "bound": "hbm" if memory_s >= exp_s else "exp", "fraction_of_floor": floor / seconds}


def gpu_clocks_mhz():
    """(current SM clock, max SM clock) from nvidia-smi, or (None, None) where it does not answer."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        current, maximum = (float(v) for v in out.splitlines()[0].split(","))
        return current, maximum
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None, None


def gpu_rates(device):
    """HBM bytes/s and exp/s of `device` for the roofline (None where its kind is not in HBM_BYTES_PER_S), with
    the SM clock read right after a measurement (the maximum clock where that read finds the GPU idle)."""
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in device.device_kind), None)
    current, maximum = gpu_clocks_mhz()
    clock, source = current, "measured after the timing"
    if current is None or (maximum and current < 0.5 * maximum):
        clock, source = maximum, "maximum (the measured clock was idle or unavailable)"
    sms = getattr(device, "core_count", None) or (132 if bandwidth else None)
    if bandwidth is None or clock is None or sms is None:
        return None
    return {"hbm_bytes_per_s": bandwidth, "exps_per_s": EXP_PER_CLOCK_PER_SM * sms * clock * 1e6, "sms": sms,
            "sm_clock_mhz": clock, "max_sm_clock_mhz": maximum, "clock_source": source}


def scan_inputs(batch, length, channels, state, dtype):
    import jax
    import jax.numpy as jnp
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    u = jax.random.normal(k[0], (batch, length, channels), dtype)
    delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels))).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(k[2], (channels, state)))
    B = jax.random.normal(k[3], (batch, length, state), dtype)
    C = jax.random.normal(k[4], (batch, length, state), dtype)
    return u, delta, A, B, C


def time_scan(fn, inputs, args, traffic=None, device=None):
    """Compiled temp memory and median time of `fn(u, delta, A, B, C)`, forward and (unless --no_backward)
    forward+backward; with `traffic` on a GPU of known kind, the roofline of each."""
    import jax
    import jax.numpy as jnp
    sync = jax.block_until_ready
    row = {}
    passes = [("forward", jax.jit(fn))]
    if not args.no_backward:
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
        passes.append(("forward_backward", jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))))
    for name, jitted in passes:
        compiled = jitted.lower(*inputs).compile()
        row[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        row[f"{name}_s"] = median_seconds(lambda: compiled(*inputs), args.repeats, args.warmup, sync)
        rates = gpu_rates(device) if traffic is not None and device is not None and device.platform == "gpu" else None
        if rates:
            row[f"{name}_roofline"] = dict(roofline(row[f"{name}_s"], traffic[name], rates["hbm_bytes_per_s"],
                                                    rates["exps_per_s"]), **rates)
    return row


def error_text(error):
    return f"{type(error).__name__}: {str(error)[:600]}"


def save(report, path):
    """Writes the report as it stands (after every row, so that a killed run keeps what it measured)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def auto_backend():
    """The backend name that `backend="auto"` runs on this platform, from `kernels.backends()` (None if a kernel
    that auto needs does not import)."""
    from alignmamba_jax import kernels
    try:
        return kernels.backends()["auto"][1]
    except Exception:  # noqa: BLE001  (a kernel that does not import: auto cannot run either)
        return None


def cpu_kernels():
    """The compiled CPU kernels of the registry (`kernels.CPU_KERNELS`) that can run here (built)."""
    from alignmamba_jax.kernels import CPU_KERNELS, backends
    report = backends()
    return [name for name in CPU_KERNELS if report[name][0]]


def cpu_goals(rows, torch_rows, shape):
    """The CPU kernels against the CPU goals, where the run has CPU_GOAL_SHAPE and CPU_GOAL_LENGTH: forward >=
    15x mamba-ssm's selective_scan_ref, forward+backward >= 10x associative with no more temporaries than
    chunked."""
    if shape != CPU_GOAL_SHAPE:
        return {}
    at = {r["backend"]: r for r in rows + torch_rows if r["length"] == CPU_GOAL_LENGTH and "error" not in r}
    torch, assoc, chunked = (at.get(n) for n in ("torch_selective_scan_ref", "associative", "chunked"))
    out = {}
    for name in CPU_KERNELS_FOR_GOALS:
        r = at.get(name)
        if r is None:
            continue
        g = {}
        if torch:
            g["forward_speedup_vs_torch_ref"] = torch["forward_s"] / r["forward_s"]
            g["forward_goal_met"] = g["forward_speedup_vs_torch_ref"] >= CPU_FORWARD_GOAL_VS_TORCH
        if assoc and "forward_backward_s" in r:
            g["forward_backward_speedup_vs_associative"] = assoc["forward_backward_s"] / r["forward_backward_s"]
            g["forward_backward_goal_met"] = g["forward_backward_speedup_vs_associative"] >= FWD_BWD_GOAL_SPEEDUP
        if chunked and "forward_backward_temp_bytes" in r:
            g["temp_bytes_vs_chunked"] = r["forward_backward_temp_bytes"] / chunked["forward_backward_temp_bytes"]
            g["memory_goal_met"] = g["temp_bytes_vs_chunked"] <= 1.0
        out[name] = g
    return out


def header(args, platform_name, device):
    return {"jax_version": __import__("jax").__version__, "platform": platform_name,
            "device": str(device.device_kind),
            "shape": {"batch": args.batch, "channels": args.channels, "state": args.state, "dtype": args.dtype},
            "repeats": args.repeats}


def run_jax(args):
    import jax
    import jax.numpy as jnp
    from alignmamba_jax.kernels import selective_scan

    platform_name = jax.default_backend()
    device = jax.devices()[0]
    kernels_for = args.kernels_for or platform_name
    backends = (args.backends if args.backends else ["reference", "associative", "chunked"]
                + (cpu_kernels() if kernels_for == "cpu" else pallas_kernels(kernels_for)))
    report = dict(header(args, platform_name, device), backends=backends, auto=auto_backend(), results=[])
    dtype = jnp.dtype(args.dtype)
    for length in args.lengths:
        inputs = scan_inputs(args.batch, length, args.channels, args.state, dtype)
        traffic = scan_traffic(args.batch, length, args.channels, args.state, dtype.itemsize)
        for backend in backends:
            row = {"backend": backend, "length": length}
            try:
                row.update(time_scan(lambda *a, backend=backend: selective_scan(*a, backend=backend), inputs, args,
                                     traffic, device))
            except Exception as error:  # noqa: BLE001  (a kernel that does not compile must not stop the others)
                row["error"] = error_text(error)
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save(report, args.json)
    return report


def sweep_candidates(defaults):
    """The default tunables, then each integer tunable halved and doubled with the others at their defaults."""
    candidates = [dict(defaults)]
    for key, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        for other in (value // 2, value * 2):
            if other >= 1 and other != value:
                candidates.append({**defaults, key: other})
    return candidates


def sweep_order(candidates_by_backend):
    """(backend, settings) pairs, every backend's defaults first, then the variations round-robin, so that a
    time budget cut shortens every backend's sweep alike."""
    lists = list(candidates_by_backend.items())
    depth = max((len(c) for _, c in lists), default=0)
    return [(name, cands[i]) for i in range(depth) for name, cands in lists if i < len(cands)]


def best_settings(rows):
    """Per backend, the fastest forward and forward+backward settings among the rows that ran."""
    best = {}
    for key in ("forward_s", "forward_backward_s"):
        for row in rows:
            if key not in row:
                continue
            current = best.setdefault(row["backend"], {}).get(key)
            if current is None or row[key] < current[key]:
                best[row["backend"]][key] = {"settings": row["settings"], key: row[key]}
    return best


def run_sweep(args):
    """Times the Pallas kernels' tunables (`sweep_candidates`) at the first length, within --sweep_budget_s."""
    import jax
    import jax.numpy as jnp
    from alignmamba_jax.kernels import tunables, tuned_backend

    platform_name = jax.default_backend()
    device = jax.devices()[0]
    names = args.backends if args.backends else pallas_kernels(args.kernels_for or platform_name)
    report = dict(header(args, platform_name, device), mode="sweep", budget_s=args.sweep_budget_s, sweep=[],
                  unavailable={}, skipped_for_budget=[], best={})
    candidates = {}
    for name in names:
        try:
            candidates[name] = sweep_candidates(tunables(name))
        except (RuntimeError, ValueError) as error:
            report["unavailable"][name] = error_text(error)
    length = args.lengths[0]
    dtype = jnp.dtype(args.dtype)
    inputs = scan_inputs(args.batch, length, args.channels, args.state, dtype)
    traffic = scan_traffic(args.batch, length, args.channels, args.state, dtype.itemsize)
    start = time.perf_counter()
    for name, settings in sweep_order(candidates):
        if time.perf_counter() - start > args.sweep_budget_s:
            report["skipped_for_budget"].append({"backend": name, "settings": settings})
            continue
        row = {"backend": name, "length": length, "settings": settings}
        try:
            row.update(time_scan(tuned_backend(name, **settings), inputs, args, traffic, device))
        except Exception as error:  # noqa: BLE001  (an invalid setting is a result, not the end of the sweep)
            row["error"] = error_text(error)
        report["sweep"].append(row)
        report["best"] = best_settings(report["sweep"])
        print(json.dumps(row), file=sys.stderr, flush=True)
        save(report, args.json)
    return report


def goals(rows, shape):
    """Each Pallas kernel against the GPU goals, where the run has GOAL_SHAPE and GOAL_LENGTH."""
    if shape != GOAL_SHAPE:
        return {}
    rows = [r for r in rows if r["length"] == GOAL_LENGTH]
    assoc = next((r for r in rows if r["backend"] == "associative" and "forward_backward_s" in r), None)
    out = {}
    for r in rows:
        if not r["backend"].startswith("pallas") or "forward_s" not in r:
            continue
        g = {"forward_us": 1e6 * r["forward_s"], "forward_goal_met": r["forward_s"] <= FORWARD_GOAL_S}
        if assoc and "forward_backward_s" in r:
            speedup = assoc["forward_backward_s"] / r["forward_backward_s"]
            g.update(forward_backward_speedup_vs_associative=speedup,
                     forward_backward_goal_met=speedup >= FWD_BWD_GOAL_SPEEDUP)
        out[r["backend"]] = g
    return out


def add_ratios(rows, baseline="associative"):
    base = {r["length"]: r for r in rows if r["backend"] == baseline}
    for r in rows:
        ref = base.get(r["length"])
        if ref is None:
            continue
        for key in ("forward_s", "forward_backward_s"):
            if key in r and key in ref:
                r[f"{key.removesuffix('_s')}_speedup_vs_{baseline}"] = ref[key] / r[key]
        for key in ("forward_temp_bytes", "forward_backward_temp_bytes"):
            if key in r and key in ref and r[key]:
                r[f"{key.removesuffix('_bytes')}_ratio_vs_{baseline}"] = r[key] / ref[key]


def print_table(rows, torch_rows):
    fmt_ms = lambda s: "-" if s is None else f"{1e3 * s:9.3f}"  # noqa: E731
    fmt_mb = lambda b: "-" if b is None else f"{b / 2**20:8.1f}"  # noqa: E731
    fmt_x = lambda x: "-" if x is None else f"{x:6.2f}x"  # noqa: E731
    print("| length | backend | fwd ms | fwd+bwd ms | fwd temp MiB | fwd+bwd temp MiB | fwd speedup vs assoc "
          "| fwd+bwd speedup vs assoc | fwd+bwd temp vs assoc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows + torch_rows, key=lambda r: (r["length"], r["backend"])):
        if "error" in r:
            print(f"| {r['length']} | {r['backend']} | failed: {r['error'][:200]} |")
            continue
        print(f"| {r['length']} | {r['backend']} | {fmt_ms(r.get('forward_s'))} | "
              f"{fmt_ms(r.get('forward_backward_s'))} | {fmt_mb(r.get('forward_temp_bytes'))} | "
              f"{fmt_mb(r.get('forward_backward_temp_bytes'))} | {fmt_x(r.get('forward_speedup_vs_associative'))} | "
              f"{fmt_x(r.get('forward_backward_speedup_vs_associative'))} | "
              f"{fmt_x(r.get('forward_backward_temp_ratio_vs_associative'))} |")
    roof = [r for r in rows if "forward_roofline" in r]
    if roof:
        print("\n| length | backend | fwd floor us | fwd fraction of floor | fwd+bwd floor us | "
              "fwd+bwd fraction of floor | bound | SM clock MHz |")
        print("|---|---|---|---|---|---|---|---|")
        for r in roof:
            f, b = r["forward_roofline"], r.get("forward_backward_roofline", {})
            print(f"| {r['length']} | {r['backend']} | {1e6 * f['floor_s']:.1f} | {f['fraction_of_floor']:.3f} | "
                  f"{1e6 * b['floor_s']:.1f} | {b['fraction_of_floor']:.3f} | {f['bound']} | "
                  f"{f['sm_clock_mhz']:.0f} |" if b else
                  f"| {r['length']} | {r['backend']} | {1e6 * f['floor_s']:.1f} | {f['fraction_of_floor']:.3f} | - | "
                  f"- | {f['bound']} | {f['sm_clock_mhz']:.0f} |")
    if torch_rows:
        print("\n| length | fastest JAX fwd | speedup vs torch selective_scan_ref fwd | "
              "fastest JAX fwd+bwd | speedup vs torch fwd+bwd |")
        print("|---|---|---|---|---|")
        for t in torch_rows:
            same = [r for r in rows if r["length"] == t["length"] and "forward_s" in r]
            best_f = min(same, key=lambda r: r["forward_s"])
            line = f"| {t['length']} | {best_f['backend']} | {t['forward_s'] / best_f['forward_s']:.1f}x |"
            timed = [r for r in same if "forward_backward_s" in r]
            if "forward_backward_s" in t and timed:
                best_b = min(timed, key=lambda r: r["forward_backward_s"])
                line += f" {best_b['backend']} | {t['forward_backward_s'] / best_b['forward_backward_s']:.1f}x |"
            else:
                line += " - | - |"
            print(line)


def print_sweep(report):
    for name, error in report["unavailable"].items():
        print(f"{name}: unavailable ({error[:200]})")
    print("| backend | settings | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|")
    for r in report["sweep"]:
        times = (f"failed: {r['error'][:160]} |" if "error" in r else
                 f"{1e3 * r['forward_s']:.3f} | {1e3 * r['forward_backward_s']:.3f} |" if "forward_backward_s" in r
                 else f"{1e3 * r['forward_s']:.3f} | - |")
        print(f"| {r['backend']} | {r['settings']} | {times}")
    for name, best in report["best"].items():
        for key, entry in best.items():
            print(f"best {name} {key.removesuffix('_s')}: {entry['settings']} ({1e3 * entry[key]:.3f} ms)")
    if report["skipped_for_budget"]:
        print(f"{len(report['skipped_for_budget'])} settings not timed (over --sweep_budget_s "
              f"{report['budget_s']:.0f} s)")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args)
    common.select_device(args.device)
    common.check_backends(p, args.backends)
    load = os.getloadavg()
    report = run_sweep(args) if args.sweep else run_jax(args)
    torch_report = None
    if not args.sweep:
        add_ratios(report["results"])
        report["goals"] = goals(report["results"], report["shape"]) if report["platform"] == "gpu" else {}
        torch_report = run_torch_reference(args) if args.torch_ref else None
        if report["platform"] == "cpu":
            report["goals"] = cpu_goals(report["results"], torch_report["results"] if torch_report else [],
                                        report["shape"])
    report.update({
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
        "torch_reference": torch_report,
    })
    print(f"# {report['date_utc']}  jax {report['jax_version']} on {report['device']} ({report['machine']}); "
          f"batch={args.batch} channels={args.channels} state={args.state} {args.dtype}; median of "
          f"{args.repeats}; load average {load[0]:.1f} -> {report['load_average_at_end'][0]:.1f}")
    if args.sweep:
        print_sweep(report)
    else:
        if report["auto"]:
            print(f"backend='auto' runs {report['auto']} here")
        print_table(report["results"], torch_report["results"] if torch_report else [])
        for name, g in report["goals"].items():
            if report["platform"] == "cpu":
                print(f"goal {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in g.items()))
                continue
            print(f"goal {name}: forward {g['forward_us']:.0f} us (<= {1e6 * FORWARD_GOAL_S:.0f}: "
                  f"{'met' if g['forward_goal_met'] else 'missed'})"
                  + (f", fwd+bwd {g['forward_backward_speedup_vs_associative']:.1f}x associative (>= "
                     f"{FWD_BWD_GOAL_SPEEDUP:.0f}x: {'met' if g['forward_backward_goal_met'] else 'missed'})"
                     if "forward_backward_goal_met" in g else ""))
    save(report, args.json)
    if args.json:
        print(f"results: {os.path.abspath(args.json)}")
    failed = [] if args.sweep else [f"{r['backend']} at length {r['length']}" for r in report["results"] if "error" in r]
    if failed:
        print(f"error: {len(failed)} backend rows failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
