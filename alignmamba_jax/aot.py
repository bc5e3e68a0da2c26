"""Compile-only check before renting hardware: `python -m alignmamba_jax.aot --config CONFIG[:variant] --target T`.

Compiles the real training step and eval step, with the real shardings, for a TPU slice or a GPU node this
machine does not have (`targets.py`), from abstract inputs: nothing is allocated and no data is read (input
shapes come from the data config; MMSA / MulT / TFDS data take the MOSI / MOSEI layouts of
`data/layouts.py`). It reports per device: memory against HBM, FLOPs and the roofline time from XLA's cost
analysis, every collective with its bytes, and every Pallas kernel call with its operand shapes (on GPU also the
Mosaic GPU kernels' registers, spills and shared memory from ptxas). A step that does not fit exits with status
1 and one line; `--max_batch` finds the largest batch per device that fits, searching over compiles
(`largest_fitting`: a few compiles, since memory grows about linearly with the batch).

    python -m alignmamba_jax.aot --config configs/mosei.py --target v5e-16 --json aot.json [--hlo_dir DIR]
"""
from alignmamba_jax import targets

targets.prepare_compile_host()  # before jax is imported: CPU stays the default backend

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from alignmamba_jax import compile_report, workdir  # noqa: E402
from alignmamba_jax.cli import parse_flags  # noqa: E402
from alignmamba_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined when run as a program, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_string("target", None, f"Accelerator to compile for: {', '.join(targets.TARGETS)}.")
    flags.DEFINE_string("json", None, "Write the report here as JSON.")
    flags.DEFINE_string("hlo_dir", None, "Write the optimized HLO text of each compiled program here (*.txt).")
    flags.DEFINE_bool("max_batch", False, "Also find the largest batch per device that fits (a search over "
                                          "compiles, each reported as it finishes).")
    flags.mark_flags_as_required(["config", "target"])

def input_shapes(data_config) -> dict:
    """{modality: (T, d)} of the data the config trains on, without reading it."""
    from alignmamba_jax.data import layouts, synthetic
    name = data_config.name
    if name == "synthetic":
        tiny = data_config.synthetic.copy_and_resolve_references()
        tiny.update(n_train=2, n_valid=2, n_test=2)
        generate = synthetic.generate_image_text if data_config.task == "classification" else \
            synthetic.generate_sentiment
        split = generate(tiny)["train"]
        return {m: tuple(split[m].shape[1:]) for m in data_config.modalities}
    if name in ("mmsa", "mult", "tfds"):
        text = (data_config.tfds_name if name == "tfds" else data_config.path).lower()
        dataset = "mosei" if "mosei" in text else "mosi"   # MMSA's own folders: MOSI/..., MOSEI/...
        base = os.path.basename(data_config.path).lower()
        if name == "mult":
            aligned, table = "noalign" not in base, layouts.MULT_SHAPES
        else:
            aligned = (data_config.tfds_config if name == "tfds" else base).startswith("aligned")
            table = layouts.MMSA_SHAPES
        shapes = table[(dataset, aligned)]
        return {m: shapes[m] for m in data_config.modalities}
    raise UserError(f"data.name={name!r}: the aot check knows the shapes of synthetic, mmsa, mult and tfds data; "
                    f"for {name!r} compile with the data at hand (python -m alignmamba_jax.main)")


def abstract_batch(config, shapes, global_batch, sharding) -> dict:
    import jax
    import jax.numpy as jnp
    batch = {}
    for m, (t, d) in shapes.items():
        batch[m] = jax.ShapeDtypeStruct((global_batch, t, d), jnp.float32, sharding=sharding)
        batch[m + "_mask"] = jax.ShapeDtypeStruct((global_batch, t), jnp.bool_, sharding=sharding)
    label_dtype = jnp.float32 if config.data.task == "regression" else jnp.int32
    batch["labels"] = jax.ShapeDtypeStruct((global_batch,), label_dtype, sharding=sharding)
    batch["weights"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=sharding)
    return batch


