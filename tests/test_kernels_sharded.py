"""Scan kernels under a mesh (kernels/sharding.py), on 4 forced CPU devices with the interpret-mode kernels:
each device scans its own batch rows, nothing is gathered, and values and gradients equal the unsharded call.

Mosaic GPU's interpret mode is left out: its interpreter stalls when several CPU devices run it at once (the
kernel is wrapped the same way; `test_aot.py` compiles it for 8 GPUs).
"""
import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from alignmamba_jax.kernels import resolve_backend, selective_scan
from alignmamba_jax.kernels.testing import OPTION_SETS, make_inputs

backend = sys.argv[1]
args, kwargs = make_inputs(0, 8, 24, 16, 4, OPTION_SETS["all"].items())
h0, mask = kwargs.pop("initial_state"), kwargs.pop("mask")
args = list(args) + [h0, mask]

def loss(u, delta, A, B, C, D, z, delta_bias, h0, mask):
    y, h = selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state=h0, mask=mask, backend=backend,
                          return_final_state=True, **kwargs)
    return jnp.sum(y ** 2) + jnp.sum(jnp.sin(h))

grad = jax.value_and_grad(loss, argnums=tuple(range(9)))
expected = jax.jit(grad)(*args)
mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rows, replicated = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
sharded = [jax.device_put(a, rows if a.shape[:1] == (8,) else replicated) for a in args]
with jax.set_mesh(mesh):
    step = jax.jit(grad)
    compiled = step.lower(*sharded).compile()
    jaxpr = jax.make_jaxpr(grad)(*args)
    found = compiled(*sharded)
errors = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
          for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(found))]

def shard_maps(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            yield [tuple(v.aval.shape) for v in eqn.params["jaxpr"].invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)       # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    yield from shard_maps(sub)

hlo = compiled.as_text()
print(json.dumps({"runs": resolve_backend(backend, "cpu"), "errors": errors,
                  "scale": float(np.max(np.abs(np.asarray(expected[0])))),
                  "shard_map_inputs": list(shard_maps(jaxpr.jaxpr)),
                  "all_gathers": hlo.count("all-gather")}))
"""


@pytest.mark.parametrize("backend", ["pallas_triton", pytest.param("pallas_tpu", marks=pytest.mark.slow), "auto"])
def test_kernel_runs_on_each_devices_batch_shard_with_the_unsharded_values_and_gradients(backend):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, backend], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(result["errors"]) <= 1e-4 * max(1.0, result["scale"]), result["errors"]
    assert result["all_gathers"] == 0
    if result["runs"] == "chunked":   # auto without the C++ kernel: plain XLA, which XLA partitions itself
        return
    # forward and backward each run inside a shard_map whose batch-major inputs hold 8 / 4 devices = 2 rows
    assert len(result["shard_map_inputs"]) >= 2
    for shapes in result["shard_map_inputs"]:
        assert [s for s in shapes if len(s) == 3 and s[1] == 24] and all(
            s[0] == 2 for s in shapes if len(s) == 3 and s[1] == 24), shapes
