"""The paper's experiments (METHOD.md §4) at toy scale, side by side in one run: JSON, markdown, PNG.

    python -m benchmarks.reproduce [--quick] [--out runs/reproduce] [--nproc 2] [--reuse]

Every fine-tuning run is a real ``desmoe train --nproc N`` (``python -m desmoe.cli``) of the small
base model from benchmarks/pretrain_base.py (pretrained first if not cached), on the built-in
domains, with the general corpus as ``data.holdout``. All runs share one seed, so they see the
same domains and rows at the same steps. The experiments:

a. Tables 1-2: fft, esft_gate, esft_token, desmoe, desmoe_no_alr, desmoe_no_dges, mixed-domain
   on all domains: held-out loss and headline task metric (eval.json; exact match, chrF, token
   accuracy, in percent) per domain, general-holdout loss and forgetting F = holdout loss after -
   before (the base model's).
b. Figure 2: F as the number of domains grows (prefixes of the domain list), for fft, esft_gate
   and desmoe; forgetting reduction = 1 - F_desmoe / F_fft. Runs train ``steps_per_domain`` x n steps.
c. Figure 3: steps and training wall-clock (summed step times) until the average domain loss
   reaches 1.02 x fft's best. Two curves: the held-out loss of desmoe's periodic evaluation
   (``eval.every``, the primary one) and the training loss of metrics.jsonl (per domain the mean of
   its last ``smooth_records`` records, averaged over domains; every run reads each training row at
   most about once, the report lists the epochs, so it is measured on rows not yet trained on).
d. Overhead: median step time (per phase, against fft's same steps) and the ranks' peak RSS
   (VmHWM, polled from /proc) of desmoe and fft on the same config.

The (a) runs of fft, esft_gate and desmoe are repeated ``repeats`` times (the repeats last, in
reverse order) for the times of (c) and (d); their losses are identical (same seed).

--quick is the smoke test (CI): a smaller base model, three domains, two domain counts (fft and
desmoe only in (b)), few steps, no repeats.
Results go to OUT/results.json, OUT/report.md and OUT/*.png; each run's directory, YAML and log
to OUT/runs/. --reuse keeps a finished run whose YAML is unchanged (to continue a killed set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import pretrain_base  # noqa: E402

TABLE_MODES = ("fft", "esft_gate", "esft_token", "desmoe", "desmoe_no_alr", "desmoe_no_dges")
CURVE_MODES = ("fft", "esft_gate", "desmoe")
"""The paper's Figures 2 and 3 compare FFT, ESFT and DES-MoE: the modes of (b), of the curves of (c) and
of the repeated runs (--quick leaves esft_gate out of (b) to stay short)."""

PLANS = {
    "full": {
        "recipe": "full", "domains": list(pretrain_base.DOMAINS), "domain_counts": [2, 3, 4, 5, 6],
        "forgetting_modes": list(CURVE_MODES),
        "steps_per_domain": 50, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 10, "lr_schedule": "constant",
        "eval_sequences": 16, "eval_every": 50, "eval_max_pairs": 32, "esft_profile_tokens": 32768, "affinity_update_every": 20, "log_every": 10,
        "max_examples_cap": None, "holdout_sequences": None, "seed": 1234, "smooth_records": 5, "skip_steps": 5,
        "repeats": 2,
    },
    "quick": {
        "recipe": "quick", "domains": ["math", "code", "intent"], "domain_counts": [2, 3],
        "forgetting_modes": ["fft", "desmoe"],
        "steps_per_domain": 8, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "constant",
        "eval_sequences": 4, "eval_every": 12, "eval_max_pairs": 4, "esft_profile_tokens": 1024, "affinity_update_every": 4, "log_every": 4,
        "max_examples_cap": 150, "holdout_sequences": 8, "seed": 1234, "smooth_records": 2, "skip_steps": 2,
        "repeats": 1,
    },
}

PAPER = {
    "source": "Li et al., EMNLP 2025 (arXiv 2509.16882), as summarised in METHOD.md section 4",
    "model": "DeepSeek-V2-Lite (64 routed + 2 shared experts, 6 active), batch 32 x 4096 tokens, <= 500 steps",
    "downstream_avg": {"fft": 46.6, "esft_gate": 47.7, "desmoe": 51.6},
    "general_avg": {"base": 62.4, "fft": 55.5, "esft_gate": 59.0, "desmoe": 62.4},
    "general_drop_2_to_6_domains": {"fft": 6.2, "desmoe": 0.1},
    "wall_clock_min": {"fft": 171.8, "esft": 67.5, "desmoe": 54.0},
}

TARGETS = {"forgetting_ratio": 0.2, "domain_metric_tolerance": 0.02, "time_ratio": 0.5}


# ---------------------------------------------------------------------------------------------
# Run configs and the runs themselves
# ---------------------------------------------------------------------------------------------


def run_name(mode: str, n_domains: int) -> str:
    return f"{mode}_d{n_domains}"


def plan_runs(plan: dict) -> list[tuple[str, str, list[str]]]:
    """(name, mode, domains) of every run, in the order they run: (a) first, fft beside desmoe; then (b);
    then the repeats of (a)'s fft, esft_gate and desmoe runs, in reverse order (for (c) and (d))."""
    n_all = len(plan["domains"])
    runs = [(run_name(m, n_all), m, plan["domains"]) for m in ("fft", "desmoe") + tuple(
        m for m in TABLE_MODES if m not in ("fft", "desmoe"))]
    for n in plan["domain_counts"]:
        if n != n_all:
            runs += [(run_name(m, n), m, plan["domains"][:n]) for m in plan["forgetting_modes"]]
    for r in range(2, plan["repeats"] + 1):
        order = CURVE_MODES[::-1] if r % 2 == 0 else CURVE_MODES
        runs += [(repeat_name(m, n_all, r), m, plan["domains"]) for m in order]
    return runs