def lower_programs(config, devices, shapes, train_batch, eval_batch) -> dict:
    """{"train_step": lowered, "eval_step": lowered} for the mesh over `devices`."""
    from alignmamba_jax import train
    mesh = train.create_mesh(config.train.fsdp, devices)
    model = train.create_model(config, shapes)
    features, masks = train.shaped_example_inputs(config, shapes)
    _, state, state_shardings = train.abstract_train_state(config, model, features, masks, mesh)
    rows = train.batch_sharding(mesh)
    train_step = train.jit_train_step(config, mesh, state_shardings)
    eval_step = train.jit_eval_step(mesh, model.apply, tuple(config.data.modalities))
    return {"train_step": train_step.lower(state, abstract_batch(config, shapes, train_batch, rows)),
            "eval_step": eval_step.lower(state.params, abstract_batch(config, shapes, eval_batch, rows))}


def available_bytes(target) -> int:
    """HBM a program may use per device: all of it on TPU (XLA:TPU rejects more at compile time); on GPU the
    share JAX's allocator preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
    if target.platform == "tpu":
        return target.hbm_bytes
    return int(target.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))


# XLA:TPU's ways of saying a program does not fit: (required, unit, available, unit)
_TPU_OOM = (re.compile(r"required for .*?\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
            re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))


def _scaled(value, unit) -> int:
    return int(float(value) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit])


def memory(compiled, target) -> dict:
    stats = compiled.memory_analysis()
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temp, code, alias = stats.temp_size_in_bytes, stats.generated_code_size_in_bytes, stats.alias_size_in_bytes
    peak = getattr(stats, "peak_memory_in_bytes", 0) or (arguments + outputs - alias + temp)
    peak = max(peak, arguments + outputs - alias + temp) + code
    return {"argument_bytes": arguments, "output_bytes": outputs, "temp_bytes": temp, "code_bytes": code,
            "alias_bytes": alias, "peak_bytes": peak, "hbm_bytes": available_bytes(target),
            "fits": peak <= available_bytes(target)}


def _analysis(stage) -> dict:
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return analysis or {}


def cost(compiled) -> dict:
    """FLOPs, bytes and transcendentals per device from XLA's cost analysis of the compiled program (Pallas
    kernels count through their cost estimates), None where XLA gives none: XLA:GPU compiling without a device
    reports no cost analysis."""
    analysis = _analysis(compiled)
    if not analysis:
        return {"flops": None, "bytes_accessed": None, "transcendentals": None}
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0))}


def roofline_s(flops, target):
    """The step's time at the device's peak bf16 FLOP/s or HBM bandwidth, whichever binds (None without a cost)."""
    if flops["flops"] is None:
        return None
    return max(flops["flops"] / target.peak_flops, flops["bytes_accessed"] / target.hbm_bytes_per_s)


class DoesNotFit(Exception):
    def __init__(self, required, available):
        super().__init__(f"needs {required} bytes of {available}")
        self.required, self.available = required, available


# Compiling without a device, XLA:GPU cannot autotune, and its default tiling of a Triton GEMM fusion fails on
# small contracting dimensions (the mixer's dt_proj, K = dt_rank = 4): dots go to cuBLAS instead, as they would
# after autotuning chose it; the program's memory and collectives do not change.
_COMPILER_OPTIONS = {"tpu": {}, "cuda": {"xla_gpu_enable_triton_gemm": False}}


def compile_program(lowered, target):
    """(compiled, memory); raises DoesNotFit when the program needs more than the device's HBM."""
    try:
        compiled = lowered.compile(compiler_options=_COMPILER_OPTIONS[target.platform] or None)
    except Exception as error:  # noqa: BLE001  (XLA:TPU reports HBM overflow as a compile error)
        match = next(filter(None, (pattern.search(str(error)) for pattern in _TPU_OOM)), None)
        if match is None:
            raise
        raise DoesNotFit(_scaled(*match.groups()[:2]), _scaled(*match.groups()[2:])) from None
    mem = memory(compiled, target)
    if not mem["fits"]:
        raise DoesNotFit(mem["peak_bytes"], mem["hbm_bytes"])
    return compiled, mem


