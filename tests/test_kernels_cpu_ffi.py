"""Tests of the `cpu_ffi` backend (C++ kernels through XLA's FFI) against the reference: values, final state and
gradients of every input for every option set and bfloat16, vmap / jit / grad / remat compositions, memory,
the fallback where no compiler exists, and a sharded call on forced multi-device CPU.

Shapes are chosen around the kernel's structure: channels a multiple of its 8 lanes or not, state 16 (the
compiled-in size) or not, lengths shorter than, equal to a multiple of, and longer than its 64-step chunk.
Masks with inf / NaN under them and empty inputs are in test_kernels_masking.py (cpu_ffi is one of its backends).
"""
import functools
import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmamba_jax import kernels
from alignmamba_jax.kernels import cpu_ffi, selective_scan, selective_scan_reference
from alignmamba_jax.kernels.testing import (OPTION_SETS, assert_close_tree, grads_of_all_inputs, make_inputs,
                                            numpy_scan)

BUILT, DETAIL = cpu_ffi.available()
requires_library = pytest.mark.skipif(not BUILT, reason=f"cpu_ffi could not be built here: {DETAIL}")
FFI = functools.partial(selective_scan, backend="cpu_ffi")
CASES = [((1, 1, 1, 1), "all"), ((2, 7, 3, 4), "plain"), ((1, 33, 5, 2), "bias_softplus_h0"), ((2, 70, 20, 16), "all"),
         ((3, 128, 17, 16), "D_z"), ((1, 129, 8, 5), "mask"), ((2, 200, 9, 33), "all")]
OPTION_NAMES = ("D", "z", "delta_bias", "delta_softplus", "initial_state", "mask")


def check_against_reference(args, kwargs, rtol=1e-4, atol=1e-4, grad_tol=1e-3):
    y, h = jax.jit(lambda a: FFI(*a, return_final_state=True, **kwargs))(args)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], rtol=rtol, atol=atol, what="values")
    assert_close_tree(grads_of_all_inputs(FFI, args, kwargs), grads_of_all_inputs(selective_scan_reference, args, kwargs),
                      rtol=grad_tol, atol=grad_tol, what="gradients")


@requires_library
@pytest.mark.parametrize("shape,options", CASES)
def test_values_final_state_and_gradients_equal_the_reference(shape, options):
    args, kwargs = make_inputs(20, *shape, OPTION_SETS[options].items())
    check_against_reference(args, kwargs)


@requires_library
def test_values_equal_an_independent_numpy_loop():
    args, kwargs = make_inputs(21, 2, 70, 11, 16, OPTION_SETS["all"].items())
    y, h = FFI(*args, return_final_state=True, **kwargs)
    as_numpy = lambda x: x if x is None or isinstance(x, bool) else np.asarray(x)  # noqa: E731  (fast indexing)
    y_np, h_np = numpy_scan(*map(as_numpy, args), **{k: as_numpy(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(y, y_np, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h, h_np, rtol=1e-4, atol=1e-4)


@requires_library
@pytest.mark.slow
@pytest.mark.parametrize("chosen", [c for r in range(len(OPTION_NAMES) + 1)
                                    for c in itertools.combinations(OPTION_NAMES, r)], ids=str)
def test_every_option_combination_equals_the_reference(chosen):
    args, kwargs = make_inputs(22, 2, 75, 10, 16, {name: True for name in chosen}.items())
    check_against_reference(args, kwargs)


@requires_library
@pytest.mark.slow
def test_large_shape_equals_the_reference():
    args, kwargs = make_inputs(23, 4, 1024, 256, 16, OPTION_SETS["all"].items())
    check_against_reference(args, kwargs, rtol=1e-3, atol=1e-3, grad_tol=5e-3)


@requires_library
def test_bfloat16_inputs_with_float32_state_equal_the_reference_on_the_same_inputs():
    args, kwargs = make_inputs(24, 2, 70, 12, 16, OPTION_SETS["all"].items(), dtype=jnp.bfloat16)
    y, h = FFI(*args, return_final_state=True, **kwargs)
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, **kwargs)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert_close_tree([y, h], [y_ref, h_ref], rtol=2e-2, atol=2e-2, what="values")
    grads = grads_of_all_inputs(FFI, args, kwargs)
    grads_ref = grads_of_all_inputs(selective_scan_reference, args, kwargs)
    assert [g.dtype for g in grads] == [g.dtype for g in grads_ref]
    assert_close_tree(grads, grads_ref, rtol=3e-2, atol=5e-2, what="gradients")


@requires_library
def test_extreme_delta_and_A_stay_finite():
    args, kwargs = make_inputs(25, 2, 37, 9, 16, OPTION_SETS["D_z"].items())
    args[1] = jnp.full_like(args[1], 1e3)
    args[2] = jnp.full_like(args[2], -1e3).at[0, 0].set(-1e-3)
    y = FFI(*args)
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads_of_all_inputs(FFI, args, kwargs))
    assert_close_tree([y], [selective_scan_reference(*args)], rtol=1e-4, atol=1e-3)


@requires_library
def test_split_in_two_with_carried_state_equals_the_whole_scan():
    args, kwargs = make_inputs(26, 2, 150, 9, 16, OPTION_SETS["all"].items())
    whole, h_whole = FFI(*args, return_final_state=True, **kwargs)
    k = 71
    part = lambda s: [a[:, s] if a is not None and a.ndim == 3 else a for a in args]  # noqa: E731
    y1, h1 = FFI(*part(slice(None, k)), return_final_state=True, **dict(kwargs, mask=kwargs["mask"][:, :k]))
    y2, h2 = FFI(*part(slice(k, None)), return_final_state=True,
                 **dict(kwargs, mask=kwargs["mask"][:, k:], initial_state=h1))
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h_whole, rtol=1e-5, atol=1e-5)


