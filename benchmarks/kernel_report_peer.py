"""The strongest peer's Mamba-1 GPU kernels on the same ruler as ours (`kernel_report.py`), compiled deviceless.

The peer is jax-linear-attention 0.1.0 (`jla`, PyPI): Mosaic GPU Mamba-1 forward and backward kernels for the
H100 (`jla.ops.mosaic_gpu.mamba1`, backward `mamba1_bwd2`). It needs Python >= 3.12 and pins jax 0.11.2 with
CUDA 13, so it lives in its own virtual environment, a benchmark-only dependency (README, "GPU kernels"):

    ~/.pyenv/versions/3.12.1/bin/python -m venv .venv-peer
    .venv-peer/bin/pip install jax-linear-attention==0.1.0 "jax[cuda13]==0.11.2" nvidia-cuda-nvdisasm
    .venv-peer/bin/pip install --no-deps -e .        # this project's parsers, without its dependencies
    .venv-peer/bin/python benchmarks/kernel_report_peer.py --target h100 --json runs/kernel_report_jla.json

This script installs nothing. It calls `jla`'s public op (`mamba1(C, B, u, delta, A)`, its argument order:
q = C, k = B, v = u) through `jax.jit` / `jax.grad` over one compile-only H100 of `targets.py`, with Mosaic GPU's
dumps on, and reads the same facts as `kernel_report.py` with the same code (`static_bound`, `floor_seconds`,
`compile_report`): registers, spills, shared memory, CTAs and CTAs per SM, instructions per element of the
per-token loops (a thread of the peer holds one channel's 16 states; its loops are unrolled, 4 tokens in the
forward and 2 in the backward, which their exponentials tell), the static bound, the floor and their ratio.
Its backward at small batch splits the sequence like ours and runs a pre-pass kernel (`mamba1_bwd_segments`),
whose bound is added to the backward row as ours is. At a length that is not a multiple of its 32-token tile
the op requires `dt_softplus=True` (it pads with delta = softplus(-1e4)); the row says so (`softplus`).
"""
import json
import os
import sys
import time

import common
import kernel_report as ours  # prepares the compile host before jax is imported
from alignmamba_jax import compile_report, targets

PEERS = {"jla": "jax-linear-attention"}
TILE = 32                                   # jla.ops.mosaic_gpu.mamba1.CHUNK: tokens per TMA tile
BLOCK_D = 128                               # jla.ops.mosaic_gpu.mamba1.BLOCK_D: channels per CTA, one a thread
KERNELS = {"fwd": "mamba1_fwd", "bwd": "mamba1_bwd2", "segments": "mamba1_bwd_segments"}


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--peer", choices=sorted(PEERS), default="jla")
    p.add_argument("--target", choices=sorted(ours.GPU_TARGETS), default="h100")
    common.add_json(p, help="write the report here")
    p.add_argument("--shapes", nargs="+", default=[ours.SHAPES], metavar="B,L,D,N,DTYPE",
                   help="scan shapes (default: kernel_report.py's)")
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"], metavar="PASS", help="fwd, bwd (default: both)")
    p.add_argument("--dump_dir", help="keep Mosaic GPU's dumps of the peer's kernels here")
    args = p.parse_args(argv)
    args.shapes, args.passes = ";".join(args.shapes), ours._items(args.passes, ",")
    return args


def peer_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PEERS["jla"])
    except PackageNotFoundError:
        raise SystemExit(f"error: {PEERS['jla']} is not installed in {sys.prefix}; run this script with the peer's "
                         f"own environment (.venv-peer/bin/python, see the README's 'GPU kernels')") from None


def build(shape, dtype, device):
    import jax
    import jax.numpy as jnp
    from jla.ops.mosaic_gpu.mamba1 import mamba1
    b, l, d, n = shape
    softplus = l % TILE != 0
    dt = jnp.dtype(dtype)
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, t, sharding=sharding)
            for s, t in [((b, l, n), dt), ((b, l, n), dt), ((b, l, d), dt), ((b, l, d), dt), ((d, n), jnp.float32)]]

    def forward(C, B, u, delta, A):
        return mamba1(C, B, u, delta, A, dt_softplus=softplus)[0]

    grad = jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
    return {"fwd": (jax.jit(forward), args), "bwd": (jax.jit(grad), args)}, softplus


def _kind(call):
    """The peer's kernel a Mosaic GPU call is, by its results: the backward has seven, the forward its output
    (rank 3) and final state (and, under differentiation, the tiles' start states), the pre-pass two rank-4."""
    ranks = [len(compile_report.shapes_in(t)[0][1]) for t in call["results"]]
    if len(ranks) >= 6:
        return "bwd"
    return "fwd" if ranks[0] == 3 else "segments"


