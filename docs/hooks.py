"""MkDocs hook: benchmarks/RESULTS.md and its history, RESULTS_LOG.md, with the figures and result files they link,
join the site under benchmarks/, so that the docs link to the measured tables and a broken link in them fails the
build."""
import pathlib

from mkdocs.structure.files import File

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def on_files(files, config):
    paths = [BENCHMARKS / "RESULTS.md", BENCHMARKS / "RESULTS_LOG.md"] + sorted(p for folder in ("figures", "results")
                                                 for p in (BENCHMARKS / folder).rglob("*") if p.is_file())
    for path in paths:
        files.append(File.generated(config, f"benchmarks/{path.relative_to(BENCHMARKS).as_posix()}",
                                    abs_src_path=str(path)))
    return files
