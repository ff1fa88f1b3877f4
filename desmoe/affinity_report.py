"""Affinity visibility: heatmaps in the run directory and the ``desmoe affinity RUN_DIR`` report."""

from __future__ import annotations

import glob
import json
import os


def save_affinity_heatmaps(record: dict, path: str) -> None:
    """One PNG: a domains × experts heatmap per MoE layer, selected experts marked with a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, domains = record["layers"], record["domains"]
    n_experts = len(record["affinity"][0][0])
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(4.0, 0.35 * n_experts + 2), 0.45 * len(domains) * len(layers)
                                                      + 1.2 * len(layers)), squeeze=False)
    for li, ax in enumerate(axes[:, 0]):
        aff = record["affinity"][li]
        im = ax.imshow(aff, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        for d in range(len(domains)):
            for e in range(n_experts):
                if record["masks"][li][d][e]:
                    ax.plot(e, d, "o", color="white", markersize=3)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xticks(range(n_experts))
        ax.set_title(f"layer {layers[li]} — step {record['step']} (dot: expert trains on the domain)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_latest_selection(run_dir: str) -> dict:
    """The newest affinity record (desmoe modes) or the ESFT selection of a run directory."""
    records = sorted(glob.glob(os.path.join(run_dir, "affinity", "step*.json")))
    if records:
        with open(records[-1], encoding="utf-8") as f:
            rec = json.load(f)
        rec["source"] = records[-1]
        return rec
    esft = os.path.join(run_dir, "esft_selection.json")
    if os.path.isfile(esft):
        with open(esft, encoding="utf-8") as f:
            sel = json.load(f)
        n_experts = len(sel["scores"][0][0])
        masks = [[[int(e in sel["selected"][d][li]) for e in range(n_experts)] for d in sel["domains"]]
                 for li in range(len(sel["layers"]))]
        return {"step": "esft profile", "domains": sel["domains"], "layers": sel["layers"], "masks": masks,
                "affinity": sel["scores"], "source": esft}
    raise FileNotFoundError(f"{run_dir} has no affinity/step*.json and no esft_selection.json. Point desmoe affinity "
                            "at the run directory of a desmoe or esft run (it must have passed an affinity update).")


def format_report(rec: dict) -> str:
    """Each domain's experts per layer, and the experts shared by each pair of domains."""
    domains = rec["domains"]
    lines = [f"affinity from {rec['source']} (step {rec['step']})"]
    for li, layer in enumerate(rec["layers"]):
        lines.append(f"layer {layer}:")
        sets = {}
        for d, name in enumerate(domains):
            chosen = [e for e, on in enumerate(rec["masks"][li][d]) if on]
            sets[name] = set(chosen)
            lines.append(f"  {name:<14} experts {chosen}")
        for i, a in enumerate(domains):
            for b in domains[i + 1:]:
                shared, union = sets[a] & sets[b], sets[a] | sets[b]
                jac = len(shared) / len(union) if union else 0.0
                lines.append(f"  overlap {a} / {b}: {sorted(shared)} (Jaccard {jac:.2f})")
    return "\n".join(lines)