def compile_programs(config, target, devices, shapes, train_batch, hlo_dir=None) -> dict:
    """Compiles both programs at a global training batch of `train_batch`; raises DoesNotFit."""
    eval_batch = config.eval.batch_size
    start = time.perf_counter()
    dumps = compile_report.mosaic_gpu_dumps() if target.platform == "cuda" else contextlib.nullcontext()
    with dumps as dump_dir:
        lowered = lower_programs(config, devices, shapes, train_batch, eval_batch)
        programs = {}
        for name, program in lowered.items():
            compiled, mem = compile_program(program, target)
            hlo = compiled.as_text()
            if hlo_dir:
                os.makedirs(hlo_dir, exist_ok=True)
                with open(os.path.join(hlo_dir, f"{name}.txt"), "w") as f:
                    f.write(hlo)
            flops = cost(compiled)
            programs[name] = {"per_device": mem, **flops, "collectives": compile_report.collectives(hlo),
                              "kernels": compile_report.kernel_calls(hlo),
                              "roofline_s": roofline_s(flops, target)}
        gpu_kernels = compile_report.ptxas_reports(dump_dir) if dump_dir else []
    step = programs["train_step"]
    report = {"target": target.name, "platform": target.platform, "devices": len(devices),
              "hosts": target.hosts, "mesh": {"data": len(devices) // config.train.fsdp, "fsdp": config.train.fsdp},
              "global_batch": train_batch, "batch_per_device": train_batch // len(devices),
              "eval_batch": eval_batch, "scan_backend": config.model.scan_backend,
              "compile_s": round(time.perf_counter() - start, 1), "flops_per_device": step["flops"],
              "roofline_s": step["roofline_s"], "collectives": step["collectives"], "kernels": step["kernels"],
              "per_device": {**step["per_device"],
                             "fits": all(p["per_device"]["fits"] for p in programs.values())},
              "programs": programs}
    if target.platform == "cuda":
        report["gpu_kernels"] = gpu_kernels
    return report


def largest_fitting(probe, start: int, limit: int = 2 ** 20) -> int:
    """The largest n in [1, limit] that fits (0 if not even 1 does), for a monotone `probe(n)` -> (fits,
    required bytes, available bytes).

    The bytes only choose where to probe next; `fits` decides. Each probe goes where the line through the two
    nearest probes meets the available bytes. Device memory grows about linearly with the batch, so a handful
    of compiles finds the exact answer. Two safeguards keep the worst case logarithmic: before the answer is
    bracketed, after two such line probes on the same side the next one doubles (or halves) instead; after, a
    probe that did not halve the bracket is followed by a bisection step."""
    seen = {}  # n -> (required, available)
    low, high = 0, limit + 1  # low fits (0: nothing known to), high does not (limit + 1: past the search)
    n, streak = max(1, min(start, limit)), 0
    while high - low > 1:
        fits, required, available = probe(n)
        seen[n] = (required, available)
        width = high - low
        low, high = (n, high) if fits else (low, n)
        bracketed = low > 0 and high <= limit
        careful = 2 * (high - low) > width if bracketed else streak >= 2
        n, by_line = _next_probe(seen, low, high, limit, careful)
        streak = streak + 1 if by_line and not bracketed else 0
    return low


def _next_probe(seen, low, high, limit, careful):
    """(n, whether the line chose it): where the line through the probes nearest the boundary meets the
    available bytes, kept inside (low, high); `careful`, or without a line, twice / half the nearest probe
    on a side not yet bracketed, the middle of a bracket."""
    bracketed = low > 0 and high <= limit
    if bracketed:
        points = (low, high)
    elif low > 0:  # everything probed fits: the two largest
        points = tuple(sorted(seen)[-2:])
    else:  # nothing probed fits: the two smallest
        points = tuple(sorted(seen)[:2])
    guess = None
    if len(points) == 2 and not careful:
        (a, (ra, _)), (b, (rb, _)) = [(m, seen[m]) for m in points]
        available = min(av for _, av in seen.values())  # XLA:TPU refuses a little below the HBM size
        if rb > ra and math.isfinite(ra) and math.isfinite(rb):
            guess = math.floor(a + (available - ra) * (b - a) / (rb - ra))
    if guess is None:
        n = (low + high) // 2 if bracketed else min(limit, 2 * low) if low > 0 else high // 2
        return max(1, n), False
    return min(high - 1, limit, max(low + 1, guess)), True


def largest_batch_per_device(config, target, devices, shapes, start: int, known=None) -> int:
    """The largest training batch per device that fits, one compile of the training step per probe, each
    reported on stderr as it finishes. `known` = (fits, required, available) of the training step already
    compiled at `start` per device."""
    results = {} if known is None else {start: known}

    def probe(per_device):
        if per_device in results:
            return results[per_device]
        began = time.perf_counter()
        lowered = lower_programs(config, devices, shapes, per_device * len(devices), config.eval.batch_size)
        try:
            _, mem = compile_program(lowered["train_step"], target)
            fits, required, available = True, mem["peak_bytes"], mem["hbm_bytes"]
        except DoesNotFit as error:
            fits, required, available = False, error.required, error.available
        print(f"  batch {per_device} per device: {'fits' if fits else 'does not fit'}, {_gib(required)} of "
              f"{_gib(available)} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
        return fits, required, available

    return largest_fitting(probe, start)


def _gib(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def check_output(flag, path, kind) -> None:
    """A UserError unless `path` can be written as a `kind` ("file" or "directory"): checked before compiling,
    which can take minutes."""
    path = workdir.check_writable(path, flag, kind)
    if kind == "file" and os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"--{flag}={path}: this file is not writable")


def run(config, target_name, json_path=None, hlo_dir=None, max_batch=False) -> dict:
    for flag, path, kind in (("json", json_path, "file"), ("hlo_dir", hlo_dir, "directory")):
        if path:
            check_output(flag, path, kind)
    target = targets.get_target(target_name)
    shapes = input_shapes(config.data)
    batch = config.train.batch_size
    if batch % target.chips or config.eval.batch_size % target.chips:   # before libtpu or XLA:GPU starts up
        raise UserError(f"train.batch_size={batch} and eval.batch_size={config.eval.batch_size} must divide by "
                        f"the {target.chips} devices of {target.name}")
    devices = targets.target_devices(target)
    try:
        report = compile_programs(config, target, devices, shapes, batch, hlo_dir)
    except DoesNotFit as error:
        largest = (f"the largest batch per device that fits is "
                   f"{largest_batch_per_device(config, target, devices, shapes, batch // len(devices) // 2)}"
                   if max_batch else "rerun with --max_batch for the largest batch per device that fits")
        raise UserError(f"does not fit: global batch {batch} ({batch // len(devices)} per device) needs "
                        f"{_gib(error.required)} per device, {target.name} has {_gib(error.available)}; "
                        f"{largest}") from None
    if max_batch:
        mem = report["programs"]["train_step"]["per_device"]
        report["max_batch_per_device"] = largest_batch_per_device(config, target, devices, shapes,
                                                                  report["batch_per_device"],
                                                                  (True, mem["peak_bytes"], mem["hbm_bytes"]))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def summary(report) -> str:
    mem = report["per_device"]
    lines = [f"{report['target']} ({report['devices']} {report['platform']} devices, mesh {report['mesh']}): "
             f"global batch {report['global_batch']}, compiled in {report['compile_s']} s",
             f"  per device: peak {_gib(mem['peak_bytes'])} of {_gib(mem['hbm_bytes'])} "
             f"({'fits' if mem['fits'] else 'DOES NOT FIT'}), " + (
                 "no cost analysis (XLA:GPU gives none without a device)" if report["flops_per_device"] is None else
                 f"{report['flops_per_device'] / 1e9:.2f} GFLOP, roofline {report['roofline_s'] * 1e3:.3f} ms")]
    for op, c in sorted(report["collectives"].items()):
        lines.append(f"  {op}: {c['count']} ops, {c['bytes'] / 2 ** 20:.2f} MiB")
    for k in report["kernels"]:
        lines.append(f"  kernel {k['name']} x{k['count']}: {', '.join(k['operands'])}")
    for k in report.get("gpu_kernels", []):
        lines.append(f"  ptxas {k['kernel']}: {k['registers']} registers, {k['spill_stores']} B spill stores, "
                     f"{k['smem_bytes']} B smem")
    if "max_batch_per_device" in report:
        lines.append(f"  largest batch per device that fits: {report['max_batch_per_device']}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        report = run(FLAGS.config, FLAGS.target, FLAGS.json, FLAGS.hlo_dir, FLAGS.max_batch)
    except UserError as error:
        sys.stdout.flush()
        raise SystemExit(f"error: {error}")
    print(summary(report))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
