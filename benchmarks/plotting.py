"""Figure helpers for the benchmark scripts (matplotlib, Agg backend, PNG out). No computation lives here."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

MODEL_LABELS = {
    "alignmamba": "AlignMamba",
    "transformer_single": "Single-stream Transformer",
    "transformer_multi": "Multi-stream Transformer",
}
MODEL_STYLES = {
    "alignmamba": dict(color="tab:red", marker="o"),
    "transformer_single": dict(color="tab:blue", marker="s"),
    "transformer_multi": dict(color="tab:green", marker="^"),
}


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_efficiency(rows, key, ylabel, path, scale=1.0, title=None):
    """One line per model of rows[key] * scale against the fused-token count (Figures 3 and 4 of the paper)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model in MODEL_LABELS:
        pts = sorted((r["tokens"], r[key]) for r in rows if r["model"] == model and r.get(key) is not None)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, [y * scale for y in ys], label=MODEL_LABELS[model], **MODEL_STYLES[model])
    ax.set_xlabel("fused tokens (audio + video + language)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_grouped_bars(panels, path, title=None):
    """Several bar panels side by side: panels = [(ylabel, names, means, stds), ...]."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, names, means, stds) in zip(axes, panels):
        colors = ["tab:red" if i == 0 else "tab:gray" for i in range(len(names))]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = 0.15 * (hi - lo) + 1e-6
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_curve_panels(panels, xlabel, path, title=None):
    """panels = [(panel title, ylabel, {label: (xs, means, stds)}), ...] side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (panel_title, ylabel, curves) in zip(axes[0], panels):
        for label, (xs, means, stds) in curves.items():
            line, = ax.plot(xs, means, marker="o", label=label)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
