"""What the compiled GPU scan kernels cost, read from the compiled code on a machine without a GPU.

`python benchmarks/kernel_report.py --target h100 --json runs/kernel_report.json` compiles the Mosaic GPU
forward and backward kernels (`pallas_mosaic_gpu` through `make_backend(..., native_dtypes=True)`, the path
`selective_scan` takes) deviceless for sm_90a: jit over one compile-only H100 / H200 of `targets.py`, with
Mosaic GPU's dumps on (`compile_report.mosaic_gpu_dumps`). Needs the `aot` extra (CUDA plugin, ptxas). For each
kernel and shape it reports:

- registers per thread and spill bytes (ptxas), dynamic shared memory per CTA and threads per CTA (the kernel's
  launch in Mosaic GPU's pass log), CTAs (the grid), CTAs resident per SM (registers x threads against 64K
  registers, shared memory against 228 KiB, and the 2048-thread / 32-block limits) and waves;
- instruction counts per (token x channel x state) element of the kernel's per-token loops (the innermost
  loops with floating-point arithmetic, an unrolled one read as the tokens its exponentials say) plus the
  once-per-chunk work around them divided by the chunk (`compile_report.instruction_counts`): ex2, FP32 fma /
  mul / add, shuffles, shared and global loads and stores; from the SASS where nvdisasm sits next to ptxas (the
  nvidia-cuda-nvdisasm wheel of the `aot` extra), else from the PTX (`isa` says which; ptxas may still fuse or
  split PTX instructions);
- `static_bound_us`: a lower bound on the kernel's time, the largest of (ex2 at 16 per clock per SM, FP32 at
  128 lanes per clock per SM, both for the busiest SM, ceil(CTAs / SMs) CTAs) and the kernel's HBM operands
  and results at the device bandwidth; `floor_us`, the roofline floor of the pass (`scan_bench.scan_traffic`:
  the least HBM traffic and one exponential per element, the backward's floor being forward+backward minus
  forward), and their ratio;
- `compile_s`: seconds to compile the program (the backward's program also holds the forward kernel that saves
  the chunk-boundary states).

The split scan's backward also runs a light adjoint-only kernel before its backward kernel: its bound is added
to the backward row's and its facts kept under `segment_adjoints`. `--peer_json` prints one table with the rows
of `kernel_report_peer.py` (the peer's kernels, compiled from the peer's own venv) beside ours.

Shapes (batch, length, channels, state): the goal shape (8, 2048, 2048, 16) and the inference shape
(1, 8192, 2048, 16) in bfloat16, and the MOSEI model's (16, 150, 256, 16) in float32 (150 fused tokens,
channels = 2 x d_model 128, as configs/mosei.py trains). `--shapes` picks others (b,l,d,n,dtype;...).

`--target v5e|v6e|v5p|v4` reports the TPU kernels instead: `selective_scan(..., backend=B)` for each of
`--backends` (default pallas_tpu; `chunked` is the XLA formulation) jitted over the libtpu compile-only
topology of one chip, traced under its mesh as a training step is, with libtpu's LLO and Mosaic dumps on
(`compile_report.libtpu_dump_env`, set before libtpu initialises, so run this in a fresh process). From the
dumps (`compile_report`'s libtpu section), per Mosaic kernel of the pass (pallas_tpu: the backward row is the
backward kernel; the gradient program also runs the forward kernel that saves the chunk states):

- `grid_steps` (the kernel's grid), `bundles_per_grid_step` (the bundles of one iteration of its grid loop,
  inner loop bodies times their trip counts), `static_bundles` (its size: each loop body once), vector spill
  stores and fills per grid step (`spills` their sum), `unit_busy_pct` (the slots used per unit over one grid
  step: XLU, VALU, EUP, loads, stores, ...), `scoped_vmem_bytes` and `vmem_limit_bytes` (the kernel's own or,
  `vmem_limit_set` false, the generation's default), `code_bytes` (the compiled program's);
- `static_bound_us`: bundles executed (grid steps x bundles per step, plus the bundles outside the grid loop)
  over the TensorCore clock (`targets.TPU_CORE`; megacore chips split the grid over 2 cores), an upper bound
  where predicated regions are skipped; `floor_us`: the larger of the least HBM traffic at the chip's bandwidth
  and the exponentials at one (8, 128) vreg per clock (`scan_traffic`; the backward's floor is forward+backward
  minus forward); their ratio;
- `program_bound_us`: the same count over the whole compiled program (every fusion and kernel; for bwd the
  gradient program, forward included), the figure to compare backends by. A `chunked` row is its program:
  no grid, its `static_bound_us` is `program_bound_us`, and its backward floor is forward+backward.

A compile that fails (e.g. scoped VMEM exhausted) gets a row with its `error` and the others go on.
"""
import json
import os
import time

