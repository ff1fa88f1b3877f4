"""DES-MoE on discovered domains vs on the true labels, on the reproduce testbed (the dsv2 base model, 6 built-in domains).

    python -m benchmarks.discovery_train [--lrs 1e-3 3e-3] [--seeds 1 2] [--out DIR] [--quick]

For each LR and seed, two ``desmoe train --nproc 2`` runs of method.mode desmoe that differ only in
where the domains come from:

- *labelled*: ``data.domains.<d>`` with the true labels (train file + eval file per domain);
- *discovered_t<N>*: the same training records in one unlabelled, shuffled file (``data.train``) with
  ``data.discover: {clusters: 6, max_tokens: N}``: desmoe clusters them by the routing signature of
  their first N tokens under the base model and trains on the clusters as domains (each cluster holds
  out its own eval rows). N = 256 (the default) and 16 (the window that found these domains best in
  benchmarks/discovery.py).

Both runs' final checkpoints are then evaluated the same way, by ``desmoe eval RUN --data LABELLED.yaml``:
on every true domain's eval file (never trained on by either run) and the base model's general
holdout. Reported: average domain loss, forgetting F (holdout loss after - before), their ratios
discovered / labelled, and the ARI of each run's clusters against the true domains.

Scale, honestly: the reproduce plan's testbed (4.3 M parameters, 25 steps per domain, 150 steps),
with every record as plain text (loss on every token, metric token accuracy) in both arms, since one
unlabelled file has one record format; so the numbers are not the reproduce sweep's (whose math,
intent and translation train on answers only). Results: OUT/results.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import pretrain_base, reproduce  # noqa: E402
from desmoe.data.builtin import builtin_segments  # noqa: E402

EVAL_FRACTION = 0.15
GOAL = 0.05
"""Goal: discovered within 5% of labelled in average domain loss and in forgetting."""


def domain_records(domains: list[str], limits: dict) -> tuple[dict, dict]:
    """(train, eval) text records per domain: each domain's fine-tuning examples (the first
    ``limits[d]``), a fixed 15% of them (seeded by the domain's name) held out for evaluation."""
    train, held = {}, {}
    for d in domains:
        exs = ["".join(text for text, _ in segs) for segs in builtin_segments(d)]
        exs = [t for t in exs[:limits.get(d) or len(exs)] if t.strip()]
        idx = list(range(len(exs)))
        random.Random(f"eval-{d}").shuffle(idx)
        n_eval = max(1, int(len(exs) * EVAL_FRACTION))
        ev = set(idx[:n_eval])
        held[d] = [{"text": exs[i]} for i in sorted(ev)]
        train[d] = [{"text": exs[i]} for i in range(len(exs)) if i not in ev]
    return train, held


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_data(out: str, domains: list[str], limits: dict) -> dict:
    """The data files of both arms; returns their paths."""
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    train, held = domain_records(domains, limits)
    files = {"train": {}, "eval": {}}
    for d in domains:
        files["train"][d] = write_jsonl(os.path.join(data, f"train_{d}.jsonl"), train[d])
        files["eval"][d] = write_jsonl(os.path.join(data, f"eval_{d}.jsonl"), held[d])
    # the true domain rides along as "true_domain" (desmoe reads only "text"): the ARI is computed from it
    mixed = [dict(r, true_domain=d) for d in domains for r in train[d]]
    random.Random(0).shuffle(mixed)
    files["unlabelled"] = write_jsonl(os.path.join(data, "unlabelled.jsonl"), mixed)
    files["counts"] = {d: {"train": len(train[d]), "eval": len(held[d])} for d in domains}
    return files


def arm_config(base_cfg: dict, files: dict, domains: list[str], arm: str, clusters: int) -> dict:
    """``labelled``, or ``discovered_t<N>``: discovery routing each example's first N tokens."""
    cfg = copy.deepcopy(base_cfg)
    data = cfg["data"]
    if arm == "labelled":
        data["domains"] = {d: {"train": files["train"][d], "eval": files["eval"][d], "format": "text"}
                           for d in domains}
    else:
        data.pop("domains", None)
        data["train"] = files["unlabelled"]
        data["discover"] = {"clusters": clusters, "features": "share", "format": "text",
                            "max_tokens": int(arm.rpartition("_t")[2])}
    cfg["eval"]["every"] = 0  # the comparison evaluates the final checkpoints on the true domains
    cfg["checkpoint"] = {"save_final": True, "keep": 1}
    return cfg


def adjusted_rand(true: list[str], found: list[str]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(true, found))


def cluster_ari(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "discovery", "records.jsonl")
    if not os.path.isfile(path):
        return None
    true, found = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            true.append(r["true_domain"])
            found.append(r["domain"])
    return adjusted_rand(true, found)


def eval_on_true_domains(run_dir: str, labelled_yaml: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "desmoe.cli", "eval", run_dir, "--data", labelled_yaml,
                           "--out", out], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    if proc.returncode != 0:
        raise RuntimeError(f"desmoe eval {run_dir} --data {labelled_yaml} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    name = next(n for n in sorted(os.listdir(out)) if n.startswith("eval_") and n.endswith(".json"))
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return json.load(f)["results"]


def summarise(results: dict, domains: list[str], base_holdout: float) -> dict:
    losses = {d: results[d]["loss"] for d in domains}
    return {"losses": losses, "avg_domain_loss": sum(losses.values()) / len(losses),
            "holdout_loss": results["holdout"]["loss"], "forgetting": results["holdout"]["loss"] - base_holdout}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.discovery_train", description=__doc__.splitlines()[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-tokens", type=int, nargs="+", default=[256, 16],
                   help="one discovered arm per value of data.discover.max_tokens (256: its default)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "discovery_train"))
    p.add_argument("--results", default=None, help="also copy results.json and report.md here")
    p.add_argument("--quick", action="store_true", help="the quick plan's base model, 3 domains, 1 LR, 1 seed")
    a = p.parse_args(argv)
    plan = reproduce.PLANS["quick" if a.quick else "full"]
    if a.quick:
        a.lrs, a.seeds = a.lrs[:1], a.seeds[:1]
    t0 = time.perf_counter()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    model_dir, trained_now = pretrain_base.ensure_base_model(pretrain_base.RECIPES[plan["recipe"]])
    base = reproduce.base_summary(model_dir, trained_now, 0.0)
    domains = list(plan["domains"])
    limits = {d: v for d, v in (base["info"]["finetune"].get("max_examples") or {}).items()}
    if plan["max_examples_cap"]:
        limits = {d: min(v, plan["max_examples_cap"]) for d, v in limits.items()}
    files = write_data(out, domains, limits)
    rows = []
    base_holdout = None
    for seed in a.seeds:
        for lr in a.lrs:
            spec = {"name": "x", "setting": "desmoe", "mode": "desmoe", "overrides": {}, "lr": lr, "seed": seed,
                    "domains": domains, "stage": "sweep"}
            row = {"lr": lr, "seed": seed}
            for arm in ["labelled"] + [f"discovered_t{t}" for t in a.max_tokens]:
                name = f"{arm}_lr{reproduce.lr_tag(lr)}_s{seed}"
                run_dir = os.path.join(out, "runs", name)
                cfg = reproduce.run_config(plan, base, dict(spec, name=name), out_dir=run_dir, nproc=2)
                cfg = arm_config(cfg, files, domains, arm, clusters=len(domains))
                yaml_path = os.path.join(out, "runs", f"{name}.yaml")
                reproduce.write_yaml(cfg, yaml_path, "python -m benchmarks.discovery_train")
                if arm == "labelled":
                    labelled_yaml = yaml_path
                print(f"[discovery_train {time.perf_counter() - t0:5.0f}s] {name}", flush=True)
                res = reproduce.run_cli(yaml_path, 2, os.path.join(out, "runs", f"{name}.log"))
                if res["returncode"] != 0:
                    raise RuntimeError(f"{name} failed (exit {res['returncode']}): see {name}.log")
                results = eval_on_true_domains(run_dir, labelled_yaml, os.path.join(out, "eval", name))
                if base_holdout is None:
                    with open(os.path.join(out, "runs", f"labelled_lr{reproduce.lr_tag(lr)}_s{seed}",
                                           "summary.json"), encoding="utf-8") as f:
                        base_holdout = json.load(f)["eval_before"]["holdout"]["loss"]
                row[arm] = dict(summarise(results, domains, base_holdout), wall_s=round(res["wall_s"], 1),
                                ari=cluster_ari(run_dir))
            lab = row["labelled"]
            for arm in [k for k in row if k.startswith("discovered")]:
                dis = row[arm]
                dis["loss_ratio"] = dis["avg_domain_loss"] / lab["avg_domain_loss"]
                dis["forgetting_ratio"] = dis["forgetting"] / lab["forgetting"] if lab["forgetting"] > 0 else None
            rows.append(row)
    write_results(out, a, base, files, rows, base_holdout, time.perf_counter() - t0)
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)


def write_results(out: str, a, base: dict, files: dict, rows: list[dict], base_holdout: float, total_s: float) -> None:
    by_lr = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r)
    arms = [k for k in rows[0] if k == "labelled" or k.startswith("discovered")]
    summary = []
    for lr, rs in sorted(by_lr.items()):
        s = {"lr": lr, "seeds": [r["seed"] for r in rs]}
        for arm in arms:
            keys = ("avg_domain_loss", "forgetting", "ari") + (("loss_ratio", "forgetting_ratio") if arm != "labelled"
                                                               else ())
            s[arm] = {k: _mean([r[arm][k] for r in rs]) for k in keys}
            if arm != "labelled":
                s[arm]["within_goal"] = {
                    k: s[arm][f"{k}_ratio"][0] is not None and abs(s[arm][f"{k}_ratio"][0] - 1) <= GOAL
                    for k in ("loss", "forgetting")}
        summary.append(s)
    result = {"command": "python -m benchmarks.discovery_train " + " ".join(sys.argv[1:]),
              "base_model": {k: v for k, v in base.items() if k != "info"}, "counts": files["counts"],
              "base_holdout_loss": base_holdout, "runs": rows, "by_lr": summary, "goal": GOAL,
              "total_s": round(total_s, 1)}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)

    def ms(v, fmt="{:.4f}", signed=False):
        if v[0] is None:
            return "—"
        f = ("{:+" + fmt[2:]) if signed else fmt
        return f.format(v[0]) + (" ± " + fmt.format(v[1]) if v[1] else "")

    lines = ["# DES-MoE on discovered domains vs on the true labels", "",
             f"Written by `{result['command']}` in {total_s / 60:.1f} min on {os.cpu_count()} CPU core(s). Base "
             f"model: `{base['dir']}` ({base['parameters']} parameters, {base['experts']} routed experts, top-"
             f"{base['top_k']}). Records per domain (train / eval, plain text): " + ", ".join(
                 f"{d} {c['train']} / {c['eval']}" for d, c in files["counts"].items()) + ". Both arms: desmoe, "
             "2 ranks, the reproduce plan's steps, batch and schedule; evaluated by `desmoe eval RUN --data "
             "labelled.yaml` on the true domains' eval files and the general holdout (base holdout loss "
             f"{base_holdout:.4f}). Seed mean ± std.", "",
             "| lr | seeds | arm | avg domain loss | F | ARI of the clusters | loss ratio to labelled | F ratio | "
             "within 5%: loss, F |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        for arm in arms:
            x = s[arm]
            goal = x.get("within_goal")
            lines.append(f"| {reproduce.lr_tag(s['lr'])} | {len(s['seeds'])} | {arm} | {ms(x['avg_domain_loss'])} | "
                         f"{ms(x['forgetting'], signed=True)} | {ms(x['ari'], '{:.3f}')} | "
                         f"{ms(x.get('loss_ratio', (None, None)), '{:.3f}')} | "
                         f"{ms(x.get('forgetting_ratio', (None, None)), '{:.3f}')} | "
                         + (f"{'yes' if goal['loss'] else 'no'}, {'yes' if goal['forgetting'] else 'no'} |" if goal
                            else "— |"))
    lines += ["", "Per run:", "", "| lr | seed | arm | avg loss | F | ARI | " + " | ".join(files["counts"]) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(files["counts"])]
    for r in rows:
        for arm in arms:
            x = r[arm]
            ari = "—" if x["ari"] is None else f"{x['ari']:.3f}"
            lines.append(f"| {reproduce.lr_tag(r['lr'])} | {r['seed']} | {arm} | {x['avg_domain_loss']:.4f} | "
                         f"{x['forgetting']:+.4f} | {ari} | "
                         + " | ".join(f"{x['losses'][d]:.4f}" for d in files["counts"]) + " |")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        for n in ("results.json", "report.md"):
            with open(os.path.join(out, n), encoding="utf-8") as src, open(os.path.join(a.results, n), "w",
                                                                               encoding="utf-8") as dst:
                dst.write(src.read())
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
