"""The scan backends, one frozen record each: the only place that says what a backend is, where it compiles,
what it reads natively, what it tunes and what to use where it cannot run.

Dispatch (`selective_scan`, `resolve_backend`), input validation (`BACKENDS`), `tunables()`, `tuned_backend()`,
`backends()` and the per-device sharding wrapper all read `REGISTRY`. Adding a backend is one `Backend` entry
here plus its module (docs: "Adding a backend"):

- an XLA backend's module defines a function with the signature of `selective_scan_reference`;
- a kernel's module defines a core `core(u, delta, A, B, C, h0, **tunables) -> (y, h_last)` that
  `common.make_backend` wraps with masks, D, z and the output cast, and `TUNABLES`, its keywords' defaults.

`pallas` and `auto` are not backends but choices among them, made per platform in `kernels/__init__.py`.
"""
import dataclasses
import functools
import importlib

from alignmamba_jax.kernels.common import make_backend

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ALIASES = ("pallas", "auto")


@dataclasses.dataclass(frozen=True)
class Backend:
    """name: the `backend=` value; module: under `alignmamba_jax.kernels`; attribute: the backend function (kind
    "xla"), or the kernel's core; kind: "xla" (plain JAX, any platform), "pallas" (compiled on `platforms`,
    interpreted on any other) or "custom_call" (a compiled kernel for `platforms` only); native_dtypes: the core
    reads and writes bfloat16 / float16 itself (see `make_backend`); missing_hint: what to use where the module
    does not import (a JAX without that Pallas dialect); pure_interpreter: off its platforms the kernel runs in
    an interpreter of plain JAX ops (`interpret="discharge"`, no callbacks), so its branch can share a
    `lax.platform_dependent` with compiled ones."""
    name: str
    module: str
    attribute: str
    summary: str
    kind: str = "xla"
    platforms: tuple = PLATFORMS
    native_dtypes: bool = False
    missing_hint: str = ""
    pure_interpreter: bool = False

    @property
    def tunable(self) -> bool:
        return self.kind == "pallas"

    @property
    def per_device(self) -> bool:
        """Whether it runs on each device's shard under a mesh: XLA cannot partition a kernel call."""
        return self.kind != "xla"

    def interpreted(self, platform) -> bool:
        return self.kind == "pallas" and platform not in self.platforms

    def implementation_for(self, platform):
        """The backend function as lowered for `platform`: a kernel compiled on its own platforms, elsewhere
        interpreted (in plain JAX ops where `pure_interpreter`)."""
        if not self.tunable:
            return self.implementation()
        if not self.interpreted(platform):
            return self.implementation(interpret=False)
        return self.implementation(interpret="discharge" if self.pure_interpreter else True)

    def load(self):
        """Its module; RuntimeError naming the backend and what to use instead where the module does not import."""
        try:
            return importlib.import_module(f"alignmamba_jax.kernels.{self.module}")
        except ImportError as error:
            import jax
            raise RuntimeError(f"backend={self.name!r} is unavailable with jax {jax.__version__}: its Pallas "
                               f"dialect does not import ({error}). {self.missing_hint}.") from error

    def tunables(self) -> dict:
        return dict(self.load().TUNABLES) if self.tunable else {}

    def available(self) -> tuple:
        """(True, what it is) or (False, why it cannot run here); a module may say so itself (`available()`)."""
        if self.kind == "xla":
            return True, "XLA"
        try:
            module = self.load()
        except RuntimeError as error:
            return False, str(error)
        if hasattr(module, "available"):
            return module.available()
        return True, "Pallas kernel (interpret mode off its platform)"

    def implementation(self, **settings):
        """The backend function (signature of `selective_scan_reference`), a kernel's core with `settings`."""
        if not self.tunable:
            return getattr(self.load(), self.attribute)
        return _wrapped(self.name, tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=None)
def _wrapped(name, items):
    backend = REGISTRY[name]
    core = getattr(backend.load(), backend.attribute)
    return make_backend(functools.partial(core, **dict(items)) if items else core, name, backend.native_dtypes)


REGISTRY = {b.name: b for b in (
    Backend("reference", "reference", "selective_scan_reference", "plain lax.scan, the ground truth"),
    Backend("associative", "associative", "selective_scan_associative",
            "lax.associative_scan; materialises (batch, length, channels, state)"),
    Backend("chunked", "chunked", "selective_scan_chunked",
            "sequential chunks, hand-written VJP keeping chunk-boundary states"),
    Backend("cpu_ffi", "cpu_ffi", "selective_scan_cpu_ffi",
            "C++ kernel on XLA's CPU backend through XLA's FFI, built on first use", kind="custom_call",
            platforms=("cpu",)),
    Backend("pallas_triton", "pallas_triton", "pallas_triton_core",
            "Pallas GPU kernel on Pallas's Triton backend (deprecated by JAX 0.11)", kind="pallas",
            platforms=("cuda", "rocm"),
            missing_hint="JAX 0.11 deprecated Pallas's Triton backend and later versions remove it; on GPUs use "
                         "backend='pallas' (the platform's Pallas kernel), or 'chunked' / 'associative' anywhere"),
    Backend("pallas_mosaic_gpu", "pallas_mosaic_gpu", "pallas_mosaic_gpu_core",
            "Pallas GPU kernel on Mosaic GPU, sm_90+ (Hopper, Blackwell)", kind="pallas", platforms=("cuda",),
            native_dtypes=True, missing_hint="use backend 'pallas_triton', 'chunked' or 'associative'"),
    Backend("pallas_tpu", "pallas_tpu", "pallas_tpu_core", "Pallas TPU kernel (Mosaic)", kind="pallas",
            platforms=("tpu",), native_dtypes=True, missing_hint="use backend 'chunked' or 'associative'",
            pure_interpreter=True),
)}

BACKENDS = tuple(REGISTRY) + ALIASES                                   # every accepted `backend=` value
TUNABLE_BACKENDS = tuple(name for name, b in REGISTRY.items() if b.tunable)
CPU_KERNELS = tuple(name for name, b in REGISTRY.items() if b.kind == "custom_call" and "cpu" in b.platforms)

