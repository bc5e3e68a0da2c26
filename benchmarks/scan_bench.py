"""Selective-scan benchmark: every backend, forward and forward+backward, over sequence lengths.

For each length it reports the median wall time of several runs after warm-up, the compiled temporary
memory (XLA's `memory_analysis().temp_size_in_bytes`), and speed/memory ratios against `associative`,
measured side by side in one run. `--torch-ref` also times mamba-ssm's pure-PyTorch `selective_scan_ref` on
the same shapes (channels-first, as it expects) in a separate interpreter that has torch installed; point
`--mamba-src` at an unpacked mamba-ssm sdist (its `ops/selective_scan_interface.py` is loaded with the CUDA
extension stubbed out; nothing from it is copied here).

    python benchmarks/scan_bench.py                                   # CPU, default lengths 256..8192
    python benchmarks/scan_bench.py --device gpu --batch 8 --channels 2048 --lengths 2048 --dtype bfloat16
    python benchmarks/scan_bench.py --torch-ref --torch-python /tmp/torchvenv/bin/python \
        --mamba-src /tmp/mamba_sdist/mamba_ssm-2.3.2.post1 --json runs/scan_bench.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backends", default=None,
                   help="comma list; default reference,associative,chunked on CPU, plus pallas on GPU/TPU")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "tpu"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--torch-ref", action="store_true", help="also time mamba-ssm's selective_scan_ref (forward)")
    p.add_argument("--torch-backward", action="store_true",
                   help="with --torch-ref, also time its autograd backward (very slow: one graph node per step)")
    p.add_argument("--torch-python", default="/tmp/torchvenv/bin/python")
    p.add_argument("--mamba-src", default="/tmp/mamba_sdist/mamba_ssm-2.3.2.post1")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
    for length in map(int, args.lengths.split(",")):
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
    cmd = [args.torch_python, os.path.abspath(__file__), "--torch-worker", "--lengths", args.lengths,
           "--batch", str(args.batch), "--channels", str(args.channels), "--state", str(args.state),
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--mamba-src", args.mamba_src] + (["--torch-backward"] if args.torch_backward else [])
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"--torch-ref unavailable: {err}\n{getattr(err, 'stderr', '')}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ jax side
def run_jax(args):
    import jax
    import jax.numpy as jnp
    from alignmamba_jax.kernels import selective_scan

    platform_name = jax.default_backend()
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = ["reference", "associative", "chunked"] + (["pallas"] if platform_name != "cpu" else [])
    dtype = jnp.dtype(args.dtype)
    sync = jax.block_until_ready
    rows = []
    for length in map(int, args.lengths.split(",")):
        b, c, n = args.batch, args.channels, args.state
        k = jax.random.split(jax.random.PRNGKey(0), 5)
        u = jax.random.normal(k[0], (b, length, c), dtype)
        delta = jax.nn.softplus(jax.random.normal(k[1], (b, length, c))).astype(dtype)
        A = -jnp.exp(0.5 * jax.random.normal(k[2], (c, n)))
        B = jax.random.normal(k[3], (b, length, n), dtype)
        C = jax.random.normal(k[4], (b, length, n), dtype)
        inputs = (u, delta, A, B, C)
        for backend in backends:
            fwd = jax.jit(lambda *a, backend=backend: selective_scan(*a, backend=backend))
            row = {"backend": backend, "length": length}
            compiled = fwd.lower(*inputs).compile()
            row["forward_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
            row["forward_s"] = median_seconds(lambda: compiled(*inputs), args.repeats, args.warmup, sync)
            if not args.no_backward:
                loss = lambda *a, backend=backend: jnp.sum(selective_scan(*a, backend=backend).astype(jnp.float32))
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*inputs).compile()
                row["forward_backward_temp_bytes"] = grad.memory_analysis().temp_size_in_bytes
                row["forward_backward_s"] = median_seconds(lambda: grad(*inputs), args.repeats, args.warmup, sync)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"jax_version": jax.__version__, "platform": platform_name,
            "device": str(jax.devices()[0].device_kind), "backends": backends, "results": rows}


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
    fmt_ms = lambda s: "-" if s is None else f"{1e3 * s:9.2f}"
    fmt_mb = lambda b: "-" if b is None else f"{b / 2**20:8.1f}"
    fmt_x = lambda x: "-" if x is None else f"{x:6.2f}x"
    print("| length | backend | fwd ms | fwd+bwd ms | fwd temp MiB | fwd+bwd temp MiB | fwd speedup vs assoc "
          "| fwd+bwd speedup vs assoc | fwd+bwd temp vs assoc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows + torch_rows, key=lambda r: (r["length"], r["backend"])):
        print(f"| {r['length']} | {r['backend']} | {fmt_ms(r.get('forward_s'))} | "
              f"{fmt_ms(r.get('forward_backward_s'))} | {fmt_mb(r.get('forward_temp_bytes'))} | "
              f"{fmt_mb(r.get('forward_backward_temp_bytes'))} | {fmt_x(r.get('forward_speedup_vs_associative'))} | "
              f"{fmt_x(r.get('forward_backward_speedup_vs_associative'))} | "
              f"{fmt_x(r.get('forward_backward_temp_ratio_vs_associative'))} |")
    if torch_rows:
        print("\n| length | fastest JAX fwd | speedup vs torch selective_scan_ref fwd | "
              "fastest JAX fwd+bwd | speedup vs torch fwd+bwd |")
        print("|---|---|---|---|---|")
        for t in torch_rows:
            same = [r for r in rows if r["length"] == t["length"]]
            best_f = min(same, key=lambda r: r["forward_s"])
            line = f"| {t['length']} | {best_f['backend']} | {t['forward_s'] / best_f['forward_s']:.1f}x |"
            if "forward_backward_s" in t:
                best_b = min(same, key=lambda r: r["forward_backward_s"])
                line += f" {best_b['backend']} | {t['forward_backward_s'] / best_b['forward_backward_s']:.1f}x |"
            else:
                line += " - | - |"
            print(line)


def main(argv=None):
    args = parse_args(argv)
    if args.torch_worker:
        return torch_worker(args)
    os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}[args.device]
    load = os.getloadavg()
    report = run_jax(args)
    add_ratios(report["results"])
    torch_report = run_torch_reference(args) if args.torch_ref else None
    report.update({
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
        "shape": {"batch": args.batch, "channels": args.channels, "state": args.state, "dtype": args.dtype},
        "repeats": args.repeats, "torch_reference": torch_report,
    })
    print(f"# {report['date_utc']}  jax {report['jax_version']} on {report['device']} ({report['machine']}); "
          f"batch={args.batch} channels={args.channels} state={args.state} {args.dtype}; median of "
          f"{args.repeats}; load average {load[0]:.1f} -> {report['load_average_at_end'][0]:.1f}")
    print_table(report["results"], torch_report["results"] if torch_report else [])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
