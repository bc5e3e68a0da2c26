"""Reading compiled programs: what XLA and the kernel compilers produced, as plain data.

One home for every parser of compiler output, used by `aot.py` (the training step compiled for a slice or a node)
and `benchmarks/kernel_report.py` (the scan kernels alone):

- optimized HLO text: `shape_bytes`, `shapes_in`, `collectives` (each collective with its result bytes) and
  `kernel_calls` (each Pallas / Mosaic custom call with its operand and result shapes);
- Mosaic GPU: `mosaic_gpu_dumps` (a folder the compiler fills with PTX, ptxas reports and, where nvdisasm is
  installed, SASS), `ptxas_reports` (registers, spills, shared memory), `mosaic_gpu_launch` (grid, threads and
  dynamic shared memory of a kernel's launch) and `instruction_counts` (per-element instruction classes of a
  kernel's inner loops, from SASS or PTX);
- libtpu (XLA:TPU and Mosaic TPU): `libtpu_dump_env` (the LIBTPU_INIT_ARGS that make libtpu dump every program's
  LLO passes and every Mosaic kernel), `llo_programs` (the dump files by program and pass), `program_cost`
  (the VLIW bundles a program executes, loop bodies times their trip counts and called fusions included, and
  the slots it uses per unit: XLU, VALU, EUP, loads, stores, vector spills and fills), `busy_percent`,
  `total_scheduled_bundles`, `scoped_vmem_bytes`, `vmem_limits` and `mosaic_grid`.

Nothing here compiles; every function takes text, file paths or a folder of dumps.
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
        op_name = re.search(r'op_name="([^"]+)"', line)
        # the kernel's own name comes last in its op_name (the rest of the line, e.g. a Mosaic GPU kernel's
        # serialized module, names the Python functions it was traced in)
        names = re.findall(r"(selective_scan\w*)", op_name.group(1) if op_name else line)
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


# --- libtpu: XLA:TPU and Mosaic TPU ---------------------------------------------------------------------------

def libtpu_dump_env(llo_dir, mosaic_dir, environ=None) -> dict:
    """A copy of `environ` (default `os.environ`) whose LIBTPU_INIT_ARGS also asks libtpu to dump, for every
    program it compiles, the LLO text of each compiler pass into `llo_dir` (final bundles, per-bundle unit
    utilisation, the region tree with loop bounds) and each Mosaic kernel's MLIR into `mosaic_dir`.

    libtpu reads LIBTPU_INIT_ARGS once, when it initialises: give the result to a fresh process, or install it
    in `os.environ` before jax first touches a TPU backend or topology (as `targets.prepare_compile_host` must
    run before jax is imported)."""
    environ = dict(os.environ if environ is None else environ)
    flags = f"--xla_jf_dump_to={llo_dir} --xla_jf_dump_llo_text=true --xla_mosaic_dump_to={mosaic_dir}"
    environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [environ.get("LIBTPU_INIT_ARGS", ""), flags]))
    return environ


_DUMP_NAME = re.compile(r"^\d+-(?P<program>.+)-(?P<index>\d\d)-(?P<pass>[^/]+)\.txt$")


def llo_programs(paths) -> dict:
    """{program: {pass name: path}} of libtpu LLO dump files (`<stamp>-<program>-<NN>-<pass>.txt`), where a
    program is a top-level program ("TLP"), a fusion or a Mosaic kernel, named by its HLO instruction; a pass
    dumped twice keeps its later file."""
    programs = {}
    for path in sorted(paths):
        match = _DUMP_NAME.match(os.path.basename(path))
        if match:
            passes = programs.setdefault(match.group("program"), {})
            previous = passes.get(match.group("pass"))
            if previous is None or _DUMP_NAME.match(os.path.basename(previous)).group("index") <= match.group("index"):
                passes[match.group("pass")] = path
    return programs


def _pass_file(passes, name):
    return passes.get(name)


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def total_scheduled_bundles(text) -> int:
    """The "total scheduled bundles" of a `*schedule-analysis_final_bundles.txt` dump: the program's static
    size in VLIW bundles (each loop body counted once)."""
    return int(re.search(r"total scheduled bundles:\s*(\d+)", text).group(1))


_BUNDLE = re.compile(r"^\s*(?:0x[0-9a-f]+|\d+)\s+(L[HBE]|PB|PF|CT)?\s*:\s*(>*)\s*\{(.*)\}")
_BRANCH = re.compile(r"\bsbr\.rel\b[^;]*?target = \$region(\d+)")
_CALL = re.compile(r"=\s*inlined_call\b[^;]*?/\*\s*(?:%([\w.\-]+)\s*=|(<[\w\-]+>))")
_COMPARE = re.compile(r"scmp\.(lt|le|gt|ge)\.s32\.totalorder\s+(?:\([^)]*\),\s*)?%\w+,\s*(\d+)")


def final_bundles(text) -> list:
    """The bundles of a `*final_bundles.txt` dump in address order, each {"marker" ("LB" starts a loop body),
    "depth" (loop nesting of its instructions, the count of '>'), "empty", "branch" (the target region of an
    `sbr.rel`), "call" (the HLO instruction of an `inlined_call`: a fusion or kernel the program runs there),
    "compare" (the last ordering compare of a scalar with a constant: (predicate, constant))}."""
    bundles = []
    for line in text.splitlines():
        match = _BUNDLE.match(line)
        if match is None:
            continue
        body = match.group(3)
        branch, call = _BRANCH.search(body), _CALL.search(body)
        compares = _COMPARE.findall(body)
        bundles.append({"marker": match.group(1), "depth": len(match.group(2)), "empty": not body.strip(),
                        "branch": int(branch.group(1)) if branch else None,
                        "call": (call.group(1) or call.group(2)) if call else None,
                        "compare": (compares[-1][0], int(compares[-1][1])) if compares else None})
    return bundles


_LOOP = re.compile(r"^(\s*)loop: start=(-?\d+), step=(-?\d+), limit=(-?\d+)")
_REGION = re.compile(r"^(\s*)\$region(\d+):.*//\s*(\w+)")


def loop_bodies(text) -> dict:
    """{loop body region: trip count, or None where the region tree gives no static bounds} from an LLO region
    tree (e.g. the `*post-delay-converter.txt` dump, whose region numbers the final bundles use): Mosaic and
    fusion loops carry "loop: start=, step=, limit="; XLA's while loops do not."""
    bodies, pending = {}, {}
    for line in text.splitlines():
        loop = _LOOP.match(line)
        if loop:
            start, step, limit = (int(loop.group(i)) for i in (2, 3, 4))
            pending[len(loop.group(1))] = max(0, -(-(limit - start) // step)) if step else None
            continue
        region = _REGION.match(line)
        if region and region.group(3) == "loop_body":
            bodies[int(region.group(2))] = pending.pop(len(region.group(1)), None)
    return bodies


_TRIPS_FROM_COMPARE = {"lt": 0, "ge": 0, "le": 1, "gt": 1}


def loops(bundles, bodies, max_delay_slots=4) -> list:
    """Each loop of a program's final bundles as {"start", "end" (bundle indices, inclusive), "trips", "depth"}.

    A loop runs from its "LB" bundle to the branch back to its body region, plus the branch's delay slots (the
    bundles after it, at most `max_delay_slots`, that are empty or hold instructions at least as deeply nested).
    Its trip count is the region tree's; else (XLA while loops) the bound of the last compare with a constant
    before the branch: the counter starts at 0, steps by 1 and is tested after its increment."""
    found, open_loops = [], []
    for i, bundle in enumerate(bundles):
        if bundle["marker"] == "LB":
            open_loops.append(i)
        if bundle["branch"] in bodies and open_loops:
            start = open_loops.pop()
            depth = bundles[start]["depth"]
            end = i
            while (end + 1 < len(bundles) and end - i < max_delay_slots
                   and (bundles[end + 1]["empty"] or bundles[end + 1]["depth"] >= depth)):
                end += 1
            trips = bodies[bundle["branch"]]
            if trips is None:
                compare = next((b["compare"] for b in reversed(bundles[start:i + 1]) if b["compare"]), None)
                trips = compare[1] + _TRIPS_FROM_COMPARE[compare[0]] if compare else 1
            found.append({"start": start, "end": end, "trips": trips, "depth": depth})
    return found


def multiplicities(n_bundles, program_loops, scope=None) -> list:
    """How often each bundle runs: the product of the trip counts of the loops that hold it. With `scope` (one
    of the loops) only the bundles inside it count, per iteration of it."""
    counts = [0 if scope else 1] * n_bundles
    first, last = (scope["start"], scope["end"]) if scope else (0, n_bundles - 1)
    for i in range(first, last + 1):
        counts[i] = 1
    for loop in program_loops:
        if loop is scope or (scope and not (first <= loop["start"] and loop["end"] <= last)):
            continue
        for i in range(loop["start"], loop["end"] + 1):
            counts[i] *= loop["trips"]
    return counts


def unit_utilization(text) -> dict:
    """{"units": [name], "capacity": [slots per bundle], "rows": [[slots used] per bundle]} of a
    `*static-per-bundle-utilization.txt` dump (units such as MXU, XLU, VALU, EUP, VLOAD, VLOAD:FILL (vector
    fills), VSTORE, VSTORE:SPILL (vector spill stores), SALU)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== CAPAC"))
    units = [u.strip() for u in lines[start + 1].split(",")]
    capacity = [int(x) for x in lines[start + 2].split()]
    first_row = next(i for i, line in enumerate(lines) if line.startswith("== UTILIZATION")) + 1
    rows = [[int(x) for x in line.split()] for line in lines[first_row:] if line.strip()]
    return {"units": units, "capacity": capacity, "rows": rows}


def deduplication_map(text) -> dict:
    """{HLO instruction: the program compiled for it} from a `*deduplication-map.txt` dump: XLA:TPU compiles one
    program for identical fusions and calls it for each."""
    mapping, key = {}, None
    for line in text.splitlines():
        if line.startswith("key:"):
            key = line[4:].strip()
            mapping[key] = key
        elif line.startswith("  ") and key:
            mapping[line.strip()] = key
    return mapping


def program_cost(programs, name, scope_outermost=False, _dedup=None, _callees=None) -> dict:
    """What program `name` of `llo_programs(...)` executes: {"bundles", "units": {unit: slots used},
    "capacity": {unit: slots per bundle}, "loops"}, counting each loop body times its trip count and, for each
    `inlined_call` (the fusions and kernels a top-level program runs), the callee's own cost. Bundles behind a
    branch that skips them (predicated regions) are counted as if run: an upper bound.

    scope_outermost=True counts one iteration of the program's outermost loop (for a Mosaic kernel: its grid
    loop), with "trips" the loop's trip count (None where the program has no loop)."""
    passes = programs[name]
    if _dedup is None:
        dedup_file = _pass_file(programs.get("TLP", {}), "deduplication-map")
        _dedup = deduplication_map(_read(dedup_file)) if dedup_file else {}
    bundles = final_bundles(_read(_pass_file(passes, "final_bundles")))
    tree = _pass_file(passes, "post-delay-converter")
    program_loops = loops(bundles, loop_bodies(_read(tree)) if tree else {})
    outer = [lp for lp in program_loops if not any(o is not lp and o["start"] <= lp["start"] and lp["end"] <= o["end"]
                                                    for o in program_loops)]
    scope = max(outer, key=lambda lp: lp["end"] - lp["start"]) if scope_outermost and outer else None
    counts = multiplicities(len(bundles), program_loops, scope)
    utilization = unit_utilization(_read(_pass_file(passes, "final_hlo-static-per-bundle-utilization")))
    units = dict.fromkeys(utilization["units"], 0)
    for count, row in zip(counts, utilization["rows"]):
        for unit, used in zip(utilization["units"], row):
            units[unit] += count * used
    total = sum(counts)
    _callees = {} if _callees is None else _callees
    for count, bundle in zip(counts, bundles):
        callee = _dedup.get(bundle["call"], bundle["call"])
        if count and callee in programs and callee != name:
            if callee not in _callees:
                _callees[callee] = program_cost(programs, callee, _dedup=_dedup, _callees=_callees)
            inner = _callees[callee]
            total += count * inner["bundles"]
            for unit, used in inner["units"].items():
                units[unit] = units.get(unit, 0) + count * used
    return {"bundles": total, "units": units, "capacity": dict(zip(utilization["units"], utilization["capacity"])),
            "loops": len(program_loops), "trips": scope["trips"] if scope else None}


def busy_percent(cost) -> dict:
    """{unit: percent of its slots used over the bundles of `program_cost(...)`}."""
    return {unit: round(100 * used / (cost["capacity"][unit] * cost["bundles"]), 1) if cost["bundles"] and
            cost["capacity"].get(unit) else 0.0 for unit, used in cost["units"].items() if unit in cost["capacity"]}


def scoped_vmem_bytes(text) -> int:
    """Bytes of the scoped VMEM allocations (pipeline windows, scratch, internal scratch) of a program's LLO
    `*-original.txt` dump: what the compiler checks against the scoped VMEM limit."""
    return sum(int(size, 16) for size in
               re.findall(r"#allocation\d+ \[shape = '[^']*', space=vmem, size = (0x[0-9a-f]+), scoped", text))


def vmem_limits(hlo: str) -> dict:
    """{instruction: scoped VMEM limit in bytes} of the instructions of optimized HLO text that set one (a Pallas
    kernel's `vmem_limit_bytes`; XLA gives the other instructions the generation's default)."""
    limits = {}
    for line in hlo.splitlines():
        config = re.search(r'"scoped_memory_configs":\[\{[^\]]*?"memory_space":"1"[^\]]*?"size":"(\d+)"', line)
        name = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if config and name:
            limits[name.group(1)] = int(config.group(1))
    return limits


def mosaic_grid(paths, kernel):
    """The grid (iteration bounds) of Mosaic kernel `kernel` (its pallas_call name) from the Mosaic dumps
    (`*-original.txt`), or None where none names it."""
    for path in sorted(paths):
        if path.endswith("-original.txt"):
            text = _read(path)
            match = re.search(r"func\.func @" + re.escape(kernel) +
                              r"\(.*?iteration_bounds = array<i64(?::\s*([\d,\s]*))?>", text, re.S)
            if match:
                return tuple(int(x) for x in (match.group(1) or "").replace(" ", "").split(",") if x)
    return None


def mosaic_kernel(programs, mosaic_paths, name) -> dict:
    """The static figures of Mosaic kernel program `name` (an HLO instruction such as "selective_scan_fwd_tpu.1")
    from `llo_programs(...)` and the Mosaic dump files: its grid and grid steps, the bundles of one grid step
    (inner loops times their trip counts), the bundles executed in all (grid steps x one step, plus those
    outside the grid loop; the pipeline's extra prologue and epilogue iterations, which skip the body, are not
    counted), its static size in bundles, vector spill stores and fills per grid step, per-unit busy percent over
    a grid step and its scoped VMEM bytes."""
    passes = programs[name]
    step = program_cost(programs, name, scope_outermost=True)
    whole = program_cost(programs, name)
    grid = mosaic_grid(mosaic_paths, re.sub(r"\.\d+$", "", name)) or ()
    grid_steps = _product(grid)
    if step["trips"] is None:          # no grid loop: the whole kernel is one step
        per_step = executed = whole["bundles"]
    else:
        per_step = step["bundles"]
        executed = whole["bundles"] + (grid_steps - step["trips"]) * per_step
    return {"grid": list(grid), "grid_steps": grid_steps, "bundles_per_grid_step": per_step,
            "executed_bundles": executed,
            "static_bundles": total_scheduled_bundles(_read(passes["schedule-analysis_final_bundles"])),
            "spill_stores": step["units"].get("VSTORE:SPILL", 0), "fills": step["units"].get("VLOAD:FILL", 0),
            "unit_busy_pct": busy_percent(step), "scoped_vmem_bytes": scoped_vmem_bytes(_read(passes["original"]))}
