"""Many-domain scaling: forgetting and average domain loss as the number of domains grows, fft vs ESFT vs desmoe.

    python -m benchmarks.scaling [--counts 2 4 8 16 32] [--seeds 1 2] [--steps 150] [--out DIR] [--reuse]
    python -m benchmarks.scaling --steps-per-domain 25 --out runs/scaling_fig2   (the paper's Figure-2 protocol)
    python -m benchmarks.scaling --steps-per-domain 25 --modes desmoe --lr desmoe=1e-3 --out DIR   (another LR)
    python -m benchmarks.scaling --quick      (CI-sized smoke test: the quick base model, 2 and 4 domains)

Every run is a real ``desmoe train --nproc 2`` on the reproduce testbed's base model (benchmarks/pretrain_base.py
``dsv2``, the general holdout it never trained on as ``data.holdout``), on the first n built-in domains of
``desmoe.data.builtin.MANY_DOMAINS`` (an order that interleaves the parent corpora, so every prefix spans several).
Each mode trains at its best LR of the method issue's sweep (benchmarks/results/reproduce/results.json
``sweep.best_lr``: fft, the better ESFT mode, desmoe), for the same number of steps at every n (``--steps``: the
same compute, shared by more domains as n grows) or for ``--steps-per-domain`` x n steps (each domain gets the
same number of steps at every n, as in the paper's Figure 2, so the total grows with n). Evaluated before and after training (no periodic evaluation):
average held-out domain loss and F = general-holdout loss after - before.

Per run it also reads the final affinity record (desmoe) or the ESFT selection: experts per domain per layer and
the mean Jaccard overlap of the domains' expert sets. Results: OUT/results.json, OUT/report.md, OUT/scaling.png.
Goal (issue 15): desmoe's F flat (within 10%) from 2 to 32 domains while fft's grows.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import pretrain_base, reproduce  # noqa: E402

SWEEP = os.path.join(ROOT, "benchmarks", "results", "reproduce", "results.json")
GOAL_FLAT = 0.10


def best_lrs(path: str = SWEEP) -> dict[str, float]:
    """fft's, the better ESFT mode's and desmoe's best LR in the committed sweep (by average domain loss)."""
    with open(path, encoding="utf-8") as f:
        sw = json.load(f)["sweep"]
    esft = sw.get("better_esft") or "esft_token"
    return {"fft": sw["best_lr"]["fft"], esft: sw["best_lr"][esft], "desmoe": sw["best_lr"]["desmoe"]}


def many_domains() -> list[str]:
    from desmoe.data import MANY_DOMAINS

    return list(MANY_DOMAINS)


