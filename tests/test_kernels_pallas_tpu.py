"""The Pallas TPU kernel: both layouts (dense for >= 1024 channels, lanes below) against `reference` in TPU
interpret mode, and compiled for a compile-only TPU v5e (libtpu), reading Mosaic's verdict from libtpu's dumps:
no VMEM error, no vector spills at state 16, a bundle budget.

Interpret mode runs every grid step through the JAX interpreter, so shapes are small; chunks are shrunk to 8 to
cross several chunks. The compiled checks run in a subprocess each, as libtpu reads its dump flags once, when it
loads.
"""
import glob
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from alignmamba_jax import targets
from alignmamba_jax.kernels import selective_scan_reference, tuned_backend
from alignmamba_jax.kernels.pallas_tpu import DENSE_CHANNELS
from alignmamba_jax.kernels.testing import OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(shape, options, dtype=jnp.float32, **tunables):
    fn = tuned_backend("pallas_tpu", chunk=8, **tunables)
    args, kwargs = make_inputs(3, *shape, OPTION_SETS[options].items(), dtype=dtype)
    y, h = fn(*args, return_final_state=True, **kwargs)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.dtype == y_ref.dtype == dtype and h.dtype == jnp.float32
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=3e-2, atol=5e-2)
    assert_close_tree([y, h], [y_ref, h_ref], what="values", **tol)
    grads = grads_of_all_inputs(fn, args, kwargs)
    assert [g.dtype for g in grads] == [a.dtype for a in args if a is not None] + (
        [kwargs["initial_state"].dtype] if "initial_state" in kwargs else [])
    assert_close_tree(grads, grads_of_all_inputs(selective_scan_reference, args, kwargs), what="gradients",
                      **(dict(rtol=1e-3, atol=1e-3) if dtype == jnp.float32 else dict(rtol=5e-2, atol=1e-1)))


def test_unroll_must_divide_a_row_of_tiles():
    args, _ = make_inputs(0, 1, 8, 4, 2)
    with pytest.raises(ValueError, match="unroll must divide 8"):
        tuned_backend("pallas_tpu", unroll=3)(*args)


def test_dense_layout_matches_reference_with_every_option():
    """The lanes layout's cheap case is test_kernels_pallas.py's `pallas_tpu_small_chunks`."""
    _check((1, 5, DENSE_CHANNELS, 2), "all")


@pytest.mark.slow
@pytest.mark.parametrize("shape,options,dtype,tunables", [
    ((1, 13, DENSE_CHANNELS + 6, 4), "all", jnp.float32, {}),              # dense: 2 channel blocks, 2 chunks
    ((2, 19, 5, 3), "all", jnp.float32, {}),                                # lanes
    ((1, 21, DENSE_CHANNELS, 16), "all", jnp.bfloat16, {}),                 # dense, bf16 in and out
    ((2, 12, 130, 16), "D_z", jnp.bfloat16, {}),                            # lanes, bf16, y in f32 (D, z)
    ((1, 9, DENSE_CHANNELS, 20), "mask", jnp.float32, {"unroll": 2}),       # dense, state in VMEM
    ((1, 21, DENSE_CHANNELS, 12), "plain", jnp.float32, {"state_group": 5}),  # dense, uneven state groups
    ((1, 11, 200, 40), "bias_softplus_h0", jnp.float32, {}),                # lanes, a large state
    ((2, 17, 300, 16), "plain", jnp.bfloat16, {"block_c": 128}),            # lanes, 3 channel blocks
])
def test_layouts_dtypes_and_large_states_match_reference(shape, options, dtype, tunables):
    _check(shape, options, dtype, **tunables)


_COMPILE = """
import glob, json, os, sys
from alignmamba_jax import targets
targets.prepare_compile_host()
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from alignmamba_jax.kernels import selective_scan
pass_, b, l, d, n = sys.argv[1], *map(int, sys.argv[2:6])
device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
                                      chips_per_host_bounds=(1, 1, 1), num_slices=1).devices[0]
mesh = jax.sharding.Mesh(np.array([device]), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
shapes = [(b, l, d), (b, l, d), (d, n), (b, l, n), (b, l, n)]
args = [jax.ShapeDtypeStruct(s, jnp.bfloat16 if len(s) == 3 else jnp.float32, sharding=sharding) for s in shapes]
fn = lambda *a: selective_scan(*a, backend="pallas_tpu")
f = fn if pass_ == "fwd" else jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    hlo = jax.jit(f).lower(*args).compile().as_text()
print(json.dumps({"hlo": hlo}))
"""


def _compiled_kernel(tmp_path, pass_, shape):
    """(HLO of the program, {kernel name: (total scheduled bundles, vector spill stores, VMEM scoped bytes)})
    for `selective_scan(backend="pallas_tpu")` (bf16 u and delta) or its gradient compiled for v5e:1x1."""
    dumps = tmp_path / "dumps"
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "LIBTPU_INIT_ARGS": f"--xla_jf_dump_to={dumps} --xla_jf_dump_llo_text=true"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, pass_, *map(str, shape)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hlo = json.loads(done.stdout.strip().splitlines()[-1])["hlo"]
    kernels = {}
    for name in ("selective_scan_fwd_tpu", "selective_scan_bwd_tpu"):
        schedule = glob.glob(f"{dumps}/*{name}*schedule-analysis_final_bundles.txt")
        if not schedule:
            continue
        prefix = re.sub(r"-\d+-schedule-analysis_final_bundles.txt$", "", schedule[0])
        bundles = int(re.search(r"total scheduled bundles:\s+(\d+)", open(schedule[0]).read()).group(1))
        utilization = open(glob.glob(f"{prefix}-*final_hlo-static-per-bundle-utilization.txt")[0]).read()
        header, table = utilization.split("== UTILIZATION:")
        spill_column = header.split("\n")[1].replace(",", " ").split().index("VSTORE:SPILL")
        spills = sum(int(row.split()[spill_column]) for row in table.splitlines() if row.strip())
        original = open(glob.glob(f"{prefix}-*-original.txt")[0]).read()
        scoped = sum(int(size, 16) for size in re.findall(r"space=vmem, size = (0x[0-9a-f]+), scoped", original))
        kernels[name] = (bundles, spills, scoped)
    return hlo, kernels


