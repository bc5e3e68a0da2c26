"""Tests of the Pallas backends in interpret mode (GPU/Triton kernel and TPU/Mosaic kernel), of their lowering
for real accelerators through `jax.export` from this CPU machine, and of the backend registry (tunables, a
JAX without the Triton dialect). The Mosaic GPU kernel has its own file, test_kernels_mosaic_gpu.py.

Interpret mode runs every grid step through the JAX interpreter, so shapes are tiny and chunk/block sizes are
shrunk to exercise several chunks, several channel blocks and padding of length, channels and state.
"""
import contextlib
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import alignmamba_jax.kernels as kernels
from alignmamba_jax.kernels import selective_scan, selective_scan_reference, tuned_backend
from alignmamba_jax.kernels.common import make_backend
from alignmamba_jax.kernels.pallas_tpu import pallas_tpu_core
from alignmamba_jax.kernels.pallas_triton import pallas_triton_core
from alignmamba_jax.kernels.testing import OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs

BACKENDS = {
    "pallas_triton_small_blocks": tuned_backend("pallas_triton", chunk=4, block_c=2, unroll=2),
    "pallas": functools.partial(selective_scan, backend="pallas"),
    "pallas_tpu_small_chunks": tuned_backend("pallas_tpu", chunk=8),
    "pallas_tpu": functools.partial(selective_scan, backend="pallas_tpu"),
}
CASES = [("pallas_triton_small_blocks", (1, 1, 1, 1), "all"), ("pallas_triton_small_blocks", (2, 11, 5, 3), "all"),
         ("pallas", (2, 13, 3, 4), "mask"),
         ("pallas_tpu_small_chunks", (2, 19, 5, 3), "all"), ("pallas_tpu", (1, 1, 2, 2), "mask")]


@pytest.mark.parametrize("backend,shape,options", CASES)
def test_pallas_matches_reference_values_and_gradients(backend, shape, options):
    fn = BACKENDS[backend]
    args, kwargs = make_inputs(2, *shape, OPTION_SETS[options].items())
    y, h = jax.jit(lambda a: fn(*a, return_final_state=True, **kwargs))(args)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.dtype == y_ref.dtype and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], rtol=1e-4, atol=1e-4, what="values")
    assert_close_tree(grads_of_all_inputs(fn, args, kwargs),
                      grads_of_all_inputs(selective_scan_reference, args, kwargs), rtol=1e-3, atol=1e-3,
                      what="gradients")


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape,options", [((2, 100, 70, 16), "all"), ((3, 67, 33, 5), "bias_softplus_h0"),
                                           ((1, 150, 130, 4), "mask")])
def test_pallas_matches_reference_on_larger_shapes(backend, shape, options):
    test_pallas_matches_reference_values_and_gradients(backend, shape, options)


