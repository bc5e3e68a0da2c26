"""Selective-scan kernels: one public `selective_scan` dispatching to interchangeable backends."""
from alignmamba_jax.kernels.reference import selective_scan_reference

_BACKENDS = {"reference": selective_scan_reference}


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                   return_final_state=False, backend="auto", initial_state=None, mask=None):
    """Mamba's selective scan, channels-last. See `reference.py` for the exact semantics."""
    impl = _BACKENDS["reference" if backend == "auto" else backend]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                initial_state=initial_state, mask=mask, return_final_state=return_final_state)


__all__ = ["selective_scan", "selective_scan_reference"]
