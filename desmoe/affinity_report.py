"""Affinity visibility: heatmaps in the run directory and the ``desmoe affinity RUN_DIR`` report."""

from __future__ import annotations

import glob
import json
import os


# A few stops of matplotlib's viridis colormap, interpolated linearly (0 -> dark blue, 1 -> yellow).
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _color(v: float) -> tuple[int, int, int]:
    if v != v or v < 0:  # NaN or "no estimate"
        return (200, 200, 200)
    x = min(1.0, v) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    f = x - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(int(round(a[k] + f * (b[k] - a[k]))) for k in range(3))


def save_affinity_heatmaps(record: dict, path: str, *, cell: int = 22) -> None:
    """One PNG: a domains x experts heatmap per MoE layer (colour = affinity, 0 to 1), a white
    square on each expert that trains on the domain.

    NOTE: drawn with Pillow, not matplotlib: it is called at every affinity update inside the
    training loop, and a matplotlib figure costs ~0.5 s there; this costs milliseconds.
    """
    from PIL import Image, ImageDraw, ImageFont

    layers, domains = record["layers"], record["domains"]
    n_experts = len(record["affinity"][0][0])
    font = ImageFont.load_default()
    left = 8 + 7 * max(len(d) for d in domains)
    block = 20 + cell * len(domains) + 18
    title = f"expert-domain affinity, step {record['step']} (square: expert trains on the domain)"
    width = max(left + cell * n_experts + 10, int(font.getlength(title)) + 10)
    img = Image.new("RGB", (width, 22 + block * len(layers)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    for li, layer in enumerate(layers):
        top = 22 + li * block
        draw.text((4, top + 2), f"layer {layer}", fill="black", font=font)
        y0 = top + 18
        for d, name in enumerate(domains):
            draw.text((4, y0 + d * cell + cell // 2 - 6), name, fill="black", font=font)
            for e in range(n_experts):
                x = left + e * cell
                y = y0 + d * cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_color(record["affinity"][li][d][e]))
                if record["masks"][li][d][e]:
                    c = cell // 2
                    draw.rectangle([x + c - 3, y + c - 3, x + c + 3, y + c + 3], fill="white")
        for e in range(n_experts):
            draw.text((left + e * cell + cell // 2 - 3, y0 + len(domains) * cell + 2), str(e), fill="black",
                      font=font)
    img.save(path)


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
