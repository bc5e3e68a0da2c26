"""GPU tests (`pytest -m gpu`; `make device-suite` runs them): every Pallas GPU kernel against `reference` at
realistic shapes, float32 and bfloat16, every option at once (D, z, delta_bias + softplus, initial state,
mask), values, final state and the gradients of every input; AlignMamba on the GPU against the same model on
the CPU; the Transformers' fused cuDNN attention against Flax's attention.

Where jax sees no GPU they skip (tests/conftest.py). ALIGNMAMBA_DRY_RUN=1 runs them on the CPU at tiny sizes,
the kernels in interpret mode (the device suite's dry run), so that this file cannot rot between GPU sessions.
The kernels are discovered from `alignmamba_jax.kernels.TUNABLE_BACKENDS`: a new GPU kernel is tested here as
soon as it is registered; one whose Pallas dialect does not import skips with the import error. The model
tests come first: they are cheap, and the suite's time limit may cut the kernel tests at realistic shapes.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax.kernels import TUNABLE_BACKENDS, selective_scan, selective_scan_reference, tunables
from alignmamba_jax.kernels.testing import OPTION_SETS, grads_of_all_inputs, make_inputs
from alignmamba_jax.models import create_model, default_model_config

pytestmark = pytest.mark.gpu

DRY_RUN = os.environ.get("ALIGNMAMBA_DRY_RUN") == "1"
SHAPES = [(1, 64, 128, 16)] if DRY_RUN else [(2, 2048, 1536, 16), (8, 1024, 2048, 16)]
GPU_KERNELS = [name for name in TUNABLE_BACKENDS if not name.endswith("_tpu")]
# (rtol, atol as a fraction of the largest |expected|) by the dtype of the compared array: float32 results
# differ from the reference by summation order only; bfloat16 ones also by one rounding of the output.
TOLERANCE = {jnp.dtype(jnp.float32): (2e-3, 1e-4), jnp.dtype(jnp.bfloat16): (2e-2, 1e-2)}
MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}
MOSI_LENGTHS = {"text": 10, "audio": 24, "vision": 30} if DRY_RUN else {"text": 50, "audio": 375, "vision": 500}


@pytest.fixture(autouse=True)
def float32_matmuls():
    """GPUs run float32 matmuls in TF32 by default; compare exact arithmetic."""
    with jax.default_matmul_precision("float32"):
        yield


def accelerator():
    return jax.devices()[0] if DRY_RUN else jax.devices("gpu")[0]


def assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        rtol, fraction = TOLERANCE[jnp.dtype(a.dtype)]
        e = np.asarray(e, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=rtol, atol=fraction * np.abs(e).max(),
                                   err_msg=f"{what}: item {i} ({a.dtype}{tuple(a.shape)})")


@functools.lru_cache(maxsize=None)
def reference(shape, dtype):
    """Inputs with every option, and the reference's (y, h_last) and gradients, on the accelerator."""
    with jax.default_device(accelerator()), jax.default_matmul_precision("float32"):
        args, kwargs = make_inputs(0, *shape, OPTION_SETS["all"].items(), dtype=jnp.dtype(dtype))
        values = jax.jit(lambda a: selective_scan_reference(*a, return_final_state=True, **kwargs))(args)
        return args, kwargs, [np.asarray(v, np.float32) for v in values], [
            np.asarray(g, np.float32) for g in grads_of_all_inputs(selective_scan_reference, args, kwargs)]


def mosi_batch(batch, seed=0):
    """MOSI-shaped features with right padding of random lengths (every sample keeps at least one token)."""
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal((batch, t, MOSI_DIMS[m])).astype(np.float32) for m, t in MOSI_LENGTHS.items()}
    masks = {m: np.arange(t)[None, :] < rng.integers(1, t + 1, (batch, 1)) for m, t in MOSI_LENGTHS.items()}
    return feats, masks


def build(name, **overrides):
    cfg = default_model_config()
    cfg.update(name=name, **overrides)
    return create_model(cfg, modalities=tuple(MOSI_DIMS), anchor="text", input_dims=MOSI_DIMS)


def apply_on(device, model, params, feats, masks):
    put = functools.partial(jax.device_put, device=device)
    out = jax.jit(lambda p, f, m: model.apply({"params": p}, f, m, train=False))(
        put(params), put(feats), put(masks))
    return {k: np.asarray(out[k]) for k in ("prediction", "align_loss")}


def test_alignmamba_forward_on_gpu_matches_cpu():
    """The whole model, with the scan backend `auto` picks on the GPU, against the reference scan on the CPU."""
    feats, masks = mosi_batch(4)
    on_gpu, on_cpu = build("alignmamba"), build("alignmamba", scan_backend="reference")
    with jax.default_device(jax.devices("cpu")[0]):
        params = on_cpu.init(jax.random.PRNGKey(0), feats, masks, train=False)["params"]
    gpu = apply_on(accelerator(), on_gpu, params, feats, masks)
    cpu = apply_on(jax.devices("cpu")[0], on_cpu, params, feats, masks)
    for key in gpu:
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-3, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("name", ["transformer_single", "transformer_multi"])
def test_transformer_cudnn_attention_matches_flax_attention(name):
    if DRY_RUN:
        pytest.skip("cuDNN attention runs on a GPU only")
    feats, masks = mosi_batch(4, seed=1)
    flax_attention, fused = build(name), build(name, attention_impl="cudnn")
    params = flax_attention.init(jax.random.PRNGKey(0), feats, masks, train=False)["params"]
    expected = apply_on(accelerator(), flax_attention, params, feats, masks)["prediction"]
    got = apply_on(accelerator(), fused, params, feats, masks)["prediction"]
    np.testing.assert_allclose(got, expected, rtol=3e-2, atol=3e-2 * np.abs(expected).max())  # bf16 attention


@pytest.mark.parametrize("backend", GPU_KERNELS)        # varies fastest: every kernel gets each case in turn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernel_matches_reference(backend, shape, dtype):
    try:
        tunables(backend)
    except RuntimeError as error:  # the kernel's Pallas dialect does not import with this jax
        pytest.skip(str(error))
    args, kwargs, expected_values, expected_grads = reference(shape, dtype)
    fn = functools.partial(selective_scan, backend=backend)
    y, h = jax.jit(lambda a: fn(*a, return_final_state=True, **kwargs))(args)
    assert y.dtype == jnp.dtype(dtype) and h.dtype == jnp.float32
    assert_close([y, h], expected_values, f"{backend} values (y, final state)")
    grads = grads_of_all_inputs(fn, args, kwargs)
    assert [g.dtype for g in grads] == [a.dtype for a in args if a is not None] + [kwargs["initial_state"].dtype]
    assert_close(grads, expected_grads, f"{backend} gradients (u, delta, A, B, C, D, z, delta_bias, h0)")
