"""Label-free domain discovery (desmoe.discover) on the six built-in domains: do the clusters find the domains?

    python -m benchmarks.discovery [--quick] [--out DIR] [--per-domain N] [--seeds 0 1 2]
                                   [--max-tokens 16 64 256] [--bases dsv2 full]

The labels of math, code, intent, summary, law and translation are hidden; each example's routing signature
under a pretrained base model of benchmarks/pretrain_base.py ('dsv2': DeepSeek-V2-shaped, 64 routed experts,
top-6, 3 MoE layers; 'full': Qwen3-MoE, 16 experts, top-2, 4 MoE layers) is computed with desmoe.discover's
own compute_signatures and clustered with its compute_clusters: K = 6 and K chosen by silhouette in 2..12,
features 'share' and 'share_gate', each of --max-tokens (data.discover.max_tokens: how many of an example's
first tokens are routed), k-means seeds --seeds. Reported: the adjusted Rand index (ARI) against the true
domains, the K chosen, the confusion matrix (true domain x cluster) and the time. For context, the same
k-means on each example's token histogram (the same first tokens, no model) is reported beside it.

The examples are the first --per-domain of each domain (at most the base model's fine-tuning examples,
recipe.json ``finetune.max_examples``): text the base model was not pretrained on. The base model comes from
the cache (pretrained first if it is not there). Results: OUT/results.json, OUT/report.md, OUT/discovery.png
(default OUT: benchmarks/results/discovery). ``--quick`` is the smoke test: a random tiny Qwen3-MoE, byte
tokenizer, 3 domains x 12 examples, one seed (a temporary OUT unless --out is given).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402

from benchmarks import pretrain_base  # noqa: E402
from desmoe.config import DataSection, ModelSection  # noqa: E402
from desmoe.data import ByteTokenizer, build_tokenizer  # noqa: E402
from desmoe.data.builtin import builtin_segments  # noqa: E402
from desmoe.discover import (adjusted_rand, compute_clusters, compute_confusion, compute_signatures,  # noqa: E402
                             example_ids)
from desmoe.figures import canvas_figure, save_png  # noqa: E402
from desmoe.models import build_tiny_model, get_family, load_pretrained_model  # noqa: E402

DOMAINS = pretrain_base.DOMAINS
FEATURES = ("share", "share_gate")
K_MODES = ("K=domains", "silhouette")
"""K = the number of true domains (6), or chosen by silhouette."""
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "discovery")
PLAN = {"bases": ["dsv2", "full"], "domains": list(DOMAINS), "per_domain": 200, "seeds": [0, 1, 2],
        "max_tokens": [16, 64, 256], "min_clusters": 2, "max_clusters": 12, "batch_size": 16}
QUICK = {"bases": ["tiny"], "domains": ["math", "law", "translation"], "per_domain": 12, "seeds": [0],
         "max_tokens": [64], "min_clusters": 2, "max_clusters": 5, "batch_size": 8}


def find_base_model(name: str) -> str:
    """The cached base model of recipe ``name``: <cache>/<name> (the link pretrain_base keeps), else the one
    <cache>/<name>-<key> folder with a recipe.json, else pretrained now (pretrain_base.ensure_base_model)."""
    root = pretrain_base.cache_root()
    link = os.path.join(root, name)
    if os.path.isfile(os.path.join(link, "recipe.json")):
        return os.path.realpath(link)
    found = sorted(glob.glob(os.path.join(root, f"{name}-*", "recipe.json")), key=os.path.getmtime)
    if found:
        return os.path.dirname(found[-1])
    return pretrain_base.ensure_base_model(pretrain_base.RECIPES[name])[0]


def load_examples(domains: list[str], per_domain: int, limits: dict | None = None) -> tuple[list, list[str]]:
    """(examples as segments, true domain of each): the first ``per_domain`` of each domain (at most ``limits``)."""
    examples, truth = [], []
    for d in domains:
        n = min(per_domain, (limits or {}).get(d, per_domain))
        exs = builtin_segments(d)[:n]
        examples += exs
        truth += [d] * len(exs)
    return examples, truth


def token_histograms(examples: list, tokenizer, *, max_tokens: int) -> np.ndarray:
    """[N, V] each example's token frequencies (its first ``max_tokens`` ids, rows sum to 1): the no-model baseline."""
    out = np.zeros((len(examples), tokenizer.vocab_size))
    for i, ex in enumerate(examples):
        ids = example_ids(ex, tokenizer, max_tokens=max_tokens)
        np.add.at(out[i], ids, 1.0)
        out[i] /= max(1, len(ids))
    return out


