"""Affinity visibility: the heatmaps of each affinity update, the figure of how each domain's experts
evolved over a run, and the ``desmoe affinity RUN_DIR`` report.

Figures are drawn with matplotlib's object-oriented API (a ``Figure`` on an Agg canvas, no pyplot): no
global backend or figure registry is touched. During training the heatmaps are drawn in a child process
(desmoe.rundir.FigureWriter runs figure_worker). matplotlib is imported inside the drawing functions: it
is heavy, and the report does not need it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

from desmoe.figures import canvas_figure, save_png

AFFINITY_DIR = "affinity"
EVOLUTION_FILE = "evolution.png"
"""plot_evolution's default output, beside the records: affinity/evolution.png."""
COLORBAR_LABEL = "affinity: share of the domain's tokens routed to the expert"
NO_ESTIMATE_COLOR = "#d4d4d4"
DPI = 100


def _tick_step(n: int, most: int) -> int:
    """Label every k-th of n integer positions so that at most ``most`` labels show."""
    return max(1, math.ceil(n / most))


# ---- one affinity update -----------------------------------------------------------------------


def save_affinity_heatmaps(record: dict, path: str) -> None:
    """One PNG for one affinity update (a desmoe.method record): per MoE layer a domains x experts
    heatmap of the affinity (shared colour scale, 0 to the largest value), a dot on each expert the
    domain selected (trains on), grey where there is no estimate yet (-1 / NaN: no token of the
    domain seen). The figure grows with the grid (cells of 0.16-0.4 in: 64 domains x 64 experts x 4
    layers is about 2300 x 2300 px), every domain row keeps its name; expert labels thin out when crowded."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    layers, domains = record["layers"], record["domains"]
    aff = np.asarray(record["affinity"], dtype=float)  # [L, D, E]
    masks = np.asarray(record["masks"], dtype=bool)
    n_layers, n_domains, n_experts = aff.shape
    missing = ~np.isfinite(aff) | (aff < 0)
    shown = np.ma.masked_array(np.where(missing, 0.0, aff), mask=missing)
    vmax = float(aff[~missing].max()) if (~missing).any() else 1.0
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
    cmap = colormaps["viridis"].with_extremes(bad=NO_ESTIMATE_COLOR)

    # geometry in inches: square cells, a label column, panels in a grid that stays roughly square
    cell = min(0.4, max(0.16, 5.0 / max(n_experts, n_domains)))
    label_w = 0.35 + 0.065 * max(len(str(d)) for d in domains)
    panel_w, panel_h = label_w + n_experts * cell + 0.3, n_domains * cell + 0.75
    ncols = max(1, min(n_layers, round(math.sqrt(n_layers * panel_h / panel_w))))
    nrows = math.ceil(n_layers / ncols)
    top, bottom = 1.1, 0.1
    width = max(6.5, ncols * panel_w + 0.2)
    height = top + nrows * panel_h + bottom
    fig = canvas_figure(width, height, dpi=DPI)
    fig.suptitle(f"Expert-domain affinity at step {record['step']}", x=0.02, y=1 - 0.12 / height, ha="left",
                 va="top", fontsize=11)
    font = 7 if cell < 0.3 else 8
    # every domain is named while a row is tall enough for its label (cells never go below 0.16 in, 11.5 pt)
    y_step = 1 if cell * 72 >= 1.3 * font else _tick_step(n_domains, 40)
    x_step = _tick_step(n_experts, 16)
    image = None
    for i in range(n_layers):
        r, c = divmod(i, ncols)
        x0, y0 = c * panel_w + label_w, height - top - (r + 1) * panel_h + 0.45
        ax = fig.add_axes((x0 / width, y0 / height, n_experts * cell / width, n_domains * cell / height))
        image = ax.imshow(shown[i], cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ds, es = np.nonzero(masks[i])
        ax.scatter(es, ds, s=(cell * 72 * 0.32) ** 2, c="white", edgecolors="black", linewidths=0.6)
        ax.set_title(f"MoE layer {layers[i]}", fontsize=font + 1, loc="left", pad=3)
        ax.set_yticks([])  # domain names as plain texts: a tick per row costs ~5 ms each
        for d in range(0, n_domains, y_step):
            ax.text(-0.04 / (n_experts * cell), d, str(domains[d]), transform=ax.get_yaxis_transform(),
                    ha="right", va="center", fontsize=font)
        ax.set_xticks(range(0, n_experts, x_step), [str(e) for e in range(0, n_experts, x_step)], fontsize=font)
        line = 0.4 if cell < 0.3 else 0.8  # cell borders: two line collections (minor ticks cost seconds)
        ax.vlines(np.arange(0.5, n_experts - 1), -0.5, n_domains - 0.5, colors="white", linewidth=line)
        ax.hlines(np.arange(0.5, n_domains - 1), -0.5, n_experts - 0.5, colors="white", linewidth=line)
        ax.tick_params(length=2, pad=1)
        ax.set_xlabel("expert", fontsize=font, labelpad=1)
    cax = fig.add_axes((0.35 / width, (height - 0.72) / height, min(3.6, width - 3.2) / width, 0.13 / height))
    fig.colorbar(image, cax=cax, orientation="horizontal")
    cax.set_xlabel(COLORBAR_LABEL, fontsize=8, labelpad=2)
    cax.tick_params(labelsize=7, length=2, pad=1)
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black",
                      label="selected: the expert trains on the domain"),
               Patch(facecolor=NO_ESTIMATE_COLOR, label="no estimate (no token of the domain yet)")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((min(3.6, width - 3.2) + 0.6) / width,
                                                                   (height - 0.4) / height),
               fontsize=7, frameon=False, handlelength=1.2, borderaxespad=0)
    save_png(fig, path)


def figure_worker(lines=None, out=None) -> None:
    """The loop of desmoe.rundir.FigureWriter's child process: per input line ``[json path, png path]``,
    draw that record's heatmaps and answer ``[png path, null]`` or ``[png path, "error"]`` on ``out``."""
    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out
    for line in lines:
        json_path, png_path = json.loads(line)
        try:
            with open(json_path, encoding="utf-8") as f:
                save_affinity_heatmaps(json.load(f), png_path)
            error = None
        except Exception as e:  # answered, never raised: the next figure may still work
            error = f"{type(e).__name__}: {e}"
        out.write(json.dumps([png_path, error]) + "\n")
        out.flush()