def _launches(calls, kind):
    found = [c for c in calls if c["target"].startswith("mosaic_gpu") and _kind(c) == kind]
    n_bytes = sum(c["count"] * sum(compile_report.shape_bytes(t) for t in c["operands"] + c["results"])
                  for c in found)
    return sum(c["count"] for c in found), n_bytes


def _kernel_stats(target, sms, dump_dir, calls, kind, steps, state):
    """The compiled facts and bound of the peer's `kind` kernel (`steps`: tokens per CTA), or None where the
    program does not launch it."""
    launches, n_bytes = _launches(calls, kind)
    if not launches:
        return None
    kernel = KERNELS[kind]
    ptxas = [k for k in compile_report.ptxas_reports(dump_dir) if k["kernel"].startswith(kernel + "_mosaic")]
    ctas, threads, smem = compile_report.mosaic_gpu_launch(dump_dir, kernel + "_")
    code = compile_report.kernel_code(dump_dir, kernel + "_")
    isa = "sass" if "sass" in code else "ptx"
    counts = compile_report.instruction_counts(code[isa], isa, BLOCK_D * state // threads, iterations_per_outer=TILE)
    ptxas = ptxas[0] if ptxas else {}
    registers = ptxas.get("registers")
    bound_s, units, resident = ours.static_bound(target, sms, counts, registers, threads, smem, ctas, launches,
                                                 steps, BLOCK_D * state, n_bytes)
    return {"registers": registers, "spills": ptxas["spill_stores"] + ptxas["spill_loads"] if ptxas else None,
            "smem_bytes": smem, "threads": threads, "ctas": ctas, "launches": launches, "ctas_per_sm": resident,
            "waves": round(ctas / (resident * sms), 3), "isa": isa, "instructions_per_element": counts,
            "bound_us": {k: round(v * 1e6, 3) for k, v in units.items()}, "static_bound_us": round(bound_s * 1e6, 3)}


def report_kernel(target, device, shape, dtype, pass_name, backend, dump_root=None):
    sms = targets.GPU_SPECS[target.gpu][1]
    fns, softplus = build(shape, dtype, device)
    fn, args = fns[pass_name]
    b, l, d, n = shape
    padded = -(-l // TILE) * TILE
    with compile_report.mosaic_gpu_dumps(targets.ptxas_path()) as dump_dir:
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        calls = compile_report.kernel_calls(compiled.as_text())
        if pass_name == "fwd":
            row, extra = _kernel_stats(target, sms, dump_dir, calls, "fwd", padded, n), None
        else:
            # A backward CTA runs one segment of one (batch row, channel block): the segments are its grid's
            # third axis, which the pre-pass runs for all segments but the first.
            steps = padded // _segments(dump_dir, b, d)
            row = _kernel_stats(target, sms, dump_dir, calls, "bwd", steps, n)
            extra = _kernel_stats(target, sms, dump_dir, calls, "segments", steps, n)
        if dump_root:
            import shutil
            shutil.copytree(dump_dir, os.path.join(dump_root, f"{pass_name}_{'x'.join(map(str, shape))}_{dtype}"),
                            dirs_exist_ok=True)
    bound_us = row["static_bound_us"]
    if extra:
        row["segment_adjoints"] = extra
        bound_us += extra["static_bound_us"]
    floor_us = ours.floor_seconds(target, sms, shape, dtype, pass_name) * 1e6
    row.update({"static_bound_us": round(bound_us, 3), "floor_us": round(floor_us, 3),
                "bound_over_floor": round(bound_us / floor_us, 2), "compile_s": round(compile_s, 1)})
    if softplus:
        row["softplus"] = True
    return {"backend": backend, "pass": pass_name, "shape": list(shape), "dtype": dtype, **row}


def _segments(dump_dir, batch, channels):
    ctas, _, _ = compile_report.mosaic_gpu_launch(dump_dir, KERNELS["bwd"] + "_")
    return ctas // (batch * channels // BLOCK_D)


def main(argv=None):
    args = parse_args(argv)
    backend = f"{PEERS[args.peer]} {peer_version()}"
    target = targets.get_target(ours.GPU_TARGETS[args.target])
    device = targets.target_devices(target)[0]
    report = {"target": args.target, "peer": backend, "kernels": []}
    for shape, dtype in ours.parse_shapes(args.shapes):
        for pass_name in args.passes:
            report["kernels"].append(report_kernel(target, device, shape, dtype, pass_name, backend, args.dump_dir))
            print(ours.table({"kernels": report["kernels"][-1:]}).splitlines()[-1], flush=True)
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    print(ours.table(report))
    return report


if __name__ == "__main__":
    main()
