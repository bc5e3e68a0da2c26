"""Plots of learned alignments: `plot_ot_plan` draws one OT plan as a heat map (AlignMamba's Figure 5 style).

matplotlib is imported lazily with the Agg backend, so importing this module costs nothing and works headless.
"""
from typing import Optional, Sequence

import numpy as np


def plot_ot_plan(plan, path: str, *, source_name: str = "audio", anchor_name: str = "language",
                 source_mask=None, anchor_mask=None, anchor_tokens: Optional[Sequence[str]] = None,
                 reference=None, title: Optional[str] = None, dpi: int = 150) -> str:
    """Write the transport plan `plan` (T_source, T_anchor) of one sample to a PNG at `path`; return `path`.

    Rows are source time steps, columns anchor tokens (labelled with `anchor_tokens` if given); masked
    rows/columns are cropped away (right padding assumed). Darker = more mass. `reference` (T_source,) ints, if
    given: the true anchor index of each source step (negative = none), drawn as red dots over the plan.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = np.asarray(plan, np.float32)
    if plan.ndim != 2:
        raise ValueError(f"plan must be (T_source, T_anchor) for one sample, found shape {plan.shape}")
    n_src = int(np.sum(source_mask)) if source_mask is not None else plan.shape[0]
    n_anc = int(np.sum(anchor_mask)) if anchor_mask is not None else plan.shape[1]
    plan = plan[:n_src, :n_anc]
    if anchor_tokens is not None and len(anchor_tokens) < n_anc:
        raise ValueError(f"anchor_tokens has {len(anchor_tokens)} labels for {n_anc} valid anchor tokens")

    fig, ax = plt.subplots(figsize=(max(3.0, 0.3 * n_anc + 1.5), min(14.0, max(3.0, 0.15 * n_src + 1.5))))
    image = ax.imshow(plan, aspect="auto", cmap="Blues", interpolation="nearest",
                      vmin=0.0, vmax=float(plan.max()) if plan.size and plan.max() > 0 else 1.0)
    if reference is not None:
        reference = np.asarray(reference)[:n_src]
        rows = np.flatnonzero(reference >= 0)
        ax.scatter(reference[rows], rows, s=2, c="red", marker="o", linewidths=0, label="true match")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel(f"{anchor_name} tokens")
    ax.set_ylabel(f"{source_name} time steps")
    if anchor_tokens is not None:
        ax.set_xticks(range(n_anc))
        ax.set_xticklabels(list(anchor_tokens)[:n_anc], rotation=90, fontsize=7)
    ax.set_title(title or f"OT plan: {source_name} -> {anchor_name}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="transported mass")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