@requires_library
def test_vmap_jit_grad_and_remat_compositions():
    fn = functools.partial(FFI, delta_softplus=True)
    ref = functools.partial(selective_scan_reference, delta_softplus=True)
    batches = [make_inputs(s, 2, 70, 9, 16)[0][:5] for s in range(3)]
    stacked = [jnp.stack(xs) for xs in zip(*batches)]
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(*stacked), jax.vmap(ref)(*stacked), rtol=1e-4, atol=1e-4)

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    argnums = (0, 1, 2, 3, 4)
    assert_close_tree(jax.jit(jax.grad(jax.checkpoint(loss(fn)), argnums=argnums))(*batches[0]),
                      jax.grad(loss(ref), argnums=argnums)(*batches[0]), rtol=1e-3, atol=1e-3, what="remat")
    assert_close_tree(jax.jit(jax.vmap(jax.grad(loss(fn), argnums=argnums)))(*stacked),
                      jax.vmap(jax.grad(loss(ref), argnums=argnums))(*stacked), rtol=1e-3, atol=1e-3,
                      what="vmap of grad")


@requires_library
def test_auto_on_cpu_is_cpu_ffi():
    assert kernels.backends()["auto"] == (True, "cpu_ffi")
    args, kwargs = make_inputs(27, 2, 70, 9, 16, OPTION_SETS["all"].items())
    np.testing.assert_array_equal(selective_scan(*args, **kwargs), FFI(*args, **kwargs))


@requires_library
def test_gradient_keeps_no_full_state_tensor_and_no_more_temporaries_than_chunked():
    batch, length, channels, state = 2, 512, 64, 16
    args, _ = make_inputs(28, batch, length, channels, state)

    def temp_bytes(backend):
        loss = lambda *a: jnp.sum(selective_scan(*a, backend=backend))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args[:5]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ffi_bytes = temp_bytes("cpu_ffi")
    assert ffi_bytes < batch * length * channels * state * 4
    assert ffi_bytes <= temp_bytes("chunked")


def run_python(code, env_changes, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_changes)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_a_compiler_auto_falls_back_to_chunked_and_says_why(tmp_path):
    report = run_python("""
        import json
        import numpy as np
        from alignmamba_jax import kernels
        from alignmamba_jax.kernels.testing import make_inputs
        args, _ = make_inputs(0, 2, 9, 3, 4)
        y = kernels.selective_scan(*args[:5])
        same = bool(np.array_equal(y, kernels.selective_scan(*args[:5], backend="chunked")))
        try:
            kernels.selective_scan(*args[:5], backend="cpu_ffi")
            error = None
        except RuntimeError as e:
            error = str(e)
        print(json.dumps({"backends": kernels.backends(), "auto_equals_chunked": same, "error": error}))
    """, {"CXX": str(tmp_path / "no-such-compiler"), "ALIGNMAMBA_CACHE_DIR": str(tmp_path / "cache")})
    ok, reason = report["backends"]["cpu_ffi"]
    assert not ok and "no-such-compiler" in reason
    assert report["backends"]["auto"] == [True, "chunked"] and report["auto_equals_chunked"]
    assert "cpu_ffi" in report["error"] and "no-such-compiler" in report["error"]
    assert not list((tmp_path / "cache").glob("*.so"))