from alignmamba_jax import compile_report, targets

targets.prepare_compile_host()  # before jax is imported

import common  # noqa: E402
from scan_bench import EXP_PER_CLOCK_PER_SM, scan_traffic  # noqa: E402

GPU_TARGETS = {"h100": "h100x8", "h200": "h200x8"}
TPU_TARGETS = {"v4": "v4-2", "v5e": "v5e-1", "v5p": "v5p-2", "v6e": "v6e-1"}     # one chip each
TPU_SHAPES = "1,8192,1024,16,float32;8,2048,2048,16,bfloat16;16,150,256,16,float32"
SHAPES = "8,2048,2048,16,bfloat16;1,8192,2048,16,bfloat16;16,150,256,16,float32"
FP32_LANES_PER_SM = 128                   # FP32 results per clock per SM (Hopper)
BLOCK_C = 64                              # pallas_mosaic_gpu's default channels per CTA
CLOCK_HZ = 1.98e9                         # the SM clock of targets.py's GPU target configs
THREADS_PER_SM, BLOCKS_PER_SM, REGISTERS_PER_SM = 2048, 32, 65536
SHARED_MEMORY_PER_SM, SHARED_MEMORY_RESERVED_PER_BLOCK = 233472, 1024
def _items(values, separator):
    """The items of a list flag: space-separated values, each of which may hold several joined by `separator`
    (DESIGN.md's spelling, `--shapes "b,l,d,n,dtype;..."`, `--passes fwd,bwd`)."""
    return [item for value in values for item in value.split(separator) if item]


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--target", choices=sorted(GPU_TARGETS) + sorted(TPU_TARGETS), default="h100")
    common.add_json(p, help="write the report here")
    p.add_argument("--shapes", nargs="+", metavar="B,L,D,N,DTYPE",
                   help="scan shapes (default: goal, inference, MOSEI; TPU: 1,8192,1024,16,float32, goal, MOSEI)")
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"], metavar="PASS", help="fwd, bwd (default: both)")
    p.add_argument("--sm_count", type=int, help="SMs the sequence split fills (default: the target's; 0: no split)")
    p.add_argument("--dump_dir", help="keep the compilers' dumps here (Mosaic GPU: one folder a kernel; TPU: llo/ "
                                      "and mosaic/ for every compile)")
    common.add_backends(p, help="TPU targets: backends to compile, e.g. pallas_tpu chunked (default: pallas_tpu)")
    p.add_argument("--peer_json", action="append", default=[],
                   help="a report of kernel_report_peer.py to print beside ours in one table (repeatable)")
    args = p.parse_args(argv)
    args.passes = _items(args.passes, ",")
    args.backends = _items(args.backends or ["pallas_tpu"], ",")
    common.check_backends(p, args.backends)
    args.shapes = ";".join(args.shapes) if args.shapes else None
    return args


def parse_shapes(text):
    """[(shape, dtype)] of "b,l,d,n,dtype;..." (each checked by `common.scan_shape`)."""
    return [common.scan_shape(item) for item in text.split(";") if item]