def cluster_runs(features: np.ndarray, truth: list[str], *, plan: dict, labels: dict) -> list[dict]:
    """K = len(domains) and K by silhouette, for each seed: ARI, chosen K, confusion, time."""
    runs = []
    for mode in K_MODES:
        for seed in plan["seeds"]:
            t0 = time.perf_counter()
            c = compute_clusters(features, clusters=len(plan["domains"]) if mode == "K=domains" else None,
                                 min_clusters=plan["min_clusters"], max_clusters=plan["max_clusters"], seed=seed)
            runs.append({**labels, "k_mode": mode, "seed": seed, "k": c.k,
                         "ari": adjusted_rand(truth, c.labels.tolist()),
                         "silhouette": {str(k): v for k, v in c.silhouette.items()},
                         "confusion": compute_confusion(truth, c.labels.tolist(), columns=list(range(c.k))),
                         "cluster_s": time.perf_counter() - t0})
    return runs


def measure(plan: dict, *, log=print) -> dict:
    torch.set_num_threads(1)
    runs, bases = [], {}
    for base in plan["bases"]:
        if base == "tiny":
            model, tokenizer, model_dir, limits = build_tiny_model({"model_type": "qwen3_moe"}, seed=0), \
                ByteTokenizer(), None, None
        else:
            model_dir = find_base_model(base)
            model = load_pretrained_model(model_dir)
            tokenizer = build_tokenizer(DataSection(), ModelSection(path=model_dir))
            limits = pretrain_base.load_recipe_info(model_dir)["finetune"].get("max_examples")
        family = get_family(model.config.model_type)
        examples, truth = load_examples(plan["domains"], plan["per_domain"], limits)
        info = {"model_dir": model_dir, "model_type": model.config.model_type, "examples": len(examples),
                "per_domain": {d: truth.count(d) for d in plan["domains"]}, "signature_s": {}}
        for max_tokens in plan["max_tokens"]:
            for feats in FEATURES:
                t0 = time.perf_counter()
                x = compute_signatures(model, family, tokenizer, examples, max_tokens=max_tokens, features=feats,
                                       batch_size=plan["batch_size"])
                sig_s = time.perf_counter() - t0
                info["signature_s"][f"{feats}/{max_tokens}"] = sig_s
                got = cluster_runs(x, truth, plan=plan, labels={"base": base, "features": feats,
                                                                  "max_tokens": max_tokens, "signature_s": sig_s})
                runs += got
                log(f"{base} {feats:<10} max_tokens {max_tokens:>3}: ARI K=domains {got[0]['ari']:.3f}, silhouette K="
                    f"{got[len(plan['seeds'])]['k']} ARI {got[len(plan['seeds'])]['ari']:.3f} ({sig_s:.1f}s)")
            t0 = time.perf_counter()
            x = token_histograms(examples, tokenizer, max_tokens=max_tokens)
            runs += cluster_runs(x, truth, plan=plan, labels={"base": base, "features": "tokens (no model)",
                                                              "max_tokens": max_tokens,
                                                              "signature_s": time.perf_counter() - t0})
        bases[base] = info
    return {"plan": plan, "bases": bases, "runs": runs,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "sklearn": sklearn.__version__}}


