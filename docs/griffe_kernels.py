"""Griffe extension for the API reference: `kernels/` is installed as `alignmamba_jax.kernels` (setup.py's
package_dir), which reading the source tree alone cannot see; this attaches it under that name."""
import pathlib

import griffe

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


class KernelsSubpackage(griffe.Extension):
    def on_package(self, *, pkg, loader, **kwargs):
        if pkg.name == "alignmamba_jax" and "kernels" not in pkg.members:
            pkg.set_member("kernels", loader.load(KERNELS))

    on_package_loaded = on_package   # the same hook's name before griffe 2
