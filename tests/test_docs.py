"""The docs site (mkdocs.yml, docs/) builds with warnings as errors, so a broken docstring reference or link
fails here, and its API page documents the public pure functions: each one's signature with every argument,
and its docstring."""
import html
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

NEEDS = "needs the docs extra (Python >= 3.11): pip install -e '.[docs]'"
pytest.importorskip("mkdocs", reason=NEEDS)
pytest.importorskip("mkdocstrings_handlers.python", reason=NEEDS)

from alignmamba_jax.align import mmd, ot_align, sinkhorn  # noqa: E402
from alignmamba_jax.kernels import selective_scan  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTED = {"alignmamba_jax.kernels.selective_scan": selective_scan, "alignmamba_jax.align.ot_align": ot_align,
              "alignmamba_jax.align.mmd": mmd, "alignmamba_jax.align.sinkhorn": sinkhorn}


def text(fragment):
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_the_site_builds_strictly_and_its_api_page_documents_the_pure_functions(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-5000:]
    assert {"index.html", "training.html", "compiling.html", "kernels.html", "adding-a-backend.html",
            "alignment.html", "results.html", "api.html"} <= {p.name for p in site.iterdir()}
    page = (site / "api.html").read_text()
    for path, function in DOCUMENTED.items():
        start = page.index(f'id="{path}"')
        end = page.find('class="doc doc-heading"', page.index("</h", start))   # the next object's heading
        section = page[start:end if end > 0 else len(page)]
        signature = text(re.search(r'<div class="doc-signature.*?</code>', section, re.S).group(0))
        assert signature.startswith(f"{function.__name__}("), signature
        for name in inspect.signature(function).parameters:
            assert re.search(rf"[(,*]\s*{name}\b", signature), f"{path}: argument {name} missing in {signature}"
        summary = inspect.getdoc(function).splitlines()[0]
        assert " ".join(summary.replace("`", "").split()) in " ".join(text(section).split()), path
