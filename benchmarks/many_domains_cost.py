"""What many domains cost desmoe outside the model: at D = 2 .. 64 domains (4 MoE layers, 64 experts, top-8),
the affinity update (DomainAffinity: counting a window of routing decisions, then the EMA and the
selection), the method's state per domain (masks + EMA + window counts, as checkpointed), the heatmap
figure of one update, ``desmoe affinity``'s report (format_report) and the evolution numbers over 20
updates (evolution_summary, and its figure: plot_evolution), and the metric counts MLflow gets (per step at
most, per affinity update).

    python benchmarks/many_domains_cost.py [--repeats 5]

Synthetic routing (each domain prefers 8 experts); no training, one thread.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from desmoe import rundir  # noqa: E402
from desmoe.affinity_report import (evolution_summary, format_report, load_latest_selection,  # noqa: E402
                                    plot_evolution)
from desmoe.routing.affinity import DomainAffinity  # noqa: E402
from desmoe.router_stats import domain_overlap  # noqa: E402

DOMAINS = (2, 4, 8, 16, 32, 64)
LAYERS, EXPERTS, TOP_K = 4, 64, 8
TOKENS = 4096
"""Tokens per counted routing decision (one micro-batch of 4 x 1024 on one rank)."""
WINDOW = 20
"""Micro-batches per affinity window (method.affinity_update_every 20 steps, 1 micro-batch each)."""


def routing(n_domains: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    dom = torch.full((TOKENS,), seed % n_domains)  # a micro-batch is one domain
    near = (dom.unsqueeze(1) * 8 + torch.randint(0, 8, (TOKENS, TOP_K), generator=g)) % EXPERTS
    sel = torch.where(torch.rand(TOKENS, TOP_K, generator=g) < 0.8, near,
                      torch.randint(0, EXPERTS, (TOKENS, TOP_K), generator=g))
    return sel, dom, torch.rand(TOKENS, TOP_K, generator=g)


def record(aff: DomainAffinity, masks: torch.Tensor, n_domains: int, step: int) -> dict:
    return {"step": step, "domains": [f"d{i:02d}" for i in range(n_domains)], "layers": list(range(LAYERS)),
            "affinity": torch.nan_to_num(aff.estimate, nan=-1.0).tolist(), "masks": masks.int().tolist()}


def measure(n_domains: int, tmp: str, repeats: int) -> dict:
    aff = DomainAffinity(LAYERS, n_domains, EXPERTS, beta=0.9)
    count_s, update_s = [], []
    run = os.path.join(tmp, f"run{n_domains}")
    for window in range(max(repeats, 20)):
        t = time.perf_counter()
        for mb in range(WINDOW):
            sel, dom, scores = routing(n_domains, window * WINDOW + mb)
            for li in range(LAYERS):
                aff.count(li, scores, sel, dom, gates=False)
        count_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        masks = aff.update(lambda x: x)
        update_s.append(time.perf_counter() - t)
        folder = os.path.join(run, rundir.AFFINITY_DIR)
        os.makedirs(folder, exist_ok=True)
        rundir.write_json(folder, f"step{(window + 1) * 20:06d}.json", record(aff, masks, n_domains, (window + 1) * 20),
                          indent=None)
    state = {"masks": masks, **aff.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    tensor_bytes = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    rec = record(aff, masks, n_domains, 999)
    draw = []
    for i in range(repeats):
        t = time.perf_counter()
        rundir.write_affinity(os.path.join(tmp, f"heat{n_domains}"), dict(rec, step=i))
        draw.append(time.perf_counter() - t)
    t = time.perf_counter()
    report = format_report(load_latest_selection(run))
    report_s = time.perf_counter() - t
    t = time.perf_counter()
    evolution_summary(run)
    evolution_s = time.perf_counter() - t
    t = time.perf_counter()
    plot_evolution(run)
    plot_s = time.perf_counter() - t
    return {"D": n_domains, "count_ms": 1000 * statistics.median(count_s) / WINDOW,
            "update_ms": 1000 * statistics.median(update_s), "state_bytes": tensor_bytes,
            "state_per_domain": tensor_bytes / n_domains, "checkpoint_bytes": len(buf.getvalue()),
            "heatmap_s": statistics.median(draw), "report_s": report_s, "report_lines": len(report.splitlines()),
            "evolution_s": evolution_s, "plot_s": plot_s, "overlap_metrics": len(domain_overlap(masks, rec["domains"])),
            "step_metrics_max": 6 + 2 * n_domains}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rundir.write_affinity(tmp, {"step": 0, "domains": ["a"], "layers": [0], "affinity": [[[0.5]]],
                                    "masks": [[[1]]]})  # imports matplotlib before the timings
        for d in DOMAINS:
            rows.append(measure(d, tmp, args.repeats))
    print(f"{LAYERS} MoE layers x {EXPERTS} experts, top-{TOP_K}; counting: one micro-batch of {TOKENS} tokens "
          f"per layer; update: pool + EMA + relative selection of a {WINDOW}-micro-batch window; heatmap: "
          "rundir.write_affinity drawn synchronously (training draws it in FigureWriter's child process); "
          "report: desmoe affinity's format_report; evolution: evolution_summary and plot_evolution (desmoe affinity "
          "--plot) over 20 updates; overlap metrics: router_stats.domain_overlap's MLflow values per update; step "
          "metrics: StepLog's MLflow values of a step that trained every domain.")
    header = ("D", "count ms/mb", "update ms", "state B/domain", "ckpt KB", "heatmap s", "report s", "report lines",
              "evolution s", "evolution plot s", "overlap metrics/update", "step metrics (max)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['D']} | {r['count_ms']:.2f} | {r['update_ms']:.2f} | {r['state_per_domain']:,.0f} | "
              f"{r['checkpoint_bytes'] / 1024:,.0f} | {r['heatmap_s']:.2f} | {r['report_s']:.3f} | "
              f"{r['report_lines']} | {r['evolution_s']:.2f} | {r['plot_s']:.2f} | {r['overlap_metrics']} | "
              f"{r['step_metrics_max']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