def repeat_name(mode: str, n_domains: int, rep: int) -> str:
    """Run name of repeat ``rep`` (1 = the run itself)."""
    return run_name(mode, n_domains) + ("" if rep == 1 else f"_r{rep}")


def holdout_rows(plan: dict, info: dict) -> int:
    """data.holdout_sequences of the runs: the plan's, at most the base model's held-out rows.

    NOTE: the base model never saw the first finetune.holdout_sequences rows of the general corpus;
    evaluating any prefix of them measures forgetting on unseen text only."""
    return min(plan["holdout_sequences"] or info["finetune"]["holdout_sequences"], info["finetune"]["holdout_sequences"])


def run_config(plan: dict, base: dict, *, name: str, mode: str, domains: list[str], out_dir: str, nproc: int) -> dict:
    """The complete desmoe run config of one experiment run (written as its YAML).

    Runs on all domains (those of (a), (c) and (d)) evaluate every ``eval_every`` steps; the others
    of (b) only before and after (forgetting needs no more)."""
    info = base["info"]
    limits = info["finetune"]["max_examples"]
    cap = plan["max_examples_cap"]
    return {
        "run": {"name": name, "seed": plan["seed"], "output_dir": out_dir, "overwrite": True},
        "model": {"path": base["dir"]},
        "parallel": {"ep_size": nproc, "zero_stage": 1},
        "train": {"max_steps": plan["steps_per_domain"] * len(domains), "micro_batch_size": plan["micro_batch_size"],
                  "lr": plan["lr"], "warmup_steps": plan["warmup_steps"], "lr_schedule": plan["lr_schedule"],
                  "weight_decay": 0.0, "log_every": plan["log_every"]},
        "data": {"seq_len": info["finetune"]["seq_len"], "holdout_sequences": holdout_rows(plan, info),
                 "eval_sequences": plan["eval_sequences"],
                 "tokenizer": os.path.join(base["dir"], "tokenizer.model"),
                 "domains": {d: {"builtin": d, "max_examples": limits[d] if cap is None else min(cap, limits[d])}
                             for d in domains},
                 "holdout": {"builtin": "general"}},
        "method": {"mode": mode, "esft_profile_tokens": plan["esft_profile_tokens"],
                   "affinity_update_every": plan["affinity_update_every"]},
        "checkpoint": {"save_final": False},
        "eval": {"every": plan["eval_every"] if len(domains) == len(plan["domains"]) else 0,
                 "max_pairs": plan["eval_max_pairs"]},
        "tracking": {"mlflow": False},
    }