_needs_libtpu = pytest.mark.skipif(targets.missing_toolchain("tpu") is not None,
                                   reason=f"compiling for tpu: {targets.missing_toolchain('tpu')}")


@_needs_libtpu
@pytest.mark.parametrize("pass_,shape,budget", [
    ("fwd", (1, 256, DENSE_CHANNELS, 16), {"selective_scan_fwd_tpu": 700}),
    ("fwd", (4, 150, 256, 16), {"selective_scan_fwd_tpu": 700}),
    ("bwd", (1, 256, 256, 16), {"selective_scan_fwd_tpu": 700, "selective_scan_bwd_tpu": 900}),
])
def test_kernels_compile_for_v5e_without_spills_at_state_16(tmp_path, pass_, shape, budget):
    """Budgets: static bundles of the whole kernel (its loops counted once), about 1.4x today's; with the time
    loop a `fori_loop`, they do not grow with the length or the chunk."""
    hlo, kernels = _compiled_kernel(tmp_path, pass_, shape)
    assert set(kernels) == set(budget)
    for name, (bundles, spills, _) in kernels.items():
        assert spills == 0, (name, spills)
        assert bundles <= budget[name], (name, bundles)
    for call in re.findall(r".*custom_call_target=\"tpu_custom_call\".*", hlo):
        operands = re.search(r"operand_layout_constraints=\{(.*?)\}, ", call).group(1)
        assert operands.startswith("bf16["), f"u reaches the kernel as {operands.split('{')[0]}, not bf16"
        if shape[1] == 150:   # MOSEI's fused length: padded to the row group (16 for bf16), not to 128
            assert re.match(r"bf16\[4,160,256\]", operands), operands


@_needs_libtpu
@pytest.mark.parametrize("channels", [256, DENSE_CHANNELS])
def test_forward_and_backward_compile_for_v5e_at_state_128(tmp_path, channels):
    """Mosaic's default scoped VMEM limit (16 MiB on v5e) is too small for a large state's blocks and buffers;
    the kernels ask for what they need. The gradient's program holds both kernels (the forward saves the chunks'
    starting states)."""
    _, kernels = _compiled_kernel(tmp_path, "bwd", (1, 256, channels, 128))
    assert set(kernels) == {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"}
    assert all(scoped > 0 for _, _, scoped in kernels.values())


_OUTSIDE_A_MESH = """
from alignmamba_jax import targets
targets.prepare_compile_host()
import jax, jax.numpy as jnp
from jax.experimental import topologies
from alignmamba_jax.kernels import selective_scan
device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
                                      chips_per_host_bounds=(1, 1, 1), num_slices=1).devices[0]
sharding = jax.sharding.SingleDeviceSharding(device)
args = [jax.ShapeDtypeStruct(s, t, sharding=sharding) for s, t in
        [((2, 150, 256), jnp.bfloat16), ((2, 150, 256), jnp.bfloat16), ((256, 16), jnp.float32),
         ((2, 150, 16), jnp.bfloat16), ((2, 150, 16), jnp.bfloat16)]]
grad = jax.grad(lambda *a: selective_scan(*a, backend="pallas_tpu").astype(jnp.float32).sum(), argnums=(0, 1))
print(jax.jit(grad).lower(*args).compile().as_text())
"""


@_needs_libtpu
def test_outside_a_mesh_a_jit_placed_on_a_tpu_compiles_the_kernel_not_the_interpreter():
    """Without a mesh the platform is only known when lowering: the CPU's branch (the kernel in the generic
    interpreter, plain JAX ops) and the TPU's (the kernel) share one `lax.platform_dependent`."""
    done = subprocess.run([sys.executable, "-c", _OUTSIDE_A_MESH], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    hlo = done.stdout
    assert 'custom_call_target="tpu_custom_call"' in hlo and "callback" not in hlo.lower()
    assert re.search(r"bf16\[2,160,256\]", hlo)                   # bf16 operands, MOSEI's 150 steps as 160


def test_on_the_cpu_selective_scan_interprets_the_kernel_at_dense_widths():
    """The CPU's branch of `selective_scan(backend="pallas_tpu")` takes the lanes layout in the generic
    interpreter even where a TPU takes the dense one (>= 1024 channels)."""
    from alignmamba_jax.kernels import selective_scan
    args, kwargs = make_inputs(5, 1, 11, DENSE_CHANNELS, 2, OPTION_SETS["all"].items())
    y, h = selective_scan(*args, backend="pallas_tpu", return_final_state=True, **kwargs)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert_close_tree([y, h], [y_ref, h_ref], what="values", rtol=1e-4, atol=1e-4)
    fn = lambda *a, **k: selective_scan(*a, backend="pallas_tpu", **k)
    assert_close_tree(grads_of_all_inputs(fn, args, kwargs),
                      grads_of_all_inputs(selective_scan_reference, args, kwargs), what="gradients",
                      rtol=1e-3, atol=1e-3)