def ctas_per_sm(registers, threads, smem_bytes):
    warps = -(-threads // 32)
    registers_per_warp = -(-registers * 32 // 256) * 256          # allocated in units of 256 per warp
    limits = [THREADS_PER_SM // threads, BLOCKS_PER_SM, REGISTERS_PER_SM // (registers_per_warp * warps),
              SHARED_MEMORY_PER_SM // (smem_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK)]
    return min(limits)


KERNELS = {"fwd": "selective_scan_fwd_mosaic_gpu", "bwd": "selective_scan_bwd_mosaic_gpu",
           "segment_adjoints": "selective_scan_segment_adjoints_mosaic_gpu"}


def _kind(call):
    """Which of our kernels a Mosaic GPU call in the HLO is, by its results: the backward has five (du, ddelta,
    dA, the dB/dC partials, dh0), the forward two or three (y, the final state, the chunks' start states), the
    split's adjoint pass one (each segment's start adjoint)."""
    return {1: "segment_adjoints", 2: "fwd", 3: "fwd", 5: "bwd"}.get(len(call["results"]))


def kernel_launches(kernel_calls, kind):
    """(launches, HBM bytes of their operands and results, each read or written once, time steps per CTA, padded
    state size) of our `kind` kernel (`_kind`) in the compiled HLO: the split scan launches the forward twice."""
    launches, n_bytes, steps, state = 0, 0, None, None
    for call in kernel_calls:
        if call["target"].startswith("mosaic_gpu") and _kind(call) == kind:
            launches += call["count"]
            n_bytes += call["count"] * sum(compile_report.shape_bytes(text)
                                           for text in call["operands"] + call["results"])
            steps = compile_report.shapes_in(call["operands"][0])[0][1][1]
            state = next(compile_report.shapes_in(text)[0][1][1] for text in call["operands"]
                         if len(compile_report.shapes_in(text)[0][1]) == 2)          # A, (channels, state)
    return launches, n_bytes, steps, state


def static_bound(target, sms, counts, registers, threads, smem, ctas, launches, steps, elements_per_token, n_bytes):
    """A kernel's bound from its compiled code: (seconds, {unit: seconds}, CTAs resident per SM). `steps`: tokens
    per CTA; `elements_per_token`: the (channel, state) elements of a CTA's token; `counts`: instructions per
    element."""
    busiest = launches * -(-ctas // sms) * steps * elements_per_token       # elements on the busiest SM
    units = {"exp": busiest * counts["ex2"] / (EXP_PER_CLOCK_PER_SM * CLOCK_HZ),
             "fp32": busiest * (counts["ffma"] + counts["fmul"] + counts["fadd"]) / (FP32_LANES_PER_SM * CLOCK_HZ),
             "hbm": n_bytes / target.hbm_bytes_per_s}
    return max(units.values()), units, ctas_per_sm(registers, threads, smem)


def floor_seconds(target, sms, shape, dtype, pass_name):
    """The roofline floor of the pass (`scan_bench.scan_traffic`): the least HBM traffic and one exponential per
    element; the backward's is forward+backward minus forward."""
    b, l, d, n = shape
    traffic = scan_traffic(b, l, d, n, 2 if dtype == "bfloat16" else 4)
    floor_bytes, floor_exps = traffic["forward"]
    if pass_name == "bwd":
        floor_bytes, floor_exps = (x - y for x, y in zip(traffic["forward_backward"], traffic["forward"]))
    return max(floor_bytes / target.hbm_bytes_per_s, floor_exps / (EXP_PER_CLOCK_PER_SM * sms * CLOCK_HZ))


def build(shape, dtype, device, sm_count):
    import functools

    import jax
    import jax.numpy as jnp

    from alignmamba_jax.kernels.common import make_backend
    from alignmamba_jax.kernels.pallas_mosaic_gpu import pallas_mosaic_gpu_core
    b, l, d, n = shape
    core = functools.partial(pallas_mosaic_gpu_core, interpret=False, sm_count=sm_count)
    fn = make_backend(core, "pallas_mosaic_gpu", native_dtypes=True)
    sharding = jax.sharding.SingleDeviceSharding(device)
    dt = jnp.dtype(dtype)
    args = [jax.ShapeDtypeStruct(s, t, sharding=sharding)
            for s, t in [((b, l, d), dt), ((b, l, d), dt), ((d, n), jnp.float32), ((b, l, n), dt), ((b, l, n), dt)]]
    grad = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
    return {"fwd": (jax.jit(fn), args), "bwd": (jax.jit(grad), args)}


def _kernel_stats(target, sms, dump_dir, calls, kind, chunk):
    """The compiled facts and bound of our `kind` kernel, or None where the program does not launch it."""
    kernel = KERNELS[kind]
    launches, n_bytes, steps, state = kernel_launches(calls, kind)
    if not launches:
        return None
    ptxas = [k for k in compile_report.ptxas_reports(dump_dir) if k["kernel"].startswith(kernel)]
    ctas, threads, smem = compile_report.mosaic_gpu_launch(dump_dir, kernel)
    code = compile_report.kernel_code(dump_dir, kernel)
    isa = "sass" if "sass" in code else "ptx"
    counts = compile_report.instruction_counts(code[isa], isa, BLOCK_C * state // threads,  # one thread's code
                                               iterations_per_outer=chunk)
    ptxas = ptxas[0] if ptxas else {}
    registers = ptxas.get("registers")
    bound_s, units, resident = static_bound(target, sms, counts, registers, threads, smem, ctas, launches, steps,
                                            BLOCK_C * state, n_bytes)
    return {"registers": registers, "spills": ptxas["spill_stores"] + ptxas["spill_loads"] if ptxas else None,
            "smem_bytes": smem, "threads": threads, "ctas": ctas, "launches": launches, "ctas_per_sm": resident,
            "waves": round(ctas / (resident * sms), 3), "isa": isa, "instructions_per_element": counts,
            "bound_us": {k: round(v * 1e6, 3) for k, v in units.items()}, "static_bound_us": round(bound_s * 1e6, 3)}


def report_kernel(target, device, shape, dtype, pass_name, dump_root=None, sm_count=None):
    """One row: the `pass_name` kernel's compiled facts and bound. The split scan's backward also runs the light
    adjoint pass (`segment_adjoints`): its bound is added to the row's and its facts are kept under that key."""
    from alignmamba_jax.kernels.pallas_mosaic_gpu import TUNABLES
    sms = targets.GPU_SPECS[target.gpu][1]
    fn, args = build(shape, dtype, device, sms if sm_count is None else sm_count)[pass_name]
    with compile_report.mosaic_gpu_dumps(targets.ptxas_path()) as dump_dir:
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        calls = compile_report.kernel_calls(compiled.as_text())
        row = _kernel_stats(target, sms, dump_dir, calls, pass_name, TUNABLES["chunk"])
        extra = _kernel_stats(target, sms, dump_dir, calls, "segment_adjoints", TUNABLES["chunk"])
        if dump_root:
            import shutil
            shutil.copytree(dump_dir, os.path.join(dump_root, f"{pass_name}_{'x'.join(map(str, shape))}_{dtype}"),
                            dirs_exist_ok=True)
    bound_us = row["static_bound_us"]
    if pass_name == "bwd" and extra:
        row["segment_adjoints"] = extra
        bound_us += extra["static_bound_us"]
    floor_us = floor_seconds(target, sms, shape, dtype, pass_name) * 1e6
    row.update({"static_bound_us": round(bound_us, 3), "floor_us": round(floor_us, 3),
                "bound_over_floor": round(bound_us / floor_us, 2), "compile_s": round(compile_s, 1)})
    return {"backend": "pallas_mosaic_gpu", "pass": pass_name, "shape": list(shape), "dtype": dtype, **row}


def table(report):
    lines = ["| backend | pass | shape (b, l, d, n) | dtype | registers | spills | smem B | CTAs | CTAs/SM | waves | "
             "ex2 / FP32 per element | bound us (exp / fp32 / hbm) | static bound us | floor us | bound/floor | "
             "compile s |", "|" + "---|" * 16]
    for k in report["kernels"]:
        c, bound = k["instructions_per_element"], k["bound_us"]
        notes = (["+ split pre-pass %s us" % k["segment_adjoints"]["static_bound_us"]] if "segment_adjoints" in k
                 else []) + (["softplus"] if k.get("softplus") else [])
        lines.append(f"| {k['backend']} | {k['pass']} | {tuple(k['shape'])} | {k['dtype']} | {k['registers']} | "
                     f"{k['spills']} | {k['smem_bytes']} | {k['ctas']} | {k['ctas_per_sm']} | {k['waves']} | "
                     f"{c['ex2']:g} / {c['ffma'] + c['fmul'] + c['fadd']:g} | "
                     f"{bound['exp']} / {bound['fp32']} / {bound['hbm']} | {k['static_bound_us']}"
                     f"{' (' + ', '.join(notes) + ')' if notes else ''} | {k['floor_us']} | "
                     f"{k['bound_over_floor']} | {k['compile_s']} |")
    return "\n".join(lines)


# --- TPU ------------------------------------------------------------------------------------------------------

def build_tpu(backend, shape, dtype, device):
    """{pass: (jitted function, abstract arguments)} of `selective_scan(..., backend=backend)` on one TPU device;
    the functions are traced under the device's mesh, so `selective_scan` lowers for the TPU as in training."""
    import functools

    import jax
    import jax.numpy as jnp

    from alignmamba_jax.kernels import selective_scan
    from alignmamba_jax.train import under_mesh
    b, l, d, n = shape
    mesh = jax.sharding.Mesh([device], ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    dt = jnp.dtype(dtype)
    args = [jax.ShapeDtypeStruct(s, t, sharding=sharding)
            for s, t in [((b, l, d), dt), ((b, l, d), dt), ((d, n), jnp.float32), ((b, l, n), dt), ((b, l, n), dt)]]
    fn = functools.partial(selective_scan, backend=backend)
    grad = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
    return {"fwd": (jax.jit(under_mesh(fn, mesh)), args), "bwd": (jax.jit(under_mesh(grad, mesh)), args)}


class _Dumps:
    """The files libtpu adds to the dump folders (`compile_report.libtpu_dump_env`) during one compile."""

    def __init__(self, llo_dir, mosaic_dir, keep):
        self.dirs, self.keep = (llo_dir, mosaic_dir), keep

    def _files(self):
        return [{os.path.join(d, f) for f in os.listdir(d)} if os.path.isdir(d) else set() for d in self.dirs]

    def __enter__(self):
        self.before = self._files()
        return self

    def __exit__(self, *exc):
        self.llo, self.mosaic = (sorted(after - before) for after, before in zip(self._files(), self.before))
        return False

    def remove(self):
        if not self.keep:
            for path in self.llo + self.mosaic:
                os.remove(path)


def _kernel_rows(programs, dumps, pass_name, core, limits):
    """One row of Mosaic kernel figures per kernel program of the pass."""
    rows = []
    for name in sorted(p for p in programs if p.startswith(f"selective_scan_{pass_name}")):
        kernel = compile_report.mosaic_kernel(programs, dumps.mosaic, name)
        rows.append({"kernel": name, **kernel, "spills": kernel["spill_stores"] + kernel["fills"],
                     "vmem_limit_bytes": limits.get(name, core["default_vmem_limit_bytes"]),
                     "vmem_limit_set": name in limits,
                     "static_bound_s": kernel["executed_bundles"] / (core["clock_hz"] * core["cores"])})
    return rows


def report_tpu(generation, device, backend, shape, dtype, pass_name, dumps_dirs, keep):
    """The rows of one backend's pass at one shape (one per Mosaic kernel; one for an XLA-only backend)."""
    fn, args = build_tpu(backend, shape, dtype, device)[pass_name]
    base = {"backend": backend, "pass": pass_name, "shape": list(shape), "dtype": dtype}
    with _Dumps(*dumps_dirs, keep) as dumps:
        start = time.perf_counter()
        try:
            compiled = fn.lower(*args).compile()
        except Exception as error:          # a compiler error is a finding: report it, go on
            compiled = error
        compile_s = time.perf_counter() - start
    try:
        if isinstance(compiled, Exception):
            lines = [line for line in str(compiled).splitlines() if line.strip()]
            return [{**base, "error": next((line for line in lines if "rror" in line), lines[0] if lines else
                                           type(compiled).__name__)[:300]}]
        return _tpu_rows(generation, compiled, compile_s, dumps, base, shape, dtype, pass_name)
    finally:
        dumps.remove()


def _tpu_rows(generation, compiled, compile_s, dumps, base, shape, dtype, pass_name):
    core = targets.TPU_CORE[generation]
    programs = compile_report.llo_programs(dumps.llo)
    if "TLP" not in programs:
        raise SystemExit("error: libtpu wrote no LLO dumps: LIBTPU_INIT_ARGS must be set before libtpu initialises "
                         "(run kernel_report.py in a fresh process)")
    hlo = compiled.as_text()
    cores, clock = core["cores"], core["clock_hz"]
    program = compile_report.program_cost(programs, "TLP")
    program_s = program["bundles"] / (clock * cores)
    target = targets.get_target(TPU_TARGETS[generation])
    b, l, d, n = shape
    traffic = scan_traffic(b, l, d, n, 2 if dtype == "bfloat16" else 4)
    floor_bytes, floor_exps = traffic["forward"]
    kernels = _kernel_rows(programs, dumps, pass_name, core, compile_report.vmem_limits(hlo))
    if pass_name == "bwd" and kernels:
        floor_bytes, floor_exps = (x - y for x, y in zip(traffic["forward_backward"], traffic["forward"]))
    elif pass_name == "bwd":
        floor_bytes, floor_exps = traffic["forward_backward"]
    floor_s = max(floor_bytes / target.hbm_bytes_per_s, floor_exps / (core["eup_per_clock"] * clock * cores))
    common = {"compile_s": round(compile_s, 1), "code_bytes": compiled.memory_analysis().generated_code_size_in_bytes,
              "program_bound_us": round(program_s * 1e6, 3), "floor_us": round(floor_s * 1e6, 3)}
    if not kernels:                         # an XLA formulation: the program is the kernel
        spill_stores, fills = program["units"].get("VSTORE:SPILL", 0), program["units"].get("VLOAD:FILL", 0)
        kernels = [{"kernel": None, "grid": None, "grid_steps": None, "bundles_per_grid_step": None,
                    "static_bundles": None, "spill_stores": spill_stores, "fills": fills,
                    "spills": spill_stores + fills, "unit_busy_pct": compile_report.busy_percent(program),
                    "scoped_vmem_bytes": None, "vmem_limit_bytes": None, "vmem_limit_set": False,
                    "executed_bundles": program["bundles"], "static_bound_s": program_s}]
    rows = []
    for kernel in kernels:
        bound_s = kernel.pop("static_bound_s")
        rows.append({**base, **kernel, **common, "static_bound_us": round(bound_s * 1e6, 3),
                     "bound_over_floor": round(bound_s / floor_s, 2)})
    return rows


def tpu_table(report):
    lines = ["| backend | pass | shape (b, l, d, n) | dtype | grid steps | bundles / step | spills (st + fill) | "
             "busy % XLU / VALU / EUP | scoped VMEM / limit MiB | code KiB | static bound us | floor us | "
             "bound/floor | program bound us | compile s |", "|" + "---|" * 15]
    for k in report["kernels"]:
        head = f"| {k['backend']} | {k['pass']} | {tuple(k['shape'])} | {k['dtype']} |"
        if "error" in k:
            lines.append(f"{head} error: {k['error']} |" + " |" * 10)
            continue
        busy = k["unit_busy_pct"]
        vmem = (f"{k['scoped_vmem_bytes'] / 2 ** 20:.2f} / {k['vmem_limit_bytes'] / 2 ** 20:g}"
                + ("" if k["vmem_limit_set"] else " (default)")) if k["scoped_vmem_bytes"] is not None else "-"
        lines.append(f"{head} {k['grid_steps'] or '-'} | {k['bundles_per_grid_step'] or '-'} | "
                     f"{k['spill_stores']} + {k['fills']} | {busy.get('XLU', 0)} / {busy.get('VALU', 0)} / "
                     f"{busy.get('EUP', 0)} | {vmem} | {k['code_bytes'] / 1024:.0f} | {k['static_bound_us']} | "
                     f"{k['floor_us']} | {k['bound_over_floor']} | {k['program_bound_us']} | {k['compile_s']} |")
    return "\n".join(lines)


def tpu_main(args):
    """The TPU report: dumps on before libtpu starts, then every backend, shape and pass compiled in turn."""
    import tempfile
    root = args.dump_dir or tempfile.mkdtemp(prefix="kernel_report_tpu_")
    dumps_dirs = (os.path.join(root, "llo"), os.path.join(root, "mosaic"))
    os.environ.update(compile_report.libtpu_dump_env(*dumps_dirs))
    target = targets.get_target(TPU_TARGETS[args.target])
    device = targets.target_devices(target)[0]
    report = {"target": args.target, "kernels": []}
    try:
        for shape, dtype in parse_shapes(args.shapes or TPU_SHAPES):
            for backend in args.backends:
                for pass_name in args.passes:
                    rows = report_tpu(args.target, device, backend, shape, dtype, pass_name, dumps_dirs,
                                      keep=bool(args.dump_dir))
                    report["kernels"].extend(rows)
                    for line in tpu_table({"kernels": rows}).splitlines()[2:]:
                        print(line, flush=True)
                    if args.json:
                        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                        with open(args.json, "w") as f:
                            json.dump(report, f, indent=1)
    finally:
        if not args.dump_dir:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    print(tpu_table(report))
    return report


def side_by_side(report, others):
    """`report`'s rows and those of other reports of the same target (`kernel_report_peer.py`'s JSON), ordered
    by shape and pass, ours first: one table."""
    rows = list(report["kernels"])
    for other in others:
        if other["target"] != report["target"]:
            raise SystemExit(f"error: {other.get('peer', 'a report')} is for {other['target']}, this run for "
                             f"{report['target']}")
        rows += other["kernels"]
    shapes = []
    for k in rows:
        if (tuple(k["shape"]), k["dtype"]) not in shapes:
            shapes.append((tuple(k["shape"]), k["dtype"]))
    rows.sort(key=lambda k: (shapes.index((tuple(k["shape"]), k["dtype"])), k["pass"] != "fwd",
                             k["backend"] != "pallas_mosaic_gpu"))
    return {"target": report["target"], "kernels": rows}


def main(argv=None):
    args = parse_args(argv)
    if args.target in TPU_TARGETS:
        return tpu_main(args)
    args.shapes = args.shapes or SHAPES
    target = targets.get_target(GPU_TARGETS[args.target])
    device = targets.target_devices(target)[0]
    report = {"target": args.target, "kernels": []}
    for shape, dtype in parse_shapes(args.shapes):
        for pass_name in args.passes:
            report["kernels"].append(report_kernel(target, device, shape, dtype, pass_name, args.dump_dir,
                                                    args.sm_count))
            print(table({"kernels": report["kernels"][-1:]}).splitlines()[-1], flush=True)
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    peers = []
    for path in args.peer_json:
        with open(path) as f:
            peers.append(json.load(f))
    print(table(side_by_side(report, peers)))
    return report


if __name__ == "__main__":
    main()