def test_pallas_bfloat16():
    fn = BACKENDS["pallas_triton_small_blocks"]
    args, kwargs = make_inputs(5, 2, 10, 3, 4, OPTION_SETS["all"].items(), dtype=jnp.bfloat16)
    y, h = fn(*args, return_final_state=True, **kwargs)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    up = [None if a is None else a.astype(jnp.float32) for a in args]
    y_ref, h_ref = selective_scan_reference(*up, return_final_state=True,
                                            **dict(kwargs, initial_state=kwargs["initial_state"].astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=3e-2, atol=5e-2)
    np.testing.assert_allclose(h, h_ref, rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("fn", [pytest.param(BACKENDS["pallas_triton_small_blocks"], id="pallas_triton"),
                                pytest.param(tuned_backend("pallas_mosaic_gpu", chunk=8), id="pallas_mosaic_gpu",
                                             marks=pytest.mark.slow)])
def test_pallas_extremes_and_vmap(fn):
    args, _ = make_inputs(6, 1, 6, 3, 2)
    stacked = [jnp.stack([a, 2 * a]) for a in args[:5]]
    stacked[1] = jnp.full_like(stacked[1], 1e3)
    stacked[2] = jnp.full_like(stacked[2], -1e3)
    y_v, vjp = jax.vjp(jax.vmap(fn), *stacked)
    grads = vjp(jnp.ones_like(y_v))
    assert np.all(np.isfinite(y_v)) and all(np.all(np.isfinite(g)) for g in grads)
    for i in range(2):
        np.testing.assert_allclose(y_v[i], selective_scan_reference(*[s[i] for s in stacked]), rtol=1e-4,
                                   atol=1e-3)


def test_pallas_interpret_memory_has_no_full_state_temporary():
    batch, length, channels, state = 2, 512, 64, 16
    args, _ = make_inputs(9, batch, length, channels, state)
    loss = lambda *a: jnp.sum(selective_scan(*a, backend="pallas"))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args[:5]).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < batch * length * channels * state * 4


def _export_for(platform, fn, disabled_target):
    b, L, c, n = 2, 256, 128, 16
    shapes = [(b, L, c), (b, L, c), (c, n), (b, L, n), (b, L, n)]
    dtypes = [jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16]
    sds = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
    checks = [export.DisabledSafetyCheck.custom_call(disabled_target)]
    grad = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4)))
    # jax 0.11's Triton lowering asks which GPU it lowers for; off GPU an abstract H100 answers.
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    target = (jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=h100))
              if platform == "cuda" else contextlib.nullcontext())
    try:
        with target:
            return [export.export(f, platforms=[platform], disabled_checks=checks)(*sds).mlir_module()
                    for f in (jax.jit(fn), grad)]
    except (NotImplementedError, ImportError) as err:
        pytest.skip(f"this jax/jaxlib cannot lower Pallas kernels for {platform} from a CPU machine: {err}")


def test_pallas_triton_kernels_lower_for_cuda_via_export():
    fn = make_backend(functools.partial(pallas_triton_core, interpret=False), "pallas_triton")
    forward, backward = _export_for("cuda", fn, "__gpu$xla.gpu.triton")
    assert "selective_scan_fwd" in forward and "xla.gpu.triton" in forward
    assert "selective_scan_fwd" in backward and "selective_scan_bwd" in backward


def test_pallas_tpu_kernels_lower_for_tpu_via_export():
    fn = make_backend(functools.partial(pallas_tpu_core, interpret=False), "pallas_tpu")
    forward, backward = _export_for("tpu", fn, "tpu_custom_call")
    assert "selective_scan_fwd_tpu" in forward and "tpu_custom_call" in forward
    assert "selective_scan_fwd_tpu" in backward and "selective_scan_bwd_tpu" in backward


def test_tuned_backend_rejects_unknown_backends_and_tunables():
    assert kernels.tunables("pallas_triton") == {"chunk": 64, "block_c": 64, "num_warps": 4, "unroll": 1}
    with pytest.raises(ValueError, match="unknown tunables \\['block'\\]"):
        tuned_backend("pallas_triton", block=8)
    with pytest.raises(ValueError, match="tunable Pallas backends"):
        tuned_backend("chunked", chunk=8)


_WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None      # a JAX whose Pallas has no Triton dialect
import numpy as np
from alignmamba_jax.kernels import selective_scan, selective_scan_reference
from alignmamba_jax.kernels.testing import OPTION_SETS, make_inputs
from alignmamba_jax.kernels import resolve_backend
args, kwargs = make_inputs(1, 1, 5, 2, 3, OPTION_SETS["mask"].items())
expected = selective_scan_reference(*args, **kwargs)
for backend in ("reference", "associative", "chunked", "pallas_tpu", "pallas_mosaic_gpu", "pallas", "auto"):
    np.testing.assert_allclose(selective_scan(*args, backend=backend, **kwargs), expected, rtol=1e-4, atol=1e-4)
print("pallas is", resolve_backend("pallas", "cuda"))
try:
    selective_scan(*args, backend="pallas_triton", **kwargs)
except RuntimeError as error:
    print(error)
"""


def test_a_jax_without_triton_serves_every_other_backend_and_explains_pallas_triton():
    """`pallas` falls back to the Mosaic GPU kernel (here in interpret mode)."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "pallas is pallas_mosaic_gpu" in out.stdout
    assert "backend='pallas_triton' is unavailable" in out.stdout
    assert "deprecated Pallas's Triton backend" in out.stdout