SHARDED = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from alignmamba_jax.kernels import selective_scan, selective_scan_reference
    from alignmamba_jax.kernels.testing import OPTION_SETS, make_inputs
    args, kwargs = make_inputs(29, 8, 70, 9, 16, OPTION_SETS["all"].items())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    put = lambda x: None if x is None else jax.device_put(x, batch if x.shape[0] == 8 else NamedSharding(mesh, P()))
    softplus = kwargs.pop("delta_softplus")
    args, kwargs = [put(a) for a in args], {k: put(v) for k, v in kwargs.items()}
    fn = jax.jit(lambda a, k: selective_scan(*a, backend="cpu_ffi", return_final_state=True,
                                             delta_softplus=softplus, **k))
    with jax.set_mesh(mesh):    # the mesh the kernel is run per device on (kernels/sharding.py)
        y, h = fn(args, kwargs)
        hlo = fn.lower(args, kwargs).compile().as_text()
    y_ref, h_ref = selective_scan_reference(*args, return_final_state=True, delta_softplus=softplus, **kwargs)
    print(json.dumps({"devices": len(jax.devices()), "y_error": float(jnp.max(jnp.abs(y - y_ref))),
                      "h_error": float(jnp.max(jnp.abs(h - h_ref))), "y_sharded": not y.sharding.is_fully_replicated,
                      "gathers": hlo.count("all-gather")}))
"""


@pytest.fixture(scope="module")
def sharded_run():
    return run_python(SHARDED, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})


@requires_library
def test_sharded_call_on_four_cpu_devices_equals_the_reference(sharded_run):
    assert sharded_run["devices"] == 4
    assert sharded_run["y_error"] < 1e-4 and sharded_run["h_error"] < 1e-4


@requires_library
def test_sharded_call_scans_each_devices_shard(sharded_run):
    assert sharded_run["gathers"] == 0 and sharded_run["y_sharded"]


def fake_compiler(tmp_path, name, action):
    """A `CXX` that runs `action` (shell, with $out the -o path) and logs each call to tmp_path/<name>.calls."""
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=\"$2\"; shift; done\n"
                      f"echo call >> {tmp_path / (name + '.calls')}\n{action}\n")
    script.chmod(0o755)
    return script


def calls(tmp_path, name):
    log = tmp_path / (name + ".calls")
    return len(log.read_text().splitlines()) if log.exists() else 0


AVAILABLE = """
    import json
    from alignmamba_jax.kernels import cpu_ffi
    print(json.dumps(cpu_ffi.available()))
"""


@requires_library
def test_a_truncated_or_broken_cached_library_is_rebuilt_and_a_broken_build_is_never_cached(tmp_path):
    """The compilers here copy the library this process built (a real compile takes 20 s) or write junk and
    exit 0 (a faulty CXX). The truncated library is only ever loaded by child processes (it could kill its
    loader with SIGBUS)."""
    cache = tmp_path / "cache"
    junk = fake_compiler(tmp_path, "junk", 'printf "not a library" > "$out"')
    good = fake_compiler(tmp_path, "good", f'cp {DETAIL} "$out"')
    builds = run_python(f"""
        import json, os
        from alignmamba_jax.kernels import cpu_ffi
        os.environ["CXX"] = {str(junk)!r}
        try:
            cpu_ffi.build()
        except RuntimeError as error:
            junk = str(error)
        cached_after_junk = sorted(os.listdir({str(cache)!r}))
        os.environ["CXX"] = {str(good)!r}
        print(json.dumps({{"junk": junk, "cached_after_junk": cached_after_junk,
                          "paths": [str(cpu_ffi.build()), str(cpu_ffi.build())]}}))
    """, {"ALIGNMAMBA_CACHE_DIR": str(cache)})
    assert builds["junk"].startswith(f"the library {junk} built is unusable: it does not load (OSError: "), builds
    assert builds["junk"].endswith("nothing was cached") and builds["cached_after_junk"] == [], builds
    (library,) = cache.glob("*.so")
    assert builds["paths"] == [str(library)] * 2 and calls(tmp_path, "good") == 1   # the second found it valid
    assert library.with_name(library.name + ".sha256").exists()

    size = library.stat().st_size
    with open(library, "r+b") as f:       # a copy cut short (a full disk, a killed copy)
        f.truncate(size // 3)
    report = run_python("""
        import json
        import numpy as np
        from alignmamba_jax import kernels
        from alignmamba_jax.kernels.testing import make_inputs
        args, _ = make_inputs(0, 2, 9, 3, 4)
        same = bool(np.allclose(kernels.selective_scan(*args[:5], backend="cpu_ffi"),
                                kernels.selective_scan(*args[:5], backend="chunked"), atol=1e-5))
        print(json.dumps({"cpu_ffi": kernels.cpu_ffi.available(), "same": same}))
    """, {"CXX": str(good), "ALIGNMAMBA_CACHE_DIR": str(cache)})
    assert report["cpu_ffi"][0] and report["same"], report
    assert calls(tmp_path, "good") == 2 and library.stat().st_size == size
    assert sorted(p.name for p in cache.iterdir()) == [library.name, library.name + ".sha256"]


def test_a_cache_directory_that_cannot_be_written_names_alignmamba_cache_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ok, reason = run_python(AVAILABLE, {"ALIGNMAMBA_CACHE_DIR": str(blocker / "cache")})
    assert not ok and "ALIGNMAMBA_CACHE_DIR" in reason and str(blocker / "cache") in reason, reason
