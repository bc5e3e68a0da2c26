"""Loading a MOSEI-sized MMSA pickle: wall time and peak resident memory, relative to the file's size.

    python benchmarks/load_bench.py --workdir /tmp/load_bench [--train 16326 --valid 64 --test 64]
        [--modes pickle_load inmemory convert mmap tfds_build grain_epoch] [--full_pass]

Writes a MOSEI-shaped unaligned_50.pkl (exact MMSA layout, pickle protocol 4: text 50x768, audio 500x74 with
-inf entries, vision 500x35, lengths, ids; random content) and measures each mode in a fresh subprocess:
  pickle_load   pickle.load of the file, what MMSA's loader does (baseline)
  inmemory      load_mmsa_pickle(path): contract arrays in memory
  convert       load_mmsa_pickle(path, cache_dir): first call, spills arrays to .npy, returns memory maps
  mmap          load_mmsa_pickle(path, cache_dir): later calls, memory-maps the converted files
  tfds_build    tfds_builders.prepare("mosei", ...): array_record build from the pickle (no TensorFlow)
  grain_epoch   one epoch of grain batches (32) of the train split from the built array_record files
"peak RSS" is the process's ru_maxrss: it counts file-backed pages of memory maps that were touched (which
the kernel can drop under pressure); "anon at end" is resident minus file-backed/shared memory at the end.
"+pass" rows also read every feature value once after loading (what one training epoch touches).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

import common

MODES = ("pickle_load", "inmemory", "convert", "mmap", "tfds_build", "grain_epoch")


def _touch_all(splits):
    total = 0.0
    for split in splits.values():
        for key, arr in split.items():
            if isinstance(arr, np.ndarray) and arr.dtype == np.float32:
                for start in range(0, arr.shape[0], 256):
                    total += float(np.asarray(arr[start:start + 256], np.float64).sum())
    return total


def _peak_rss():
    """This process's peak resident set (VmHWM: per address space, so unlike ru_maxrss not inherited from the
    parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode, path, workdir, full_pass):
    """Run one mode in this (fresh) process; returns seconds and memory figures."""
    import psutil
    from alignmamba_jax.data import load_mmsa_pickle
    if mode in ("tfds_build", "grain_epoch"):
        from alignmamba_jax.data import grain_pipeline, tfds_builders

    cache = os.path.join(workdir, "cache")
    tfds_dir = os.path.join(workdir, "tfds")
    manual = os.path.join(tfds_dir, "downloads", "manual")
    if mode in ("tfds_build", "grain_epoch") and not os.path.exists(os.path.join(manual, "unaligned_50.pkl")):
        os.makedirs(manual, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(manual, "unaligned_50.pkl"))
    start = time.perf_counter()
    if mode == "pickle_load":
        with open(path, "rb") as f:
            splits = pickle.load(f, encoding="latin1")
        splits = {s: {k: v for k, v in d.items() if isinstance(v, np.ndarray)} for s, d in splits.items()}
    elif mode == "inmemory":
        splits = load_mmsa_pickle(path)
    elif mode in ("convert", "mmap"):
        splits = load_mmsa_pickle(path, cache_dir=cache)
    elif mode == "tfds_build":
        tfds_builders.prepare("mosei", tfds_dir)
        splits = {}
    elif mode == "grain_epoch":
        source = tfds_builders.prepare("mosei", tfds_dir).as_data_source()["train"]
        n = 0
        for batch in grain_pipeline.make_loader(source, 32, seed=0, process_index=0, process_count=1):
            n += batch["labels"].shape[0]
        splits = {}
    else:
        raise ValueError(f"--modes: unknown mode {mode!r}; expected names from {MODES}")
    seconds = time.perf_counter() - start
    if full_pass:
        _touch_all(splits)
    mem = psutil.Process().memory_info()
    return {"seconds": seconds, "peak_rss": _peak_rss(),
            "anon_end": mem.rss - mem.shared}


def _run_child(mode, path, workdir, full_pass):
    if mode == "convert":
        shutil.rmtree(os.path.join(workdir, "cache"), ignore_errors=True)
    cmd = [sys.executable, __file__, "--measure", mode, "--file", path, "--workdir", workdir]
    if full_pass:
        cmd.append("--full_pass")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _baseline_rss():
    """Peak RSS of a fresh process of this script that imports what every mode imports, and loads nothing."""
    out = subprocess.run([sys.executable, __file__, "--baseline"], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--workdir", default="/tmp/alignmamba_load_bench")
    parser.add_argument("--train", type=int, default=16326)
    parser.add_argument("--valid", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["convert", "mmap", "inmemory", "pickle_load"])
    parser.add_argument("--full_pass", action="store_true", help="also measure load + one read of every value")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    common.add_json(parser)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        import psutil  # noqa: F401  (what measure() imports, for the baseline)
        import alignmamba_jax.data  # noqa: F401
        print(_peak_rss())
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.file, args.workdir, args.full_pass)))
        return

    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "unaligned_50.pkl")
    if not os.path.exists(path):
        scratch = os.path.join(args.workdir, "scratch")
        os.makedirs(scratch, exist_ok=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from alignmamba_jax.data import layouts;"
                        "layouts.write_mmsa_pickle(sys.argv[1], 'mosei', False, tuple(map(int, sys.argv[2:5])),"
                        " seed=0, scratch_dir=sys.argv[5])", path + ".tmp", str(args.train), str(args.valid),
                        str(args.test), scratch], check=True)
        os.replace(path + ".tmp", path)
        shutil.rmtree(scratch)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    size = os.path.getsize(path)
    shutil.rmtree(os.path.join(args.workdir, "cache"), ignore_errors=True)
    baseline = _baseline_rss()
    rows = []
    for mode in args.modes:
        for full_pass in ((False, True) if args.full_pass and mode not in ("tfds_build", "grain_epoch")
                          else (False,)):
            r = _run_child(mode, path, args.workdir, full_pass)
            rows.append((mode + (" +pass" if full_pass else ""), r))
            print(f"{rows[-1][0]:<18} {r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / 2**30:6.2f} GiB "
                  f"({r['peak_rss'] / size:4.2f}x file)  anon at end {r['anon_end'] / 2**30:6.2f} GiB",
                  file=sys.stderr)
    gib = 2 ** 30
    lines = [f"MOSEI-shaped unaligned_50.pkl: {args.train}/{args.valid}/{args.test} samples, file "
             f"{size / gib:.2f} GiB; interpreter + imports baseline RSS {baseline / gib:.2f} GiB.", "",
             "| mode | time (s) | peak RSS (GiB) | peak RSS / file size | anon RSS at end (GiB) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / gib:.2f} | {r['peak_rss'] / size:.2f} | "
              f"{r['anon_end'] / gib:.2f} |" for name, r in rows]
    print("\n".join(lines))
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB RAM, Python "
          f"{platform.python_version()}, numpy {np.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"file_bytes": size, "baseline_rss": baseline,
                       "rows": [{"mode": name, **r} for name, r in rows]}, f, indent=1)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