def write_yaml(cfg: dict, path: str, command: str) -> str:
    import yaml

    text = f"# {command}\n" + yaml.safe_dump(cfg, sort_keys=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def rank_pids(cli_pid: int) -> list[int]:
    """The training ranks of a ``desmoe train --nproc N`` process: the children of its torchrun agent.

    NOTE: only direct children: a process a rank forks (a compiler, a resource tracker) has the
    rank's command line too, but it is not a rank."""
    tree = _children()
    agents = [c for c in tree.get(cli_pid, []) if b"torch.distributed.run" in _cmdline(c)]
    return [r for a in agents for r in tree.get(a, [])]


def _peak_kib(pid: int) -> int | None:
    """VmHWM (peak resident set, KiB) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_cli(config_path: str, nproc: int, log_path: str, *, poll_s: float = 0.2) -> dict:
    """``desmoe train --config CONFIG --nproc N``; returns wall-clock and each rank's peak RSS (MiB).

    NOTE: VmHWM is the kernel's own high-water mark of a process's resident memory, so polling
    misses nothing that happened before the last poll; a rank is polled until it exits."""
    cmd = [sys.executable, "-m", "desmoe.cli", "train", "--config", config_path, "--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    peaks: dict[int, int] = {}
    on_linux = os.path.isdir("/proc/self")
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            if on_linux:
                for pid in rank_pids(proc.pid):
                    kib = _peak_kib(pid)
                    if kib is not None:
                        peaks[pid] = max(peaks.get(pid, 0), kib)
            time.sleep(poll_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"desmoe train failed (exit {proc.returncode}) for {config_path}; log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": [round(v / 1024, 1) for _, v in sorted(peaks.items())] or None}


def load_run(run_dir: str) -> dict:
    """What the analysis reads from a finished run directory."""
    def read_json(name):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"summary": read_json("summary.json"), "metrics": rows, "data_summary": read_json("data_summary.json"),
            "eval": read_json("eval.json"), "esft_selection": read_json("esft_selection.json")}


# ---------------------------------------------------------------------------------------------
# Analysis (pure: run data in, numbers out)
# ---------------------------------------------------------------------------------------------


def forgetting(summary: dict) -> float:
    """General-holdout loss after fine-tuning minus before (the base model's), nats/token."""
    return summary["eval_loss_after"]["holdout"] - summary["eval_loss_before"]["holdout"]


def average_domain_loss(losses: dict, domains: list[str]) -> float:
    return sum(losses[d] for d in domains) / len(domains)


def training_seconds(rows: list[dict]) -> dict[int, float]:
    """step -> training wall-clock up to and including it: the sum of step_time_s (evaluations, logging
    and start-up excluded, so periodic evaluation does not count as training time)."""
    per_step = {r["step"]: r["step_time_s"] for r in rows}
    out, total = {}, 0.0
    for s in sorted(per_step):
        total += per_step[s]
        out[s] = total
    return out


def smoothed_curve(rows: list[dict], domains: list[str], k: int) -> list[dict]:
    """Per step: the mean over domains of each domain's last ``k`` training losses (once every domain
    has one), with the training wall-clock ``train_s`` up to that step."""
    last: dict[str, list[float]] = {d: [] for d in domains}
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    secs = training_seconds(rows)
    out = []
    for step in sorted(by_step):
        for r in by_step[step]:
            if r["domain"] in last and r["loss"] is not None:
                last[r["domain"]] = (last[r["domain"]] + [r["loss"]])[-k:]
        if all(last.values()):
            avg = sum(sum(v) / len(v) for v in last.values()) / len(domains)
            out.append({"step": step, "train_s": secs[step], "avg_loss": avg})
    return out


def eval_curve(eval_json: dict | None, rows: list[dict], domains: list[str]) -> list[dict]:
    """The held-out mean domain loss at step 0 (before), at every periodic evaluation (eval.every) and
    after the last step, with the training wall-clock ``train_s`` up to that step; [] without eval.json."""
    if not isinstance(eval_json, dict) or not eval_json.get("before") or not eval_json.get("after"):
        return []
    secs = training_seconds(rows)
    last = max(secs) if secs else 0
    points = [(0, eval_json["before"])] + [(h["step"], h["results"]) for h in eval_json.get("history") or []]
    points.append((last, eval_json["after"]))
    return [{"step": s, "train_s": secs.get(s, 0.0), "avg_loss": average_domain_loss(
        {d: res[d]["loss"] for d in domains}, domains)} for s, res in points]


def holdout_curve(eval_json: dict | None, rows: list[dict]) -> list[tuple[int, float]]:
    """(step, general-holdout loss) before, at every periodic evaluation and after; [] without eval.json."""
    if not isinstance(eval_json, dict) or not eval_json.get("before") or not eval_json.get("after"):
        return []
    points = [(0, eval_json["before"])] + [(h["step"], h["results"]) for h in eval_json.get("history") or []]
    points.append((max((r["step"] for r in rows), default=0), eval_json["after"]))
    return [(s, res["holdout"]["loss"]) for s, res in points if "holdout" in res]


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """The first point of ``curve`` at or below ``target`` (its step and train_s), None if never."""
    for p in curve:
        if p["avg_loss"] <= target:
            return {"step": p["step"], "train_s": p["train_s"]}
    return None


def step_times(runs_rows: list[list[dict]]) -> dict[int, tuple[list[float], str]]:
    """step -> (its step_time_s in each run, phase), over repeats of one run."""
    out: dict[int, tuple[list[float], str]] = {}
    for rows in runs_rows:
        for r in {r["step"]: r for r in rows}.values():  # one record per step
            out.setdefault(r["step"], ([], r.get("phase", "full")))[0].append(r["step_time_s"])
    return out


def overhead_stats(fft_runs: list[list[dict]], other_runs: list[list[dict]], skip: int) -> dict:
    """Median step time of fft and another mode over the same steps (the first ``skip`` left out) of all
    their repeats (metrics rows of each), overall and per phase of the other mode; ratio = other / fft."""
    f, o = step_times(fft_runs), step_times(other_runs)
    common = [s for s in sorted(o) if s in f and s > skip]
    out = {"steps": len(common)}
    if not common:
        return out

    def medians(steps):
        fm = statistics.median(t for s in steps for t in f[s][0])
        om = statistics.median(t for s in steps for t in o[s][0])
        return {"steps": [steps[0], steps[-1]], "fft_s": fm, "other_s": om, "ratio": om / fm}

    out["all"] = medians(common)
    for phase in dict.fromkeys(o[s][1] for s in common):
        out[phase] = medians([s for s in common if o[s][1] == phase])
    return out


def epochs_per_domain(rows: list[dict], data_summary: list[dict] | None, rows_per_step: int) -> dict[str, float]:
    """How many times each domain's training rows were read (rows drawn / train rows)."""
    if not data_summary:
        return {}
    train_rows = {r["domain"]: r["train_seqs"] for r in data_summary if "train_seqs" in r}
    steps = {}
    for r in rows:
        steps.setdefault(r["domain"], set()).add(r["step"])
    return {d: len(steps.get(d, ())) * rows_per_step / n for d, n in train_rows.items() if n}


PERCENT_SCALE = {"exact_match": 100.0, "token_accuracy": 100.0, "chrf": 1.0}
"""Task metrics as percentages (chrF is 0..100 already), so that an average over domains is one scale."""


def task_scores(eval_json: dict | None, which: str, headline: dict[str, str]) -> dict[str, float] | None:
    """Each domain's headline task metric in percent from a run's eval.json ("before" or "after");
    None when the run has no eval.json or a domain lacks its metric."""
    res = (eval_json or {}).get(which)
    if not isinstance(res, dict):
        return None
    out = {}
    for d, metric in headline.items():
        v = (res.get(d) or {}).get(metric)
        if not isinstance(v, (int, float)):
            return None
        out[d] = float(v) * PERCENT_SCALE.get(metric, 1.0)
    return out


def headline_metrics(data_summary: list[dict] | None, domains: list[str]) -> dict[str, str]:
    """Each domain's headline task metric, as data_summary.json lists it (first of "metrics")."""
    out = {}
    for r in data_summary or []:
        if r.get("domain") in domains and r.get("metrics"):
            out[r["domain"]] = r["metrics"][0]
    return out


def _hit_record(curves: list[list[dict]], target: float) -> dict:
    """Time to target over the repeats of one mode: the step of the first run, training seconds averaged."""
    hits = [time_to_target(c, target) for c in curves]
    times = [h["train_s"] for h in hits if h is not None]
    return {"reached": hits[0] is not None, "step": hits[0] and hits[0]["step"],
            "train_s": sum(times) / len(times) if times else None, "train_s_each": times,
            "best_avg_loss": min(p["avg_loss"] for p in curves[0])}


def _ratios(methods: dict) -> None:
    f = methods["fft"]
    for v in methods.values():
        ok = v["reached"] and f["reached"]
        v["time_ratio_to_fft"] = v["train_s"] / f["train_s"] if ok and f["train_s"] else None
        v["step_ratio_to_fft"] = v["step"] / f["step"] if ok and f["step"] else None


def analyse(plan: dict, runs: dict[str, dict], base: dict) -> dict:
    """Every table and figure's numbers from the loaded runs (name -> run record)."""
    n_all = len(plan["domains"])
    domains = plan["domains"]
    k = plan["smooth_records"]
    fft_a = runs[run_name("fft", n_all)]
    rows_per_step = plan["micro_batch_size"] * fft_a["nproc"]

    def reps(m):
        """The run of mode m on all domains and its repeats (same seed: same losses; the times differ)."""
        return [runs[repeat_name(m, n_all, i)] for i in range(1, (plan["repeats"] if m in CURVE_MODES else 1) + 1)]

    # (a) Tables 1-2
    before = fft_a["summary"]["eval_loss_before"]
    table = [{"mode": "base", "loss": {d: before[d] for d in domains},
              "avg_domain_loss": average_domain_loss(before, domains), "holdout_loss": before["holdout"],
              "forgetting": 0.0}]
    for m in TABLE_MODES:
        s = runs[run_name(m, n_all)]["summary"]
        after = s["eval_loss_after"]
        table.append({"mode": m, "loss": {d: after[d] for d in domains},
                      "avg_domain_loss": average_domain_loss(after, domains), "holdout_loss": after["holdout"],
                      "forgetting": forgetting(s)})
    heads = headline_metrics(fft_a["data_summary"], domains)
    scores = {"base": task_scores(fft_a["eval"], "before", heads)}
    scores.update({m: task_scores(runs[run_name(m, n_all)]["eval"], "after", heads) for m in TABLE_MODES})
    task_table = None
    if len(heads) == len(domains) and all(v is not None for v in scores.values()):
        task_table = {"headline": heads, "unit": "percent (exact match and token accuracy x 100; chrF 0-100)",
                      "rows": [{"mode": m, "metric": v, "average": sum(v.values()) / len(v)}
                               for m, v in scores.items()]}

    # (b) forgetting vs number of domains
    counts = plan["domain_counts"]
    fvn = {m: [forgetting(runs[run_name(m, n)]["summary"]) for n in counts] for m in plan["forgetting_modes"]}
    reduction = [1 - d / f if f > 0 else None for d, f in zip(fvn["desmoe"], fvn["fft"])]
    during = {m: holdout_curve(runs[run_name(m, n_all)]["eval"], runs[run_name(m, n_all)]["metrics"])
              for m in TABLE_MODES}
    repeatability = {m: max(abs(r["summary"]["eval_loss_after"][d] - reps(m)[0]["summary"]["eval_loss_after"][d])
                            for r in reps(m) for d in [*domains, "holdout"])
                     for m in CURVE_MODES if plan["repeats"] > 1}

    # (c) time to target: held-out evaluation every eval_every steps (primary) and the smoothed training loss
    ttt = {}
    for kind, make in (("eval", lambda r: eval_curve(r["eval"], r["metrics"], domains)),
                       ("train_loss", lambda r: smoothed_curve(r["metrics"], domains, k))):
        curves = {m: [make(r) for r in reps(m)] for m in TABLE_MODES}
        if not all(len(c) > 1 for cs in curves.values() for c in cs):
            continue  # no periodic evaluation in these runs
        fft_best = min(p["avg_loss"] for p in curves["fft"][0] if p["step"] > 0)
        target = fft_best * (1 + TARGETS["domain_metric_tolerance"])
        methods = {m: _hit_record(curves[m], target) for m in TABLE_MODES}
        _ratios(methods)
        ttt[kind] = {"target_avg_loss": target, "fft_best_avg_loss": fft_best, "methods": methods,
                     "curves": {m: [(p["step"], p["train_s"], p["avg_loss"]) for p in cs[0]]
                                for m, cs in curves.items()}}
    ttt["primary"] = "eval" if "eval" in ttt else "train_loss"
    ttt["eval_every"] = plan["eval_every"]
    ttt["smooth_records"] = k
    ttt["setup_and_eval_s"] = {m: statistics.mean(r["wall_s"] - r["summary"]["train_time_s"] for r in reps(m))
                               for m in TABLE_MODES}
    ttt["train_time_s"] = {m: statistics.mean(r["summary"]["train_time_s"] for r in reps(m)) for m in TABLE_MODES}
    ttt["steps_time_s"] = {m: statistics.mean(max(training_seconds(r["metrics"]).values()) for r in reps(m))
                           for m in TABLE_MODES}

    # (d) overhead, over every repeat
    over = overhead_stats([r["metrics"] for r in reps("fft")], [r["metrics"] for r in reps("desmoe")],
                          plan["skip_steps"])
    mem = {m: [max(r["peak_rss_mib"]) for r in reps(m) if r["peak_rss_mib"]] for m in ("fft", "desmoe")}
    overhead = {"step_time": over, "peak_rss_mib": mem, "repeats": plan["repeats"],
                "peak_rss_ratio": (max(mem["desmoe"]) / max(mem["fft"])) if mem["fft"] and mem["desmoe"] else None,
                "steps_time_s": {m: [max(training_seconds(r["metrics"]).values()) for r in reps(m)]
                                 for m in ("fft", "desmoe")}}

    epochs = {name: epochs_per_domain(r["metrics"], r["data_summary"], rows_per_step) for name, r in runs.items()}

    # targets
    f_fft, f_des = fvn["fft"][-1], fvn["desmoe"][-1]
    des_row = next(r for r in table if r["mode"] == "desmoe")
    fft_row = next(r for r in table if r["mode"] == "fft")
    tol = TARGETS["domain_metric_tolerance"]
    hit = ttt[ttt["primary"]]["methods"]["desmoe"]
    targets = [
        {"name": f"forgetting at {counts[-1]} domains <= {TARGETS['forgetting_ratio']} x fft's (F desmoe / F fft)",
         "measured": (f_des / f_fft) if f_fft > 0 else None, "target": TARGETS["forgetting_ratio"],
         "met": (f_des <= TARGETS["forgetting_ratio"] * f_fft) if f_fft > 0 else None},
        {"name": "average held-out domain loss within 2% of fft's (desmoe / fft, lower is better)",
         "measured": des_row["avg_domain_loss"] / fft_row["avg_domain_loss"], "target": 1 + tol,
         "met": des_row["avg_domain_loss"] <= fft_row["avg_domain_loss"] * (1 + tol)},
    ]
    if task_table is not None:
        avg = {r["mode"]: r["average"] for r in task_table["rows"]}
        targets.append({"name": "average task metric within 2% of fft's (desmoe / fft, higher is better)",
                        "measured": avg["desmoe"] / avg["fft"] if avg["fft"] else None, "target": 1 - tol,
                        "met": avg["desmoe"] >= avg["fft"] * (1 - tol)})
    targets.append({"name": f"time to target <= 0.5 x fft's (desmoe / fft, {ttt['primary']} curve)",
                    "measured": hit["time_ratio_to_fft"], "target": TARGETS["time_ratio"],
                    "met": hit["time_ratio_to_fft"] is not None and hit["time_ratio_to_fft"] <= TARGETS["time_ratio"]})
    return {
        "table": {"domains": domains, "rows": table, "task_metrics": task_table},
        "forgetting_vs_domains": {"counts": counts, "domains": [domains[:n] for n in counts], "forgetting": fvn,
                                  "reduction": reduction},
        "holdout_during_training": during if all(len(v) > 2 for v in during.values()) else None,
        "time_to_target": ttt,
        "overhead": overhead,
        "repeatability_max_abs_loss_diff": repeatability,
        "epochs": epochs,
        "targets": targets,
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _f(v, fmt="{:.4f}") -> str:
    return "—" if v is None else fmt.format(v)


def write_plots(res: dict, out: str) -> list[str]:
    from benchmarks._plots import bar_chart, line_chart

    files = []
    t = res["table"]
    path = os.path.join(out, "domain_losses.png")
    groups = t["domains"] + ["avg", "holdout"]
    bar_chart(path, groups, {r["mode"]: [r["loss"][d] for d in t["domains"]] + [r["avg_domain_loss"], r["holdout_loss"]]
                             for r in t["rows"]},
              title="(a) held-out loss per domain after fine-tuning, their average, and the general holdout",
              ylabel="loss (nats/token)")
    files.append(path)
    f = res["forgetting_vs_domains"]
    path = os.path.join(out, "forgetting_vs_domains.png")
    line_chart(path, {m: list(zip(f["counts"], v)) for m, v in f["forgetting"].items()},
               title="(b) forgetting F = general-holdout loss after - base model's, vs number of domains",
               xlabel="domains", ylabel="F (nats/token)", hlines={"no forgetting": 0.0})
    files.append(path)
    c = res["time_to_target"]
    kind = c["primary"]
    path = os.path.join(out, "time_to_target.png")
    what = "held-out loss (periodic evaluation)" if kind == "eval" else "smoothed training loss"
    line_chart(path, {m: [(x, y) for _, x, y in c[kind]["curves"][m]] for m in CURVE_MODES},
               title=f"(c) average domain {what} vs training wall-clock", xlabel="training seconds",
               ylabel="avg loss", hlines={"target (1.02 x fft best)": c[kind]["target_avg_loss"]},
               markers=kind == "eval")
    files.append(path)
    o = res["overhead"]
    path = os.path.join(out, "overhead.png")
    phases = [p for p in o["step_time"] if isinstance(o["step_time"][p], dict)]
    bar_chart(path, phases, {"fft": [o["step_time"][p]["fft_s"] * 1000 for p in phases],
                             "desmoe": [o["step_time"][p]["other_s"] * 1000 for p in phases]},
              title="(d) median step time on the same steps, desmoe vs fft", ylabel="ms/step")
    files.append(path)
    return files


def _yes(v) -> str:
    return "yes" if v else ("—" if v is None else "no")


def write_report(res: dict, path: str) -> None:
    base, t, plan = res["base_model"], res["table"], res["plan"]
    doms = t["domains"]
    L = []
    L.append(f"# DES-MoE experiments at toy scale ({'quick smoke test' if res['quick'] else 'full set'})\n")
    L.append(f"Written by `{res['command']}` on {res['machine']['cpus']} CPU core(s) ({res['machine']['platform']}), "
             f"torch {res['machine']['torch']}, {res['nproc']} ranks, expert parallelism {res['nproc']}; total "
             f"{res['timing']['total_s'] / 60:.1f} min (base model "
             f"{'pretrained' if base['trained_now'] else 'found in the cache'} in {res['timing']['pretrain_s']:.0f} s, "
             f"{len(res['runs'])} fine-tuning runs in {res['timing']['runs_s'] / 60:.1f} min"
             + (f", {len(res['reused_runs'])} of them reused from an earlier invocation (--reuse)"
                if res["reused_runs"] else "") +
             "). Every time here depends on the machine's load; the runs ran one after another.\n")
    L.append("**Scale.** The paper fine-tunes DeepSeek-V2-Lite (16 B parameters, 64 routed + 2 shared experts) for up "
             "to 500 steps of 32 x 4096 tokens and scores benchmarks. Here the base model has "
             f"{base['parameters'] / 1e6:.1f} M parameters ({base['experts']} routed experts, top-{base['top_k']}, no "
             f"shared expert), each run trains {plan['steps_per_domain']} steps per domain of "
             f"{plan['micro_batch_size']} x {res['nproc']} sequences of {base['seq_len']} tokens at a constant LR "
             f"{plan['lr']} (after {plan['warmup_steps']} warm-up steps), and the numbers are held-out losses "
             "(nats/token, lower is better) and task metrics on the built-in corpora, with the general corpus (Python "
             "documentation) as the forgetting probe in place of the general benchmarks. The paper's numbers are "
             "benchmark accuracies (higher is better): they stand beside ours for orientation, not comparison.\n")

    L.append("## Base model\n")
    L.append(f"`{base['dir']}` (benchmarks/pretrain_base.py, recipe `{base['recipe']}`): pretrained "
             f"{base['steps']} steps on {base['train_rows']} rows ({base['epochs']:.1f} epochs) of the general corpus "
             f"plus {100 * base['domain_fraction']:.0f}% of each domain, in {base['pretrain_time_s']:.0f} s. "
             f"General holdout: the first {base['holdout_rows']} rows of {base['seq_len']} tokens of the general "
             "corpus (what `data.holdout: {builtin: general}` evaluates), never trained on.\n")
    L.append("| | general-holdout loss |\n|---|---|")
    L.append(f"| unigram baseline (token frequencies of the pretraining rows) | {base['unigram_holdout_loss']:.4f} |")
    L.append(f"| base model | {base['holdout_loss']:.4f} |")
    L.append(f"| base model on the first {res['holdout_sequences']} rows, as desmoe evaluates it (fft run, before) | "
             f"{t['rows'][0]['holdout_loss']:.4f} |\n")
    L.append("Pretraining curve (train: mean over the interval; val: general rows after the holdout's, never trained "
             "on):\n")
    L.append("| step | epoch | train loss | val loss |\n|---|---|---|---|")
    for c in res["base_model_recipe"]["curve"]:
        L.append(f"| {c['step']} | {c['epoch']} | {c['train_loss']:.4f} | {c['val_loss']:.4f} |")
    L.append("")

    L.append(f"## (a) Tables 1-2: mixed-domain fine-tuning on {len(doms)} domains\n")
    L.append(f"Held-out loss per domain after fine-tuning ({plan['eval_sequences']} sequences per domain), their "
             "average, the general-holdout loss and forgetting F = holdout loss after - base model's. Paper columns: "
             "downstream and general averages (accuracy, %; \"base\" is the paper's vanilla model).\n")
    L.append("| mode | " + " | ".join(doms) + " | avg domain loss | holdout loss | F | paper downstream avg | "
             "paper general avg |")
    L.append("|---" * (len(doms) + 6) + "|")
    for r in t["rows"]:
        L.append(f"| {r['mode']} | " + " | ".join(f"{r['loss'][d]:.4f}" for d in doms) +
                 f" | {r['avg_domain_loss']:.4f} | {r['holdout_loss']:.4f} | {r['forgetting']:+.4f} | "
                 f"{_f(PAPER['downstream_avg'].get(r['mode']), '{:.1f}')} | "
                 f"{_f(PAPER['general_avg'].get(r['mode']), '{:.1f}')} |")
    L.append("\n![domain losses](domain_losses.png)\n")
    tm = t.get("task_metrics")
    if tm:
        L.append(f"Task metrics after fine-tuning (eval.json; each domain's headline metric, {tm['unit']}; exact match "
                 f"and chrF by greedy generation on up to {plan['eval_max_pairs']} held-out prompts per domain):\n")
        L.append("| mode | " + " | ".join(f"{d} ({tm['headline'][d]})" for d in doms) + " | average |")
        L.append("|---" * (len(doms) + 2) + "|")
        for r in tm["rows"]:
            L.append(f"| {r['mode']} | " + " | ".join(f"{r['metric'][d]:.1f}" for d in doms) +
                     f" | {r['average']:.2f} |")
        L.append("")
    else:
        L.append("Task metrics: the runs wrote no eval.json with every domain's metric, so the table has losses only.\n")

    f = res["forgetting_vs_domains"]
    L.append("## (b) Figure 2: forgetting as the number of domains grows\n")
    L.append("F = general-holdout loss after - base model's, on the first n domains of "
             f"{', '.join(doms)}, {plan['steps_per_domain']} steps per domain. Reduction = 1 - F_desmoe / F_fft. "
             f"Paper: from 2 to 6 domains FFT loses {PAPER['general_drop_2_to_6_domains']['fft']} general points, "
             f"DES-MoE {PAPER['general_drop_2_to_6_domains']['desmoe']}.\n")
    fmodes = plan["forgetting_modes"]
    L.append("| domains | " + " | ".join(f"F {m}" for m in fmodes) + " | reduction |")
    L.append("|---" * (len(fmodes) + 2) + "|")
    for i, n in enumerate(f["counts"]):
        L.append(f"| {n} | " + " | ".join(f"{f['forgetting'][m][i]:+.4f}" for m in fmodes) +
                 f" | {_f(f['reduction'][i], '{:.3f}')} |")
    L.append("\n![forgetting](forgetting_vs_domains.png)\n")
    during = res.get("holdout_during_training")
    if during:
        steps = [s for s, _ in during["fft"]]
        from desmoe.config import MethodSection

        frac = MethodSection().warmup_end
        warm = int(plan["steps_per_domain"] * len(doms) * frac)
        L.append(f"General-holdout loss during the runs on {len(doms)} domains (periodic evaluation; step 0 is the "
                 f"base model; desmoe's warm-up, in which the backbone trains and the routed experts are frozen, "
                 f"ends at step {warm}, method.warmup_end {frac}):\n")
        L.append("| mode | " + " | ".join(f"step {s}" for s in steps) + " |")
        L.append("|---" * (len(steps) + 1) + "|")
        for m, pts in during.items():
            L.append(f"| {m} | " + " | ".join(f"{v:.4f}" for _, v in pts) + " |")
        L.append("")

    c = res["time_to_target"]
    L.append("## (c) Figure 3: time to reach the target average domain loss\n")
    L.append("Target: 1.02 x fft's best average domain loss. Training wall-clock: the sum of the step times up to "
             "that step (start-up, evaluation and ESFT's profiling excluded; see the whole-runs table). Two "
             f"curves: the held-out loss of the periodic evaluation (every {c['eval_every']} steps; the primary "
             f"measurement), and the training loss (per domain the mean of its last {c['smooth_records']} records, "
             "averaged over domains: each row is trained on at most once, see the epochs below, so it is measured "
             "before the model trains on it). Paper: FFT "
             f"{PAPER['wall_clock_min']['fft']} min, ESFT {PAPER['wall_clock_min']['esft']}, DES-MoE "
             f"{PAPER['wall_clock_min']['desmoe']} (-68.6%), for whole runs.\n")
    if plan["repeats"] > 1:
        L.append(f"fft, esft_gate and desmoe ran {plan['repeats']} times (the repeats last, in reverse order); "
                 "times are means over the repeats. The repeats' held-out losses differ from the first runs' by at "
                 "most " + ", ".join(f"{m} {v:.1e}" for m, v in res["repeatability_max_abs_loss_diff"].items()) + ".\n")
    for kind, title in (("eval", "held-out evaluation"), ("train_loss", "smoothed training loss")):
        if kind not in c:
            L.append(f"No {title} curve (the runs have no periodic evaluation).\n")
            continue
        k = c[kind]
        L.append(f"**{title}**: target {k['target_avg_loss']:.4f} (fft's best {k['fft_best_avg_loss']:.4f}).\n")
        L.append("| mode | reached | step | training s | time / fft | steps / fft | best avg loss |")
        L.append("|---" * 7 + "|")
        for m, r in k["methods"].items():
            L.append(f"| {m} | {'yes' if r['reached'] else 'no'} | {_f(r['step'], '{}')} | "
                     f"{_f(r['train_s'], '{:.1f}')} | {_f(r['time_ratio_to_fft'], '{:.3f}')} | "
                     f"{_f(r['step_ratio_to_fft'], '{:.3f}')} | {r['best_avg_loss']:.4f} |")
        L.append("")
    L.append("Whole runs: the sum of all step times, the training loop (steps, logging and periodic evaluation) and "
             "the rest (start-up, data, evaluation before and after, ESFT's profiling, shutdown).\n")
    L.append("| mode | all steps, s | training loop, s | rest, s |\n|---|---|---|---|")
    for m in TABLE_MODES:
        L.append(f"| {m} | {c['steps_time_s'][m]:.1f} | {c['train_time_s'][m]:.1f} | {c['setup_and_eval_s'][m]:.1f} |")
    L.append("\n![time to target](time_to_target.png)\n")

    o = res["overhead"]
    L.append("## (d) Overhead: desmoe vs fft on the same config\n")
    L.append(f"Median step time over the same steps (the first {plan['skip_steps']} left out) of {o['repeats']} "
             "run(s) each, per desmoe phase; peak resident memory (VmHWM of the larger rank) of each run; the sum of "
             "all step times of each run (a sum takes every pause the machine's load causes, the medians do not).\n")
    L.append("| steps | fft ms/step | desmoe ms/step | desmoe / fft |\n|---|---|---|---|")
    for p, v in o["step_time"].items():
        if isinstance(v, dict):
            L.append(f"| {p} ({v['steps'][0]}-{v['steps'][1]}) | {v['fft_s'] * 1000:.1f} | {v['other_s'] * 1000:.1f} "
                     f"| {v['ratio']:.3f} |")
    mem, st = o["peak_rss_mib"], o["steps_time_s"]
    L.append("\n| | fft | desmoe | desmoe / fft |\n|---|---|---|---|")
    L.append(f"| peak RSS, MiB | {', '.join(f'{v:.0f}' for v in mem['fft'])} | "
             f"{', '.join(f'{v:.0f}' for v in mem['desmoe'])} | {_f(o['peak_rss_ratio'], '{:.3f}')} |")
    L.append(f"| all steps, s | {', '.join(f'{v:.1f}' for v in st['fft'])} | "
             f"{', '.join(f'{v:.1f}' for v in st['desmoe'])} | "
             f"{statistics.mean(st['desmoe']) / statistics.mean(st['fft']):.3f} |")
    L.append("\n![overhead](overhead.png)\n")

    L.append("## Targets (issue 6), as measured\n")
    L.append("| target | measured | threshold | met |\n|---|---|---|---|")
    for tg in res["targets"]:
        L.append(f"| {tg['name']} | {_f(tg['measured'], '{:.3f}')} | {tg['target']} | {_yes(tg['met'])} |")
    over = {n: {d: e for d, e in ep.items() if e > 1.0} for n, ep in res["epochs"].items()}
    over = {n: v for n, v in over.items() if v}
    L.append("")
    L.append("Epochs over each domain's training rows: " + (
        "every run read each row at most once." if not over else
        "more than one in " + "; ".join(f"{n}: " + ", ".join(f"{d} {e:.2f}" for d, e in v.items())
                                        for n, v in over.items()) +
        " (later training losses there include rows seen before).") + "\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def base_summary(model_dir: str, trained_now: bool, pretrain_s: float) -> dict:
    info = pretrain_base.load_recipe_info(model_dir)
    r = info["recipe"]
    return {"dir": model_dir, "info": info, "recipe": r["name"], "trained_now": trained_now,
            "pretrain_time_s": info["total_time_s"], "ensure_time_s": pretrain_s,
            "parameters": info["parameters"], "experts": r["model"]["num_experts"],
            "top_k": r["model"]["num_experts_per_tok"], "seq_len": r["data"]["seq_len"], "steps": r["train"]["steps"],
            "train_rows": info["data"]["train_rows"], "epochs": info["data"]["epochs"],
            "domain_fraction": r["data"]["domain_fraction"], "holdout_rows": r["data"]["holdout_sequences"],
            "holdout_loss": info["final"]["holdout_loss"],
            "unigram_holdout_loss": info["final"]["unigram_holdout_loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the smoke-test variant (small model, 3 domains, few steps)")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce or runs/reproduce_quick)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (expert parallelism = nproc)")
    p.add_argument("--cache", default=None, help="base-model cache folder (default $DESMOE_CACHE/base_models)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs whose YAML is unchanged")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    plan = PLANS["quick" if a.quick else "full"]
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", "reproduce_quick" if a.quick else "reproduce"))
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)

    def log(msg):
        print(f"[reproduce {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    model_dir, trained_now = pretrain_base.ensure_base_model(pretrain_base.RECIPES[plan["recipe"]], a.cache, log=log)
    base = base_summary(model_dir, trained_now, time.perf_counter() - t0)
    pretrain_s = time.perf_counter() - t0
    runs, reused = {}, []
    t_runs = time.perf_counter()
    planned = plan_runs(plan)
    for i, (name, mode, domains) in enumerate(planned):
        run_dir = os.path.join(out, "runs", name)
        cfg_path = os.path.join(out, "runs", f"{name}.yaml")
        cfg = run_config(plan, base, name=name, mode=mode, domains=domains, out_dir=run_dir, nproc=a.nproc)
        command = f"desmoe train --config {cfg_path} --nproc {a.nproc}"
        old = open(cfg_path, encoding="utf-8").read() if os.path.isfile(cfg_path) else None
        text = write_yaml(cfg, cfg_path, command)
        record_path = os.path.join(out, "runs", f"{name}.run.json")
        if a.reuse and old == text and os.path.isfile(os.path.join(run_dir, "summary.json")) \
                and os.path.isfile(record_path):
            with open(record_path, encoding="utf-8") as fh:
                record = json.load(fh)
            reused.append(name)
            log(f"run {i + 1}/{len(planned)} {name}: reused")
        else:
            record = run_cli(cfg_path, a.nproc, os.path.join(out, "runs", f"{name}.log"))
            record.update(name=name, mode=mode, domains=domains, nproc=a.nproc, config=cfg_path)
            with open(record_path, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2)
            log(f"run {i + 1}/{len(planned)} {name}: {record['wall_s']:.0f}s, peak RSS {record['peak_rss_mib']} MiB")
        runs[name] = dict(record, **load_run(run_dir))
    runs_s = time.perf_counter() - t_runs

    import torch

    res = {
        "quick": a.quick,
        "command": "python -m benchmarks.reproduce" + (" --quick" if a.quick else "") +
                   (f" --nproc {a.nproc}" if a.nproc != 2 else ""),
        "nproc": a.nproc,
        "plan": plan,
        "holdout_sequences": holdout_rows(plan, base["info"]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg")
                    else None},
        "base_model": {k: v for k, v in base.items() if k != "info"},
        "base_model_recipe": base["info"],
        "paper": PAPER,
        "targets_spec": TARGETS,
        "runs": {n: {k: v for k, v in r.items() if k not in ("metrics", "data_summary", "esft_selection")}
                 for n, r in runs.items()},
        "reused_runs": reused,
    }
    res.update(analyse(plan, runs, base))
    res["timing"] = {"pretrain_s": pretrain_s, "runs_s": runs_s, "total_s": time.perf_counter() - t0}
    res["plots"] = [os.path.basename(f) for f in write_plots(res, out)]
    res["timing"]["total_s"] = time.perf_counter() - t0
    write_report(res, os.path.join(out, "report.md"))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=2)
    log(f"wrote {out}/results.json, report.md and {len(res['plots'])} plots; total {res['timing']['total_s'] / 60:.1f} min")
    for tg in res["targets"]:
        log(f"target: {tg['name']}: measured {_f(tg['measured'], '{:.3f}')} -> "
            f"{'met' if tg['met'] else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
