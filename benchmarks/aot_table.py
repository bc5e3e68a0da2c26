"""Per-device memory, FLOPs and collectives of the training step compiled for TPU slices and GPU nodes.

RESULTS.md's "Compiled for hardware we do not have" tables, from one command.

    python benchmarks/aot_table.py --configs configs/mosi.py configs/mosei.py \
        --targets v4-8 v5e-16 v5p-32 v5e-256 h100x8 h200x8 h100x16 --json aot_table.json [--max_batch]

Each (config, target) compiles in its own process (`python -m alignmamba_jax.aot`, needs the `aot` extra), so one
that fails or does not fit is a row that says so and the others still run. Prints two markdown tables: per
device memory, the largest batch per device that fits (with --max_batch), FLOPs, the roofline time,
collective bytes and compile time; and the GPU kernels' registers, spills and shared memory.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_one(config, target, max_batch, overrides, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        command = [sys.executable, "-m", "alignmamba_jax.aot", "--config", config, "--target", target,
                   "--json", out, *overrides] + (["--max_batch"] if max_batch else [])
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"config": config, "target": target, "error": f"timed out after {timeout} s"}
        if done.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return {"config": config, **json.load(f)}
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"config": config, "target": target, "error": lines[-1],
                "wall_s": round(time.perf_counter() - start, 1)}


def _mib(n):
    return f"{n / 2 ** 20:.1f}"


def _scaled(value, factor, digits):
    """n/a where XLA gave no cost analysis (XLA:GPU without a device)."""
    return "n/a" if value is None else f"{value * factor:.{digits}f}"


def markdown(rows) -> str:
    lines = ["| config | target | global batch | peak / HBM per device (GiB) | fits | max batch per device | "
             "GFLOP per device | roofline (ms) | collectives (MiB per device) | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = os.path.basename(r["config"])
        if "error" in r:
            lines.append(f"| {name} | {r['target']} | | | | | | | {r['error']} | |")
            continue
        mem = r["per_device"]
        collectives = ", ".join(f"{op} {_mib(c['bytes'])}" for op, c in sorted(r["collectives"].items())) or "none"
        lines.append(f"| {name} | {r['target']} | {r['global_batch']} | {mem['peak_bytes'] / 2 ** 30:.2f} / "
                     f"{mem['hbm_bytes'] / 2 ** 30:.1f} | {'yes' if mem['fits'] else 'no'} | "
                     f"{r.get('max_batch_per_device', '')} | {_scaled(r['flops_per_device'], 1e-9, 1)} | "
                     f"{_scaled(r['roofline_s'], 1e3, 2)} | {collectives} | {r['compile_s']} |")
    kernels = [(r, k) for r in rows if "error" not in r for k in r.get("gpu_kernels", [])]
    if kernels:
        lines += ["", "| config | target | kernel | registers | spill stores / loads (B) | smem (B) |",
                  "|---|---|---|---|---|---|"]
        seen = set()
        for r, k in kernels:
            key = (os.path.basename(r["config"]), r["target"], k["kernel"])
            if key not in seen:
                seen.add(key)
                lines.append(f"| {key[0]} | {key[1]} | {k['kernel']} | {k['registers']} | {k['spill_stores']} / "
                             f"{k['spill_loads']} | {k['smem_bytes']} |")
    return "\n".join(lines)


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["configs/mosi.py", "configs/mosei.py"])
    parser.add_argument("--targets", nargs="+",
                        default=["v4-8", "v5e-16", "v5p-32", "v5e-256", "h100x8", "h200x8", "h100x16"])
    parser.add_argument("--max_batch", action="store_true", help="also find the largest batch per device that fits")
    parser.add_argument("--set", action="append", default=[],
                        help="a config override, repeatable: --set=--config.train.fsdp=2 --set=--config.seed=1")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per (config, target)")
    common.add_json(parser, help="write the rows here (rewritten after each row)")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        for target in args.targets:
            rows.append(compile_one(config, target, args.max_batch, args.set, args.timeout))
            print(f"{config} {target}: {rows[-1].get('error', 'compiled')}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": rows}, f, indent=1)
    print(markdown(rows))
    return 1 if any("error" in r and not r["error"].startswith("error: does not fit") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