def run_config(plan: dict, base: dict, *, name: str, mode: str, lr: float, seed: int, domains: list[str],
               steps: int, out_dir: str) -> dict:
    spec = {"name": name, "setting": mode, "mode": mode, "overrides": {}, "lr": lr, "seed": seed,
            "domains": domains, "stage": "scaling"}
    cfg = reproduce.run_config(plan, base, spec, out_dir=out_dir, nproc=2)
    cfg["train"]["max_steps"] = steps
    cfg["train"]["warmup_steps"] = min(cfg["train"]["warmup_steps"], max(0, steps // 10))
    cfg["data"]["domains"] = {d: {"builtin": d} for d in domains}
    cfg["data"]["eval_sequences"] = plan["scaling_eval_sequences"]
    cfg["eval"] = {"every": 0, "max_pairs": plan["scaling_max_pairs"]}
    return cfg


def selection_stats(run_dir: str) -> dict | None:
    """Experts per domain (mean over layers and domains, and the max) and the mean pairwise Jaccard overlap of
    the domains' expert sets, from the last affinity record or the ESFT selection; None for fft."""
    records = sorted(glob.glob(os.path.join(run_dir, "affinity", "step*.json")))
    if records:
        with open(records[-1], encoding="utf-8") as f:
            masks = json.load(f)["masks"]  # [L][D][E]
        sets = [[{e for e, on in enumerate(row) if on} for row in layer] for layer in masks]
    elif os.path.isfile(os.path.join(run_dir, "esft_selection.json")):
        with open(os.path.join(run_dir, "esft_selection.json"), encoding="utf-8") as f:
            sel = json.load(f)["selected"]  # domain -> [L][ids]
        per_domain = list(sel.values())
        sets = [[set(d[li]) for d in per_domain] for li in range(len(per_domain[0]))]
    else:
        return None
    counts = [len(s) for layer in sets for s in layer]
    overlaps = [len(a & b) / len(a | b) for layer in sets for a, b in itertools.combinations(layer, 2) if a | b]
    return {"experts_per_domain_mean": statistics.mean(counts), "experts_per_domain_max": max(counts),
            "overlap_jaccard_mean": statistics.mean(overlaps) if overlaps else None}


def run_point(run_dir: str, domains: list[str]) -> dict:
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    before, after = s["eval_before"], s["eval_after"]
    return {"avg_domain_loss_before": statistics.mean(before[d]["loss"] for d in domains),
            "avg_domain_loss": statistics.mean(after[d]["loss"] for d in domains),
            "forgetting": after["holdout"]["loss"] - before["holdout"]["loss"],
            "train_time_s": s.get("train_time_s"), "selection": selection_stats(run_dir)}


def _ms(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def analyse(rows: list[dict], counts: list[int], modes: list[str]) -> dict:
    table = {m: {} for m in modes}
    for m in modes:
        for n in counts:
            rs = [r for r in rows if r["mode"] == m and r["n"] == n and r.get("point")]
            table[m][n] = {"forgetting": _ms([r["point"]["forgetting"] for r in rs]),
                           "avg_domain_loss": _ms([r["point"]["avg_domain_loss"] for r in rs]),
                           "experts_per_domain": _ms([(r["point"]["selection"] or {}).get("experts_per_domain_mean")
                                                      for r in rs]),
                           "overlap": _ms([(r["point"]["selection"] or {}).get("overlap_jaccard_mean") for r in rs])}
    flat = {}
    for m in modes:
        f = [table[m][n]["forgetting"] for n in counts]
        if f[0] and f[-1] and f[0]["mean"] > 0:
            flat[m] = {"ratio_last_to_first": f[-1]["mean"] / f[0]["mean"],
                       "flat": abs(f[-1]["mean"] / f[0]["mean"] - 1) <= GOAL_FLAT}
    return {"table": table, "flat": flat}


def plot(result: dict, path: str) -> str:
    from desmoe.figures import canvas_figure, save_png

    counts, modes = result["counts"], result["modes"]
    fig = canvas_figure(10, 4)
    for k, key in enumerate(("forgetting", "avg_domain_loss")):
        ax = fig.add_subplot(1, 2, k + 1)
        for m in modes:
            pts = [(n, result["analysis"]["table"][m][n][key]) for n in counts]
            xs = [n for n, v in pts if v]
            ys = [v["mean"] for _, v in pts if v]
            es = [v["std"] for _, v in pts if v]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{m} @ {result['lrs'][m]:g}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("domains")
        ax.set_ylabel("F (general-holdout loss after - before)" if key == "forgetting" else "average domain loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_report(out: str, result: dict) -> str:
    t = result["analysis"]["table"]
    lines = ["# Many-domain scaling", "",
             f"Written by `{result['command']}` in {result['total_s'] / 60:.1f} min. Base model `{result['base_dir']}`; "
             f"{steps_text(result)}, 2 ranks; "
             f"domains: the first n of MANY_DOMAINS. LRs (the method issue's sweep's best unless --lr): "
             + ", ".join(f"{m} {lr:g}" for m, lr in result["lrs"].items()) + f". Seeds {result['seeds']}. Seed "
             "mean ± std.", "",
             "| domains | " + " | ".join(f"F {m}" for m in result["modes"]) + " | "
             + " | ".join(f"avg loss {m}" for m in result["modes"]) + " |",
             "|---|" + "---|" * (2 * len(result["modes"]))]

    def f(v, signed=False):
        if not v:
            return "—"
        return (f"{v['mean']:+.4f}" if signed else f"{v['mean']:.4f}") + (f" ± {v['std']:.4f}" if v["std"] else "")

    for n in result["counts"]:
        lines.append(f"| {n} | " + " | ".join(f(t[m][n]["forgetting"], True) for m in result["modes"]) + " | "
                     + " | ".join(f(t[m][n]["avg_domain_loss"]) for m in result["modes"]) + " |")
    lines += ["", "Experts per domain (mean over layers) and the mean Jaccard overlap of the domains' expert sets:",
              "", "| domains | " + " | ".join(f"{m}: experts / overlap" for m in result["modes"] if m != "fft") + " |",
              "|---|" + "---|" * len([m for m in result["modes"] if m != "fft"])]
    for n in result["counts"]:
        cells = []
        for m in result["modes"]:
            if m == "fft":
                continue
            e, o = t[m][n]["experts_per_domain"], t[m][n]["overlap"]
            cells.append(f"{e['mean']:.1f} / {o['mean']:.2f}" if e and o else "—")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "F at the largest count ÷ F at the smallest (goal for desmoe: within "
              f"{GOAL_FLAT:.0%} of 1, while fft's grows):", ""]
    for m, v in result["analysis"]["flat"].items():
        lines.append(f"- {m}: {v['ratio_last_to_first']:.2f} ({'flat' if v['flat'] else 'not flat'})")
    lines += ["", "![scaling](scaling.png)"]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def steps_for(a: argparse.Namespace, n: int) -> int:
    """Optimizer steps of a run on n domains: --steps-per-domain x n when given, else --steps."""
    return a.steps_per_domain * n if a.steps_per_domain else a.steps


def steps_text(result: dict) -> str:
    if result.get("steps_per_domain"):
        k = result["steps_per_domain"]
        return (f"{k} steps per domain ({', '.join(f'{n}: {k * n}' for n in result['counts'])} steps; each domain "
                "gets the same training at every count, as in the paper's Figure 2)")
    return f"{result['steps']} steps at every domain count (the same compute, shared by more domains)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every run (the 6-domain sweep's)")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                   help="only these of the sweep's modes (fft, the better ESFT mode, desmoe)")
    p.add_argument("--lr", nargs="+", default=[], metavar="MODE=LR",
                   help="another LR than the sweep's best for a mode, e.g. desmoe=1e-3 (LRs matched on loss)")
    p.add_argument("--steps-per-domain", type=int, default=None, metavar="N",
                   help="train N x (number of domains) steps instead of --steps (the paper's Figure-2 protocol)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "scaling"))
    p.add_argument("--reuse", action="store_true", help="keep a finished run whose YAML is unchanged")
    p.add_argument("--quick", action="store_true", help="smoke test: quick base model, 2 and 4 domains, 1 seed")
    a = p.parse_args(argv)
    plan = dict(reproduce.PLANS["quick" if a.quick else "full"], scaling_eval_sequences=4 if a.quick else 16,
                scaling_max_pairs=2 if a.quick else 4)
    if a.quick:
        a.counts, a.seeds, a.steps = [2, 4], a.seeds[:1], 12
        a.steps_per_domain = 4 if a.steps_per_domain else None
    if a.steps_per_domain is not None and a.steps_per_domain < 1:
        p.error(f"--steps-per-domain: must be at least 1, got {a.steps_per_domain}")
    t0 = time.perf_counter()
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    model_dir, trained_now = pretrain_base.ensure_base_model(pretrain_base.RECIPES[plan["recipe"]])
    base = reproduce.base_summary(model_dir, trained_now, 0.0)
    lrs = best_lrs()
    for item in a.lr:
        mode, _, value = item.partition("=")
        if mode not in lrs:
            p.error(f"--lr {item}: mode {mode!r} is not one of {', '.join(lrs)}")
        try:
            lrs[mode] = float(value)
        except ValueError:
            p.error(f"--lr {item}: {value!r} is not a number (write MODE=LR, e.g. desmoe=1e-3)")
    if a.modes:
        unknown = [m for m in a.modes if m not in lrs]
        if unknown:
            p.error(f"--modes: {', '.join(unknown)} not among {', '.join(lrs)}")
        lrs = {m: lrs[m] for m in lrs if m in a.modes}
    modes = list(lrs)
    names = many_domains()
    if max(a.counts) > len(names):
        p.error(f"--counts: at most {len(names)} domains (MANY_DOMAINS has {len(names)})")
    rows = []
    for seed in a.seeds:
        for n in a.counts:
            for mode in modes:
                name = f"{mode}_n{n}_s{seed}"
                run_dir = os.path.join(out, "runs", name)
                cfg = run_config(plan, base, name=name, mode=mode, lr=lrs[mode], seed=seed, domains=names[:n],
                                 steps=steps_for(a, n), out_dir=run_dir)
                yaml_path = os.path.join(out, "runs", f"{name}.yaml")
                text = reproduce.yaml_text(cfg, "python -m benchmarks.scaling")
                row = {"name": name, "mode": mode, "n": n, "seed": seed, "lr": lrs[mode], "steps": steps_for(a, n)}
                fresh = not (a.reuse and os.path.isfile(yaml_path) and open(yaml_path).read() == text
                             and os.path.isfile(os.path.join(run_dir, "summary.json")))
                if fresh:
                    reproduce.write_yaml(cfg, yaml_path, "python -m benchmarks.scaling")
                    print(f"[scaling {time.perf_counter() - t0:5.0f}s] {name}", flush=True)
                    res = reproduce.run_cli(yaml_path, 2, os.path.join(out, "runs", f"{name}.log"))
                    row.update(returncode=res["returncode"], wall_s=round(res["wall_s"], 1))
                if fresh and row["returncode"] != 0:
                    row["error"] = f"desmoe train exited {row['returncode']} (see {name}.log)"
                    print(f"[scaling] {name} failed: {row['error']}", flush=True)
                else:
                    row["point"] = run_point(run_dir, names[:n])
                rows.append(row)
    result = {"command": "python -m benchmarks.scaling " + " ".join(argv if argv is not None else sys.argv[1:]),
              "base_dir": base["dir"], "counts": a.counts, "seeds": a.seeds, "steps": a.steps,
              "steps_per_domain": a.steps_per_domain, "modes": modes,
              "lrs": lrs, "domains": names[:max(a.counts)], "runs": rows}
    result["analysis"] = analyse(rows, a.counts, modes)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    plot(result, os.path.join(out, "scaling.png"))
    print(open(write_report(out, result), encoding="utf-8").read(), flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
