"""Reading compiled programs: what XLA and the kernel compilers produced, as plain data.

One home for every parser of compiler output, used by `aot.py` (the training step compiled for a slice or a node)
and `benchmarks/kernel_report.py` (the scan kernels alone):

- optimized HLO text: `shape_bytes`, `shapes_in`, `collectives` (each collective with its result bytes) and
  `kernel_calls` (each Pallas / Mosaic custom call with its operand and result shapes);
- Mosaic GPU: `mosaic_gpu_dumps` (a folder the compiler fills with PTX, ptxas reports and, where nvdisasm is
  installed, SASS), `ptxas_reports` (registers, spills, shared memory), `mosaic_gpu_launch` (grid, threads and
  dynamic shared memory of a kernel's launch) and `instruction_counts` (per-element instruction classes of a
  kernel's inner loops, from SASS or PTX).

Nothing here compiles; every function takes text or a folder of dumps.
"""
import contextlib
import os
import re
import tempfile

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton", "triton_kernel_call")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")


# --- optimized HLO text ---------------------------------------------------------------------------------------

def shapes_in(text) -> list:
    """[(HLO dtype, dims tuple)] of every array type written in `text`, e.g. "f32[8,128]" -> ("f32", (8, 128))."""
    return [(dtype, tuple(int(d) for d in filter(None, dims.split(",")))) for dtype, dims in _SHAPE.findall(text)]


def shape_bytes(text) -> int:
    """Bytes of all the array types written in `text` (an HLO type such as "(f32[8,128], bf16[4])")."""
    total = 0
    for dtype, dims in shapes_in(text):
        n = 1
        for d in dims:
            n *= d
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _type_texts(text) -> list:
    return [f"{dtype}[{dims}]" for dtype, dims in _SHAPE.findall(text)]