# ---- a run's affinity records ------------------------------------------------------------------


def affinity_records(run_dir: str) -> list[str]:
    """The run's affinity/step*.json files, oldest first (their names sort by step)."""
    return sorted(glob.glob(os.path.join(run_dir, AFFINITY_DIR, "step*.json")))


def load_records(run_dir: str) -> list[dict]:
    """Every affinity record of a run, by step; FileNotFoundError without any, ValueError for a file that is
    not a record or does not match the first one (domains, layers, experts)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the --output-dir of a desmoe run.")
    paths = affinity_records(run_dir)
    if not paths:
        raise FileNotFoundError(f"{run_dir} has no affinity/step*.json: only desmoe modes write them, at each "
                                "affinity update (method.affinity_update_every steps).")
    records = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            shape = (len(rec["layers"]), len(rec["domains"]), len(rec["masks"][0][0]))
            if [len(rec["masks"]), len(rec["masks"][0])] != list(shape[:2]) or not isinstance(rec["step"], int):
                raise ValueError("masks do not match layers and domains")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path} is not an affinity record of {run_dir} ({type(e).__name__}: {e}).") from None
        if records and (rec["domains"], rec["layers"], shape[2]) != (records[0]["domains"], records[0]["layers"],
                                                                     len(records[0]["masks"][0][0])):
            raise ValueError(f"{path} has domains {rec['domains']}, layers {rec['layers']}, {shape[2]} experts; "
                             f"{paths[0]} of the same run {run_dir} has others: their evolution cannot be drawn.")
        rec["source"] = path
        records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def load_latest_selection(run_dir: str) -> dict:
    """The newest affinity record (desmoe modes) or the ESFT selection of a run directory."""
    records = affinity_records(run_dir)
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


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


FULL_OVERLAP_UP_TO = 8
"""format_report lists every pair's shared experts up to this many domains (28 pairs); above it, a line per
domain with its closest domains (D·(D-1)/2 lines would be 2016 per layer at 64 domains)."""


def format_report(rec: dict, *, closest: int = 3) -> str:
    """Each domain's experts per layer and how they overlap: up to FULL_OVERLAP_UP_TO domains the experts
    shared by each pair; with more, per domain its expert count, experts and the ``closest`` domains whose
    sets overlap most (Jaccard), and a per-layer summary (every pair is in the record's masks)."""
    domains = rec["domains"]
    width = max([14, *(len(str(d)) for d in domains)])
    many = len(domains) > FULL_OVERLAP_UP_TO
    lines = [f"affinity from {rec['source']} (step {rec['step']})"]
    if many:
        lines.append(f"{len(domains)} domains: per domain its experts and the {closest} domains sharing most of "
                     f"them (Jaccard); every pair's overlap follows from the masks in {rec['source']}")
    for li, layer in enumerate(rec["layers"]):
        lines.append(f"layer {layer}:")
        sets = [{e for e, on in enumerate(row) if on} for row in rec["masks"][li]]
        if not many:
            for name, chosen in zip(domains, sets):
                lines.append(f"  {name:<{width}} experts {sorted(chosen)}")
            for i, a in enumerate(domains):
                for j in range(i + 1, len(domains)):
                    shared, union = sets[i] & sets[j], sets[i] | sets[j]
                    jac = len(shared) / len(union) if union else 0.0
                    lines.append(f"  overlap {a} / {domains[j]}: {sorted(shared)} (Jaccard {jac:.2f})")
            continue
        pair = [[jaccard(a, b) for b in sets] for a in sets]
        for d, name in enumerate(domains):
            near = sorted((o for o in range(len(domains)) if o != d), key=lambda o: (-pair[d][o], o))[:closest]
            lines.append(f"  {name:<{width}} {len(sets[d]):>3} experts {sorted(sets[d])} | closest: "
                         + ", ".join(f"{domains[o]} {pair[d][o]:.2f}" for o in near))
        n_experts = len(rec["masks"][li][0])
        chosen_by = [sum(e in s for s in sets) for e in range(n_experts)]
        off_diag = [pair[i][j] for i in range(len(sets)) for j in range(i + 1, len(sets))]
        lines.append(f"  summary: {sum(map(len, sets)) / len(sets):.1f} experts per domain, mean Jaccard "
                     f"{sum(off_diag) / len(off_diag):.2f} over {len(off_diag)} pairs, max {max(off_diag):.2f}; "
                     f"{chosen_by.count(0)} of {n_experts} experts selected by no domain, the busiest by "
                     f"{max(chosen_by)} domains")
    return "\n".join(lines)


# ---- how the selection evolved over a run ------------------------------------------------------


def evolution_summary(run_dir: str) -> dict:
    """The numbers behind plot_evolution, per MoE layer l, domain d and affinity update s (steps[s]):

    selected[l][d][s]     the experts the domain selected (trains on)
    set_size[l][d][s]     how many
    jaccard_to_final[l][d][s]        Jaccard of that set with the domain's set at the last update
    mean_jaccard_to_others[l][d][s]  mean Jaccard with every other domain's set at the same update
                                     (None with a single domain)

    Two empty sets count as identical (Jaccard 1)."""
    records = load_records(run_dir)
    first = records[0]
    n_domains = len(first["domains"])
    sel = [[[{e for e, on in enumerate(r["masks"][li][d]) if on} for r in records] for d in range(n_domains)]
           for li in range(len(first["layers"]))]
    return {"run_dir": run_dir, "records": [r["source"] for r in records], "steps": [r["step"] for r in records],
            "domains": first["domains"], "layers": first["layers"], "num_experts": len(first["masks"][0][0]),
            "selected": [[[sorted(s) for s in dom] for dom in layer] for layer in sel],
            "set_size": [[[len(s) for s in dom] for dom in layer] for layer in sel],
            "jaccard_to_final": [[[jaccard(s, dom[-1]) for s in dom] for dom in layer] for layer in sel],
            "mean_jaccard_to_others": [[[sum(jaccard(layer[d][s], layer[o][s]) for o in range(n_domains) if o != d)
                                         / (n_domains - 1) if n_domains > 1 else None
                                         for s in range(len(records))] for d in range(n_domains)] for layer in sel]}


def _domain_colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def plot_evolution(run_dir: str, out_path: str | None = None) -> str:
    """Draw how each domain's expert set evolved over the run's affinity updates; returns the PNG's path
    (default: RUN_DIR/affinity/evolution.png). Per MoE layer a row of three panels over the step: the
    number of experts each domain selects, the Jaccard of its set with its final set, and its mean Jaccard
    with the other domains' sets (evolution_summary holds the numbers). FileNotFoundError for a run
    without affinity records, ValueError for records that do not belong together."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    s = evolution_summary(run_dir)
    out_path = out_path or os.path.join(run_dir, AFFINITY_DIR, EVOLUTION_FILE)
    steps, domains, layers = s["steps"], s["domains"], s["layers"]
    colors = _domain_colors(len(domains))
    marker = "o" if len(steps) <= 30 else None
    legend_cols = math.ceil((len(domains) + 1) / 24)
    legend_w = 0.3 + legend_cols * (0.5 + 0.07 * max(len(str(d)) for d in [*domains, "mean of domains"]))
    width, row_h, top = 3 * 3.7 + legend_w, 2.5, 0.75
    height = top + row_h * len(layers)
    fig = canvas_figure(width, height, dpi=DPI)
    fig.suptitle(f"How each domain's experts evolved over {len(steps)} affinity update(s) of "
                 f"{os.path.basename(os.path.normpath(run_dir))}", x=0.01, y=1 - 0.1 / height, ha="left", va="top",
                 fontsize=11)
    grid = fig.add_gridspec(len(layers), 3, left=0.6 / width, right=1 - legend_w / width, top=1 - top / height,
                            bottom=0.5 / height, wspace=0.28, hspace=0.8 / (row_h - 0.8))
    panels = (("set_size", "experts selected", "experts (count)"),
              ("jaccard_to_final", "Jaccard with the domain's final set", "Jaccard (0-1)"),
              ("mean_jaccard_to_others", "mean Jaccard with the other domains", "Jaccard (0-1)"))
    pad = max(1.0, 0.04 * (steps[-1] - steps[0]))
    for li, layer in enumerate(layers):
        for col, (key, title, ylabel) in enumerate(panels):
            ax = fig.add_subplot(grid[li, col])
            rows = [ys for ys in s[key][li] if ys[0] is not None]
            for d, ys in enumerate(rows):
                ax.plot(steps, ys, marker=marker, markersize=3, linewidth=1.1, color=colors[d])
            if len(rows) > 1:
                ax.plot(steps, [sum(v) / len(v) for v in zip(*rows)], color="black", linestyle="--", linewidth=1.6)
            if key == "set_size":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_ylim(0, 1.05 * max(1, *(max(ys) for ys in rows)) + 0.2)
            else:
                ax.set_ylim(-0.04, 1.04)
            if not rows:
                ax.text(0.5, 0.5, "a single domain: no other to compare", transform=ax.transAxes, ha="center",
                        fontsize=8, color="0.4")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(steps[0] - pad, steps[-1] + pad)
            ax.set_title(f"MoE layer {layer}: {title}", fontsize=9, loc="left")
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colors[d], marker=marker, markersize=3, label=str(name))
               for d, name in enumerate(domains)]
    if len(domains) > 1:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.6, label="mean of domains"))
    fig.legend(handles=handles, title="domain", loc="upper right", bbox_to_anchor=(1 - 0.05 / width,
                                                                                   1 - top / height),
               ncols=legend_cols, fontsize=7, title_fontsize=8, frameon=False)
    save_png(fig, out_path)
    return out_path
