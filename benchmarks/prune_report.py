"""Per-domain pruned exports of a small desmoe run: what pruning saves and what it costs.

    python benchmarks/prune_report.py [--run RUN_DIR] [--steps 60] [--experts 16] [--top-k 2]
        [--add-domains translation] [--coverage C [C ...]] [--within 0.05] [--work /tmp/desmoe_prune_report]
        [--out benchmarks/results/prune]

Without ``--run`` it first trains a desmoe run (configs/desmoe_demo.yaml made small: tiny qwen3_moe,
``--experts`` routed experts, the built-in math, code, law and ``--add-domains``, ``--steps`` steps on 2
ranks, AutoEP ep_size 2) into ``WORK/run``; the exports go to ``WORK/exports``. Then it exports
the run in full once and pruned once per domain and rule, and reports per domain and rule. The rules: the
run's *training selection* (``desmoe export --domain D --prune``), and with ``--coverage`` each *serving
selection* (``... --prune --coverage C``: per layer the domain's most affine experts until they hold C of
its affinity, topped up; desmoe.restrict.COVERAGE_RULE). Per domain and rule:

- the pruned model's experts per layer, parameters and safetensors size (model.safetensors +
  adaptive_routers.safetensors) against the full export's;
- the held-out loss of the domain's eval rows under four models: *unpruned* (the full export,
  ``desmoe.load_pretrained(full)``), *restricted* (the full export routing only among the domain's
  experts, ``load_pretrained(full, domain=D[, coverage=C])``), *pruned* (``load_pretrained(pruned)``: only the kept
  experts, routing freely among them) and *pruned stock* (``AutoModelForCausalLM.from_pretrained(pruned)``:
  no adaptive-router residual, what transformers alone loads). The pruned export restricted to its domain
  equals the restricted full model (checked: ``max |logits diff|``).

Then, per domain, the first rule (training selection, then the coverages ascending) whose restricted loss
is within ``--within`` nats of the unpruned loss, and what its pruned export saves.

Writes OUT/output.txt (the tables and the command) and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from desmoe import dist, restrict  # noqa: E402

dist.setup_env()

import torch  # noqa: E402

import desmoe  # noqa: E402
from desmoe.data import build_domain_data, build_tokenizer, load_domain_examples  # noqa: E402
from desmoe.evaluation import evaluate_sets  # noqa: E402
from desmoe.export import export_run  # noqa: E402
from desmoe.rundir import load_run_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "desmoe_demo.yaml")


def train(a, run_dir: str) -> float:
    domains = [d for d in a.add_domains.split(",") if d]
    overrides = [f"model.tiny.num_experts={a.experts}", f"model.tiny.num_experts_per_tok={a.top_k}",
                 "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=4", "model.tiny.head_dim=16",
                 "model.tiny.moe_intermediate_size=64", f"train.max_steps={a.steps}", "train.warmup_steps=5",
                 "train.lr=3e-3", f"train.log_every={a.steps}", "data.seq_len=128", "data.eval_sequences=16",
                 "data.holdout=null", "method.affinity_update_every=10", "eval.max_pairs=4",
                 "eval.max_new_tokens=8", "tracking.mlflow=false",
                 *[f"data.domains.{d}.builtin={d}" for d in domains]]
    cmd = [sys.executable, "-m", "desmoe.cli", "train", "--config", CONFIG, "--nproc", "2", "--output-dir", run_dir,
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def size_of(export_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(export_dir, f)) for f in os.listdir(export_dir)
               if f.endswith(".safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="an existing desmoe run directory (default: train one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--add-domains", default="translation",
                   help="built-in domains added to configs/desmoe_demo.yaml's math, code and law")
    p.add_argument("--coverage", type=float, nargs="+", default=[], metavar="C",
                   help="also prune and restrict each domain to the experts holding C (0 < C <= 1) of its affinity "
                        "per layer, for each C")
    p.add_argument("--within", type=float, default=0.05,
                   help="the summary's tolerance: restricted loss at most this many nats above the unpruned loss")
    p.add_argument("--work", default=os.path.join("/tmp", "desmoe_prune_report"),
                   help="where the run and the exports go (large; not committed)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "prune"),
                   help="where output.txt and results.json go")
    a = p.parse_args(argv)
    rules = [None] + sorted(set(restrict.check_coverage(c) for c in a.coverage))  # the training selection first
    os.makedirs(a.out, exist_ok=True)
    run_dir = os.path.abspath(a.run or os.path.join(a.work, "run"))
    if a.run is None and os.path.exists(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    train_s = None
    if a.run is None:
        train_s = train(a, run_dir)
    from transformers import AutoModelForCausalLM

    cfg = load_run_config(run_dir)
    loaded = load_domain_examples(cfg.data)
    tokenizer = build_tokenizer(cfg.data, cfg.model, loaded[0])
    data, _ = build_domain_data(cfg.data, tokenizer, loaded)
    exports = os.path.join(a.work, "exports")
    full = os.path.join(exports, "full")
    full_meta = export_run(run_dir, full, overwrite=True)
    experts_of = json.load(open(os.path.join(full, full_meta["domain_experts"])))

    def loss(model, d):
        model = model.float().eval()
        return evaluate_sets(lambda ids, **kw: model(input_ids=ids).logits, {d: data[d]},
                             batch_size=cfg.train.micro_batch_size)[d]["loss"]

    def logits(model, ids):
        with torch.no_grad():
            return model.float().eval()(input_ids=ids).logits

    rows = []
    unpruned_model = desmoe.load_pretrained(full)
    for d in experts_of["domains"]:
        loss_unpruned = loss(unpruned_model, d)
        ids = data[d].eval_ids[:4]
        for c in rules:
            rule = restrict.with_coverage(experts_of, c)
            out = os.path.join(exports, d if c is None else f"{d}_cov{c:g}")
            meta = export_run(run_dir, out, domain=d, prune=True, coverage=c, overwrite=True)["pruned"]
            restricted = desmoe.load_pretrained(full, domain=d, coverage=c)
            pruned_restricted = desmoe.load_pretrained(out, domain=d)
            rows.append({
                "domain": d, "rule": restrict.rule_name(rule), "coverage": c,
                "experts": meta["num_experts"], "of": meta["original_num_experts"],
                "selected_per_layer": [len(s) for s in rule["selected"][d]],
                "allowed_per_layer": [len(s) for s in rule["allowed"][d]],
                "params": meta["parameters"], "params_full": meta["original_parameters"],
                "bytes": size_of(out), "bytes_full": size_of(full),
                "loss_unpruned": loss_unpruned, "loss_restricted": loss(restricted, d),
                "loss_pruned": loss(desmoe.load_pretrained(out), d),
                "loss_pruned_stock": loss(AutoModelForCausalLM.from_pretrained(out), d),
                "pruned_restricted_vs_restricted_max_abs": float((logits(pruned_restricted, ids)
                                                                 - logits(restricted, ids)).abs().max()),
            })
    head = ("| domain | rule | experts kept / layer | selected per layer | allowed per layer | "
            "params pruned / full (saved) | safetensors MiB pruned / full (saved) | loss unpruned | "
            "loss restricted (+) | loss pruned (+) | loss pruned stock | max abs logits pruned+restricted vs "
            "restricted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['domain']} | {r['rule']} | {r['experts']} / {r['of']} | {r['selected_per_layer']} | "
            f"{r['allowed_per_layer']} | "
            f"{r['params'] / 1e6:.3f}M / {r['params_full'] / 1e6:.3f}M ({1 - r['params'] / r['params_full']:.1%}) | "
            f"{r['bytes'] / 2**20:.2f} / {r['bytes_full'] / 2**20:.2f} ({1 - r['bytes'] / r['bytes_full']:.1%}) | "
            f"{r['loss_unpruned']:.4f} | "
            f"{r['loss_restricted']:.4f} ({r['loss_restricted'] - r['loss_unpruned']:+.3f}) | "
            f"{r['loss_pruned']:.4f} ({r['loss_pruned'] - r['loss_unpruned']:+.3f}) | "
            f"{r['loss_pruned_stock']:.4f} | {r['pruned_restricted_vs_restricted_max_abs']:.1e} |")
    table = "\n".join(lines)
    summary = []
    if len(rules) > 1:
        summary = [f"| domain | first rule with restricted loss within {a.within} nats of unpruned | experts kept / "
                   "layer | params saved | safetensors saved | loss restricted (+) | loss pruned (+) |",
                   "|---|---|---|---|---|---|---|"]
        for d in experts_of["domains"]:
            ok = [r for r in rows if r["domain"] == d and r["loss_restricted"] - r["loss_unpruned"] <= a.within]
            if not ok:
                summary.append(f"| {d} | none of {', '.join(restrict.rule_name({'coverage': c}) for c in rules)} "
                               "| | | | | |")
                continue
            r = ok[0]
            summary.append(f"| {d} | {r['rule']} | {r['experts']} / {r['of']} | "
                           f"{1 - r['params'] / r['params_full']:.1%} | {1 - r['bytes'] / r['bytes_full']:.1%} | "
                           f"{r['loss_restricted']:.4f} ({r['loss_restricted'] - r['loss_unpruned']:+.3f}) | "
                           f"{r['loss_pruned']:.4f} ({r['loss_pruned'] - r['loss_unpruned']:+.3f}) |")
    command = "python benchmarks/prune_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model = cfg.model.tiny if cfg.model.tiny is not None else cfg.model.path
    text = (f"$ {command.strip()}\n\nrun: {run_dir} ({model}, {cfg.train.max_steps} steps, mode "
            f"{cfg.method.mode}, 2 ranks{f', trained in {train_s:.0f} s' if train_s else ''})\n"
            f"selection: {experts_of['source']} (step {experts_of['step']})\n"
            f"training selection: allowed/kept rule: {experts_of['rule']}\n"
            + (f"coverage C: allowed/kept rule: {restrict.COVERAGE_RULE}\n" if len(rules) > 1 else "")
            + "kept: the allowed sets topped up by affinity to the largest allowed count of any layer (one count "
            "per layer)\n"
            f"held-out loss: each domain's {data[experts_of['domains'][0]].eval_ids.shape[0]} eval rows of "
            f"{cfg.data.seq_len} tokens; (+): nats/token above unpruned\n\n{table}\n"
            + ("\n" + "\n".join(summary) + "\n" if summary else ""))
    print(text)
    with open(os.path.join(a.out, "output.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"run_dir": run_dir, "train_s": train_s, "coverages": rules[1:], "within": a.within,
                   "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