def summarise(results: dict) -> list[dict]:
    """Per (base, features, max_tokens, K mode): ARI mean / min / max over seeds, the K chosen, seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["base"], r["features"], r["max_tokens"], r["k_mode"]), []).append(r)
    rows = []
    for (base, feats, mt, mode), rs in groups.items():
        aris = [r["ari"] for r in rs]
        rows.append({"base": base, "features": feats, "max_tokens": mt, "k_mode": mode,
                     "ari_mean": statistics.fmean(aris), "ari_min": min(aris), "ari_max": max(aris),
                     "k": sorted({r["k"] for r in rs}), "signature_s": rs[0]["signature_s"],
                     "cluster_s": statistics.fmean(r["cluster_s"] for r in rs)})
    return rows


LIMITS = (
    "What limits it, read from the confusion tables below (the committed run): the clusters follow what the text "
    "is, while these domains are defined by their task template. A `summary` prompt is \"Summarize this Python "
    "function in one line.\" followed by the function's source, so beyond its first tokens it reads like `code`, "
    "and with 64 or 256 tokens the two share clusters (on full they are spread together over two); on dsv2 `math` "
    "has two templates (word problems; \"What is a x b?\") that the longer windows tell apart, taking the cluster "
    "that code and summary would need. Over the first 16 "
    "tokens each domain's template dominates the signature, which is why the short window finds the domains: on "
    "data whose domains carry no such prefix that advantage is not there. The token histogram of the same tokens "
    "(no model) does worse than the routing signature, so the routing adds more than the tokens themselves. The "
    "pretrained bases are small (4.3 M and 2.3 M parameters, 1000 and 600 steps); 'share_gate' adds nothing over "
    "'share' here.")


def findings(results: dict, rows: list[dict]) -> list[str]:
    """The numbers the report's reading rests on: best and default settings per base, against the 0.8 goal and
    the no-model baseline."""
    out = []
    default_tokens = max(results["plan"]["max_tokens"])
    for base in results["bases"]:
        mine = [r for r in rows if r["base"] == base]
        routed = [r for r in mine if r["features"] != "tokens (no model)"]
        best = max(routed, key=lambda r: r["ari_mean"])
        default = [r for r in routed if r["max_tokens"] == default_tokens]
        met = sorted({r["max_tokens"] for r in routed if r["ari_mean"] >= 0.8})
        beats = sum(r["ari_mean"] > next(b["ari_mean"] for b in mine if b["features"] == "tokens (no model)"
                                         and b["max_tokens"] == r["max_tokens"] and b["k_mode"] == r["k_mode"])
                    for r in routed)
        out.append(f"- {base}: best ARI {best['ari_mean']:.3f} ({best['features']}, first {best['max_tokens']} tokens, "
                   f"{best['k_mode']}); with the first {default_tokens} tokens (data.discover.max_tokens' default) "
                   f"{min(r['ari_mean'] for r in default):.3f}..{max(r['ari_mean'] for r in default):.3f}. ARI >= 0.8 "
                   f"reached with max_tokens {met or 'none'}. The routing signature beats the token histogram "
                   f"(same tokens, no model) in {beats} of {len(routed)} settings.")
    return out


def report_md(results: dict, rows: list[dict], command: str) -> str:
    plan = results["plan"]
    lines = ["# Label-free domain discovery on the built-in domains", "", f"Command: `{command}`", "",
             f"{len(plan['domains'])} domains ({', '.join(plan['domains'])}), the first {plan['per_domain']} examples "
             f"of each (fewer where the base model's fine-tuning set is smaller), labels hidden; k-means seeds "
             f"{plan['seeds']}; silhouette over K in {plan['min_clusters']}..{plan['max_clusters']}. ARI = adjusted "
             "Rand index against the true domains (1 = the domains exactly, 0 = chance).", ""]
    for base, info in results["bases"].items():
        lines.append(f"- {base}: {info['model_type']} `{info['model_dir']}`, {info['examples']} examples "
                     f"({', '.join(f'{d} {n}' for d, n in info['per_domain'].items())})")
    lines += ["", "| base | features | max_tokens | K | ARI mean | ARI min..max | K chosen | signatures s | "
              "k-means s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['base']} | {r['features']} | {r['max_tokens']} | {r['k_mode']} | {r['ari_mean']:.3f} | "
                     f"{r['ari_min']:.3f}..{r['ari_max']:.3f} | {', '.join(map(str, r['k']))} | "
                     f"{r['signature_s']:.1f} | {r['cluster_s']:.2f} |")
    lines += ["", "## Reading", ""] + findings(results, rows) + ["", LIMITS, ""]
    for base in results["bases"]:
        for mt in plan["max_tokens"]:
            r = next(x for x in results["runs"] if x["base"] == base and x["features"] == "share"
                     and x["max_tokens"] == mt and x["k_mode"] == "K=domains")
            conf = r["confusion"]
            lines += ["", f"Confusion, {base}, share, max_tokens {mt}, K = {len(plan['domains'])}, seed {r['seed']} "
                      f"(ARI {r['ari']:.3f}): true domain x cluster", "",
                      "| domain | " + " | ".join(map(str, conf["columns"])) + " |",
                      "|---|" + "---|" * len(conf["columns"])]
            lines += [f"| {d} | " + " | ".join(map(str, c)) + " |" for d, c in zip(conf["rows"], conf["counts"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, rows: list[dict], path: str) -> str:
    """Per base: ARI per max_tokens (bars: features x K mode, seed range as error bars), and the confusion of
    share / K = domains at the largest max_tokens."""
    bases, plan = list(results["bases"]), results["plan"]
    series = [(f, m) for f in (*FEATURES, "tokens (no model)") for m in K_MODES]
    colours = {"share": "tab:blue", "share_gate": "tab:orange", "tokens (no model)": "tab:gray"}
    width = 0.8 / len(series)
    fig = canvas_figure(6.5 * len(bases), 9)
    for b, base in enumerate(bases):
        ax = fig.add_subplot(2, len(bases), b + 1)
        for s_i, (feats, mode) in enumerate(series):
            got = [next((r for r in rows if r["base"] == base and r["features"] == feats and r["k_mode"] == mode
                         and r["max_tokens"] == mt), None) for mt in plan["max_tokens"]]
            xs = [i + (s_i - len(series) / 2 + 0.5) * width for i, r in enumerate(got) if r is not None]
            got = [r for r in got if r is not None]
            ax.bar(xs, [r["ari_mean"] for r in got], width, color=colours[feats],
                   hatch="//" if mode == "silhouette" else None, edgecolor="white",
                   label=f"{feats}, {'K by silhouette' if mode == 'silhouette' else 'K = domains'}",
                   yerr=[[max(0.0, r["ari_mean"] - r["ari_min"]) for r in got],
                         [max(0.0, r["ari_max"] - r["ari_mean"]) for r in got]])
        ax.axhline(0.8, color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(plan["max_tokens"])), [f"first {mt} tokens" for mt in plan["max_tokens"]])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("ARI vs true domains")
        ax.set_title(f"{base} ({results['bases'][base]['model_type']})", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
        mt = max(plan["max_tokens"])
        r = next(x for x in results["runs"] if x["base"] == base and x["features"] == "share"
                 and x["max_tokens"] == mt and x["k_mode"] == "K=domains")
        cm = fig.add_subplot(2, len(bases), len(bases) + b + 1)
        counts = np.array(r["confusion"]["counts"])
        cm.imshow(counts, cmap="Blues", aspect="auto")
        for (i, j), v in np.ndenumerate(counts):
            if v:
                cm.text(j, i, str(v), ha="center", va="center", fontsize=7)
        cm.set_yticks(range(len(r["confusion"]["rows"])), r["confusion"]["rows"], fontsize=7)
        cm.set_xticks(range(counts.shape[1]), [f"cluster {j}" for j in r["confusion"]["columns"]], fontsize=7)
        cm.set_title(f"{base}, share, first {mt} tokens, K={counts.shape[1]}: ARI {r['ari']:.3f}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.discovery", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: a random tiny model, 3 domains x 12 examples")
    p.add_argument("--out", default=None, help=f"results folder (default {os.path.relpath(DEFAULT_OUT, ROOT)})")
    p.add_argument("--per-domain", type=int, default=None, help="examples per domain (default 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="k-means seeds (default 0 1 2)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=None, help="data.discover.max_tokens values")
    p.add_argument("--bases", nargs="+", choices=["dsv2", "full", "quick"], default=None,
                   help="pretrained base models (default dsv2 full)")
    p.add_argument("--analyse-only", action="store_true",
                   help="measure nothing: rewrite OUT/report.md and the figure from OUT/results.json")
    a = p.parse_args(argv)
    plan = dict(QUICK if a.quick else PLAN)
    for key, value in (("per_domain", a.per_domain), ("seeds", a.seeds), ("max_tokens", a.max_tokens),
                       ("bases", a.bases)):
        if value is not None:
            plan[key] = value
    out = a.out or (tempfile.mkdtemp(prefix="desmoe-discovery-") if a.quick else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    command = "python -m benchmarks.discovery " + " ".join(argv if argv is not None else sys.argv[1:])
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.analyse_only:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    else:
        t0 = time.perf_counter()
        results = measure(plan, log=log)
        results["total_s"] = time.perf_counter() - t0
        results["command"] = command.strip()
    rows = summarise(results)
    results["summary"] = rows
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_md(results, rows, results["command"]))
    plot(results, rows, os.path.join(out, "discovery.png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