def collectives(hlo: str) -> dict:
    """{op: {"count", "bytes"}} of the collectives in optimized HLO text (bytes: the results', per device)."""
    found = {}
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match is None:
            continue
        entry = found.setdefault(match.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += shape_bytes(match.group(1))
    return found


def _definitions(hlo: str) -> dict:
    """{instruction name: its result type text} of every instruction in optimized HLO text."""
    return dict(re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+[\w\-]+\(", hlo, re.M))


def kernel_calls(hlo: str) -> list:
    """Each distinct Pallas / Mosaic kernel call in optimized HLO text: name, custom-call target, operand and
    result types (e.g. "bf16[8,2048,128]"), how often it occurs."""
    definitions = None
    calls = {}
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None or target.group(1) not in KERNEL_TARGETS:
            continue
        result, _, rest = line.partition("custom-call(")
        operand_text = rest.split(")", 1)[0]
        operands = _type_texts(operand_text)
        if not operands:  # scheduled HLO names its operands without their types
            definitions = definitions if definitions is not None else _definitions(hlo)
            operands = [shape for name in re.findall(r"%([\w.\-]+)", operand_text)
                        for shape in _type_texts(definitions.get(name, ""))[:1]]
        names = re.findall(r"(selective_scan\w*)", line)   # the kernel's own name comes last in its op_name
        op_name = re.search(r'op_name="([^"]+)"', line)
        label = names[-1] if names else (op_name.group(1).rsplit("/", 1)[-1] if op_name else target.group(1))
        label = re.sub(r"\.\d+$", "", label)
        key = (label, target.group(1), tuple(operands), tuple(_type_texts(result.split("=", 1)[-1])))
        calls[key] = calls.get(key, 0) + 1
    return [{"name": k[0], "target": k[1], "operands": list(k[2]), "results": list(k[3]), "count": n}
            for k, n in calls.items()]


# --- Mosaic GPU -----------------------------------------------------------------------------------------------

def _nvdisasm_beside(ptxas) -> bool:
    return ptxas is not None and os.path.exists(os.path.join(os.path.dirname(ptxas), "nvdisasm"))


@contextlib.contextmanager
def mosaic_gpu_dumps(ptxas=None):
    """A folder that Mosaic GPU fills with its kernels' PTX and ptxas reports while compiling; also SASS where
    nvdisasm sits beside `ptxas` (the path of the ptxas in use, `targets.ptxas_path()`)."""
    with tempfile.TemporaryDirectory(prefix="mosaic_gpu_dump_") as directory:
        settings = {"MOSAIC_GPU_DUMP_PTX": "1", "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_TO": directory}
        if _nvdisasm_beside(ptxas):
            settings["MOSAIC_GPU_DUMP_SASS"] = "1"
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield directory
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def ptxas_reports(dump_dir) -> list:
    """Registers, spills and shared memory per Mosaic GPU kernel from the ptxas reports Mosaic GPU dumped."""
    kernels = []
    for name in sorted(os.listdir(dump_dir)) if os.path.isdir(dump_dir) else []:
        path = os.path.join(dump_dir, name)
        if not name.endswith(".ptxas"):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        for function, body in re.findall(r"Compiling entry function '([^']+)'.*?\n(.*?)(?=Compiling entry|\Z)",
                                         text, re.S):
            registers = re.search(r"Used (\d+) registers", body)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
            smem = re.search(r"(\d+) bytes smem", body)
            kernels.append({"kernel": function, "file": name,
                            "registers": int(registers.group(1)) if registers else None,
                            "spill_stores": int(spill.group(1)) if spill else None,
                            "spill_loads": int(spill.group(2)) if spill else None,
                            "smem_bytes": int(smem.group(1)) if smem else None})
    return kernels


_LAUNCH = re.compile(r"gpu\.launch .*?blocks\(.*?\) in \(%\w+ = %c(\d+), %\w+ = %c(\d+), %\w+ = %c(\d+)\) "
                     r"threads\(.*?\) in \(%\w+ = %c(\d+), %\w+ = %c(\d+), %\w+ = %c(\d+)\) "
                     r"dynamic_shared_memory_size %c(\d+)_i32")


def mosaic_gpu_launch(dump_dir, kernel):
    """(CTAs, threads per CTA, dynamic shared memory bytes) of `kernel`'s launch from Mosaic GPU's pass log,
    or (None, None, None) where the log has none."""
    for name in sorted(os.listdir(dump_dir)):
        if name.startswith(kernel) and name.endswith("mlir-passes.log"):
            with open(os.path.join(dump_dir, name), errors="replace") as f:
                match = _LAUNCH.search(f.read())
            if match:
                grid, block = match.groups()[:3], match.groups()[3:6]
                return _product(grid), _product(block), int(match.group(7))
    return None, None, None


def _product(values):
    n = 1
    for v in values:
        n *= int(v)
    return n


def kernel_code(dump_dir, kernel) -> dict:
    """{"sass": text, "ptx": text} of `kernel` as dumped (either may be missing)."""
    code = {}
    for isa, suffix in (("sass", ".sass_ctrl"), ("ptx", ".ptx")):
        found = sorted(f for f in os.listdir(dump_dir) if f.startswith(kernel) and f.endswith(suffix))
        if found:
            with open(os.path.join(dump_dir, found[0])) as f:
                code[isa] = f.read()
    return code


# Per instruction set: a loop label, a branch to a label, the opcode of an instruction line, and the opcode
# prefixes counted in the inner loops.
ISA = {
    "sass": (r"^(\.L_x_\d+):", r"\bBRA `\((\.L_x_\d+)\)", r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
             {"ex2": ("MUFU.EX2",), "ffma": ("FFMA",), "fmul": ("FMUL",), "fadd": ("FADD",), "shfl": ("SHFL",),
              "ld_shared": ("LDS",), "st_shared": ("STS",), "ld_global": ("LDG",), "st_global": ("STG",)}),
    "ptx": (r"^(\$L__BB\d+_\d+):", r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", r"^\s*(?:@!?%?\w+\s+)?([a-z][\w.]*)",
            {"ex2": ("ex2.",), "ffma": ("fma.rn.f32",), "fmul": ("mul.f32", "mul.rn.f32"),
             "fadd": ("add.f32", "add.rn.f32", "sub.f32"), "shfl": ("shfl.",), "ld_shared": ("ld.shared",),
             "st_shared": ("st.shared",), "ld_global": ("ld.global",), "st_global": ("st.global",)}),
}


def _loops(code, isa):
    """(start, end) line ranges of every loop (a label and a later branch back to it) in `code`."""
    label, branch, _, _ = ISA[isa]
    lines = code.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(label, line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(branch, line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    return lines, loops


def _arithmetic(lines, isa):
    _, _, opcode, opcodes = ISA[isa]
    prefixes = tuple(p for name in ("ex2", "ffma", "fmul", "fadd") for p in opcodes[name])
    return any((m := re.search(opcode, line)) and m.group(1).startswith(prefixes) for line in lines)


def _per_token_loops(code, isa):
    """(lines, innermost loops holding floating-point arithmetic (a kernel's per-token loops; barrier and
    copy waits spin in loops without any), the loop directly around them (per chunk), if any)."""
    lines, loops = _loops(code, isa)
    with_math = [(a, b) for a, b in loops if _arithmetic(lines[a:b], isa)]
    innermost = [(a, b) for a, b in with_math if not any(a < c and d < b for c, d in with_math if (c, d) != (a, b))]
    merged = []      # ptxas lays some loops out with two back edges: overlapping ranges, one loop
    for a, b in sorted(innermost):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    innermost = merged
    around = [(a, b) for a, b in loops if innermost and all(a < c and d < b for c, d in innermost)]
    outer = min(around, key=lambda ab: ab[1] - ab[0]) if around else None
    return lines, innermost, outer


def inner_loops(code, isa):
    """The lines of the innermost loops that hold floating-point arithmetic: the per-token loops."""
    lines, innermost, _ = _per_token_loops(code, isa)
    return [lines[a:b + 1] for a, b in innermost]


def instruction_counts(code, isa, elements_per_iteration, iterations_per_outer=None):
    """{opcode class: count per element} over the per-token loops (`inner_loops`); a token of a thread is
    `elements_per_iteration` (channel, state) elements of the CTA's block. A loop that holds exponentials is
    taken to compute one per element and token (true of every scan kernel here: exp(delta A) once per element
    of a step), so where LLVM or ptxas unrolled it, its exponentials say how many tokens an iteration holds; a
    loop without any is taken as one token an iteration. With `iterations_per_outer` (tokens per chunk), the
    rest of the loop around them (the once-per-chunk work) is added, divided by the tokens of a chunk."""
    _, _, opcode, opcodes = ISA[isa]
    lines, innermost, outer = _per_token_loops(code, isa)
    counts = dict.fromkeys(opcodes, 0.0)

    def count(selected):
        found = dict.fromkeys(opcodes, 0)
        for line in selected:
            m = re.search(opcode, line)
            for name, prefixes in opcodes.items():
                if m and m.group(1).startswith(prefixes):
                    found[name] += 1
        return found

    for a, b in innermost:
        found = count(lines[a:b + 1])
        tokens = max(1, round(found["ex2"] / elements_per_iteration))
        for name, n in found.items():
            counts[name] += n / tokens
    if iterations_per_outer and outer is not None:
        inside = {i for a, b in innermost for i in range(a, b + 1)}
        found = count([lines[i] for i in range(outer[0], outer[1] + 1) if i not in inside])
        for name, n in found.items():
            counts[name] += n / iterations_per_outer
    return {k: round(v / elements_per_iteration, 3) for k, v in counts.items()}
