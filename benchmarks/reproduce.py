"""The paper's experiments (METHOD.md section 4) at small scale: an LR x seed sweep of every mode, JSON, markdown, PNG.

    python -m benchmarks.reproduce [--plan full|full_qwen|lora|quick] [--quick] [--out DIR] [--nproc 2]
                                   [--reuse] [--analyse-only]

Every fine-tuning run is a real ``desmoe train --nproc N`` (``python -m desmoe.cli``) of a small base
model from benchmarks/pretrain_base.py (pretrained first if not cached), on the built-in domains, with
the base model's own general holdout (recipe.json ``finetune.holdout``) as ``data.holdout``.

1. Sweep: every mode (fft, esft_gate, esft_token, desmoe, desmoe_no_alr, desmoe_no_dges, lora) and every
   variant (plan "variants": a mode with dotted config overrides) at each of the plan's learning
   rates x seeds (``run.seed``: data order, initialisation of the adaptive router, ...), on all
   domains. Run names encode all of it: ``desmoe_lr3e-4_s1_d6``.
2. Each run evaluates every ``eval.every`` steps (plan "evals_per_run" evaluations in all, the last
   one after the last step). Its point is the evaluation with the lowest average held-out domain
   loss (the paper keeps the best checkpoint): that evaluation's domain losses, task metrics and
   general-holdout loss; forgetting F = its holdout loss - the base model's (the run's evaluation
   before training). No checkpoint is saved: the numbers of that evaluation are what is reported.
3. Per mode and LR: mean and spread over seeds. Per mode: the Pareto front of average domain loss
   vs F over its LRs (seed means), and how desmoe's front compares with fft's and ESFT's.
4. Figure 2: F as the number of domains grows (prefixes of the domain list) for fft, the better
   ESFT mode and desmoe, each at the LR whose average domain loss (all domains, seed mean) is
   closest to fft's best. These runs happen after the sweep; the point at all domains is the sweep's.
5. Time to target: steps and training seconds (summed step times) until the periodic evaluation's
   average domain loss reaches fft's best x 1.02, per mode at its best LR; per-phase median step
   time of desmoe vs fft; the targets, measured.

Results go to OUT/results.json, OUT/report.md and OUT/*.png; each run's directory, YAML, log and
record (``NAME.run.json``) to OUT/runs/. ``--reuse`` keeps a finished run whose YAML is unchanged
(to continue a killed set); ``--analyse-only`` runs nothing and analyses whichever planned runs
are finished. A run that fails (its config rejected, or desmoe train exiting non-zero) is recorded
as failed with its log, and the rest goes on. --quick (= --plan quick) is CI's smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

MODES = ("fft", "desmoe", "esft_gate", "esft_token", "desmoe_no_alr", "desmoe_no_dges", "lora")
"""Every mode, in the order they run at each (seed, LR): fft beside desmoe (their times are compared)."""
ESFT_MODES = ("esft_gate", "esft_token")
BASELINES = ("fft", *ESFT_MODES, "lora")
"""The modes desmoe's Pareto front is compared with (target b)."""
FIGURE2_ROLES = ("fft", "esft", "desmoe")
"""Figure 2's curves: fft, the better ESFT mode (lower best average domain loss), desmoe."""

_FULL = {
    "recipe": "dsv2" if "dsv2" in pretrain_base.RECIPES else "full",
    "domains": list(pretrain_base.DOMAINS), "domain_counts": [2, 4, 6],
    "modes": list(MODES), "lrs": [1e-4, 3e-4, 1e-3, 3e-3],
    "mode_lrs": {"desmoe_no_alr": [3e-4, 1e-3, 3e-3], "desmoe_no_dges": [3e-4, 1e-3, 3e-3],
                 # LoRA's updates are low-rank and scaled by alpha / r: its usual LRs are higher
                 "lora": [3e-4, 1e-3, 3e-3, 1e-2]}, "seeds": [1, 2],
    "variants": {
        # issue 11 part 4: method-side ideas, each one knob, at one LR x both seeds (a second pass added LRs to
        # the one that moved the front)
        "desmoe_phi04": {"mode": "desmoe", "overrides": {"method.phi": 0.4}, "lrs": [1e-3]},
        "desmoe_shared_never": {"mode": "desmoe", "overrides": {"method.shared_experts": "never"}, "lrs": [1e-3]},
        "desmoe_backbone_lr01": {"mode": "desmoe", "lrs": [3e-4, 1e-3, 3e-3], "overrides": {
            "method.phase_trainable": {"warmup": ["router", "experts", "backbone"],
                                       "stabilization": ["router", "selected_experts", "backbone"],
                                       "consolidation": ["selected_experts", "backbone"]},
            "method.backbone_lr_scale": 0.1}},
        "desmoe_schedule_v01": {"mode": "desmoe", "lrs": [1e-3], "overrides": {
            "method.phase_trainable": {"warmup": ["router", "backbone"]}, "method.kd_alpha_end": 0.7,
            "method.kd_layer_reduction": "mean"}},
    },
    "steps_per_domain": 25, "micro_batch_size": 4, "warmup_steps": 10, "lr_schedule": "constant",
    "eval_sequences": 64, "holdout_sequences": 128, "evals_per_run": 3, "eval_max_pairs": 16,
    "esft_profile_tokens": 32768, "affinity_update_every": 10, "log_every": 10,
    "max_examples_cap": None, "skip_steps": 5,
    "cost": {"startup_s": 10.0, "step_s": 0.22, "eval_s_per_set": 1.0},
}
"""The full set. 25 steps per domain (150 at 6 domains; the earlier single-LR set had 50): fft, desmoe and the ESFT
modes at 4 LRs, the ablations at 3, four desmoe variants at 1e-3 (the small backbone LR, which moved the front
in a first pass, at 3), all x 2 seeds (56 runs), and Figure 2's 12 runs: about 75 minutes on the idle 2-core
machine. Three evaluations after step 0 (every
50 steps at 6 domains, the last the final one): an evaluation costs as much as about 40 training steps, most of
it greedy generation for the task metrics (eval.max_pairs prompts of each of the 4 generation domains; the
loss of 64 rows per domain and 128 holdout rows is the cheap part), so 16 prompts, not 32.

``cost`` is the run-time model of the estimate printed at the start (start-up, one optimizer step with its
logging, one evaluation of one set, domain or holdout, incl. generation), from runs of this plan on the dsv2
base model on the idle 2-core machine: fft 82 s, desmoe 61 s, esft_gate 60 s per run on 6 domains (about
60 min for the whole set). With other jobs on the machine (load average 4) the same runs took 96-121 s,
about 1.5x: the time left that the runs print is scaled by the measured / estimated time so far."""

PLANS = {
    "full": _FULL,
    "full_qwen": dict(_FULL, recipe="full"),
    # The paper's third baseline beside the two it is compared with most: fft, desmoe and lora at each one's
    # LRs (lora's include higher ones), both seeds, 6 domains (24 runs, about 30 min on the idle 2-core
    # machine). The same testbed, seeds and LRs as "full", whose runs are deterministic: its fft and desmoe
    # numbers come out again, and its ESFT numbers stand beside these.
    "lora": dict(_FULL, modes=["fft", "desmoe", "lora"], variants={}, domain_counts=[len(_FULL["domains"])]),
    "quick": {
        "recipe": "quick", "domains": ["math", "code", "intent"], "domain_counts": [2, 3],
        "modes": ["fft", "desmoe", *ESFT_MODES, "lora"], "lrs": [1e-3],
        "mode_lrs": {"fft": [3e-4, 1e-3], "desmoe": [3e-4, 1e-3]}, "seeds": [1],
        "variants": {"desmoe_phi04": {"mode": "desmoe", "overrides": {"method.phi": 0.4}, "lrs": [1e-3]}},
        "steps_per_domain": 8, "micro_batch_size": 2, "warmup_steps": 2, "lr_schedule": "constant",
        "eval_sequences": 4, "holdout_sequences": 8, "evals_per_run": 3, "eval_max_pairs": 2,
        "esft_profile_tokens": 1024, "affinity_update_every": 4, "log_every": 4,
        "max_examples_cap": 150, "skip_steps": 2,
        "cost": {"startup_s": 12.0, "step_s": 0.05, "eval_s_per_set": 0.3},
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
# Plan -> runs -> configs
# ---------------------------------------------------------------------------------------------


def lr_tag(lr: float) -> str:
    """3e-4 -> '3e-4', 1e-3 -> '1e-3', 2.5e-4 -> '2.5e-4' (for run names)."""
    mant, exp = f"{lr:e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def run_name(setting: str, lr: float, seed: int, n_domains: int) -> str:
    return f"{setting}_lr{lr_tag(lr)}_s{seed}_d{n_domains}"


def settings(plan: dict) -> dict[str, dict]:
    """name -> {"mode", "overrides", "lrs", "variant"}: the plan's modes, then its variants."""
    out = {m: {"mode": m, "overrides": {}, "lrs": list(plan["mode_lrs"].get(m, plan["lrs"])), "variant": False}
           for m in plan["modes"]}
    for name, v in (plan.get("variants") or {}).items():
        if name in out:
            raise ValueError(f"variant {name!r} has the name of a mode")
        out[name] = {"mode": v["mode"], "overrides": dict(v.get("overrides") or {}),
                     "lrs": list(v.get("lrs") or plan["lrs"]), "variant": True}
    return out


def _spec(setting: str, s: dict, lr: float, seed: int, domains: list[str], stage: str) -> dict:
    return {"name": run_name(setting, lr, seed, len(domains)), "setting": setting, "mode": s["mode"],
            "overrides": s["overrides"], "lr": lr, "seed": seed, "domains": list(domains), "stage": stage}


def sweep_runs(plan: dict) -> list[dict]:
    """Every run of the sweep, in the order they run: seed by seed, LR by LR, every setting; so a set cut
    short has whole seeds first."""
    sets = settings(plan)
    lrs = sorted({lr for s in sets.values() for lr in s["lrs"]})
    return [_spec(name, s, lr, seed, plan["domains"], "sweep")
            for seed in plan["seeds"] for lr in lrs for name, s in sets.items() if lr in s["lrs"]]


def figure2_runs(plan: dict, choice: dict) -> list[dict]:
    """The runs of Figure 2 below all domains: ``choice`` is role -> {"setting", "lr"} (figure2_choice)."""
    sets = settings(plan)
    n_all = len(plan["domains"])
    return [_spec(choice[r]["setting"], sets[choice[r]["setting"]], choice[r]["lr"], seed, plan["domains"][:n],
                  "figure2")
            for n in plan["domain_counts"] if n != n_all for seed in plan["seeds"]
            for r in FIGURE2_ROLES if r in choice]


def steps_of(plan: dict, n_domains: int) -> int:
    return plan["steps_per_domain"] * n_domains


def eval_every(plan: dict, steps: int) -> int:
    """eval.every giving ``evals_per_run`` evaluations after step 0 (the last one is the final one)."""
    return max(1, math.ceil(steps / plan["evals_per_run"]))


def evaluations_per_run(plan: dict, steps: int) -> int:
    """Evaluations a run does, the one before training included (desmoe skips a periodic one at the last step)."""
    every = eval_every(plan, steps)
    return 1 + (steps - 1) // every + 1


def holdout_rows(plan: dict, info: dict) -> int:
    """data.holdout_sequences of the runs: the plan's, at most the base model's held-out rows.

    NOTE: the base model never trained on the first finetune.holdout_sequences rows of its holdout;
    evaluating any prefix of them measures forgetting on unseen text only."""
    limit = info["finetune"].get("holdout_sequences")
    return plan["holdout_sequences"] if limit is None else min(plan["holdout_sequences"], limit)


def holdout_mapping(info: dict) -> dict:
    """data.holdout of the runs: the base model's own general holdout (recipe.json finetune.holdout)."""
    return copy.deepcopy(info["finetune"].get("holdout", {"builtin": "general"}))


def set_dotted(cfg: dict, key: str, value) -> None:
    """cfg["a"]["b"] = value for key "a.b" (sections made as needed); desmoe's strict config rejects a
    key it does not know when the run's config is read."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override key {key!r}: must be section.key, e.g. method.phi")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def run_config(plan: dict, base: dict, spec: dict, *, out_dir: str, nproc: int) -> dict:
    """The complete desmoe run config of one run (written as its YAML)."""
    info = base["info"]
    limits = info["finetune"].get("max_examples") or {}
    cap = plan["max_examples_cap"]
    steps = steps_of(plan, len(spec["domains"]))

    def max_examples(d):
        vals = [v for v in (limits.get(d), cap) if v is not None]
        return min(vals) if vals else None

    data = {"seq_len": info["finetune"]["seq_len"], "holdout_sequences": holdout_rows(plan, info),
            "eval_sequences": plan["eval_sequences"]}
    tok = os.path.join(base["dir"], "tokenizer.model")
    if os.path.isfile(tok):
        data["tokenizer"] = tok
    data["domains"] = {d: {"builtin": d} if max_examples(d) is None else {"builtin": d, "max_examples": max_examples(d)}
                       for d in spec["domains"]}
    data["holdout"] = holdout_mapping(info)
    cfg = {
        "run": {"name": spec["name"], "seed": spec["seed"], "output_dir": out_dir, "overwrite": True},
        "model": {"path": base["dir"]},
        "parallel": {"ep_size": nproc, "zero_stage": 1},
        "train": {"max_steps": steps, "micro_batch_size": plan["micro_batch_size"],
                  "lr": spec["lr"], "warmup_steps": plan["warmup_steps"], "lr_schedule": plan["lr_schedule"],
                  "weight_decay": 0.0, "log_every": plan["log_every"]},
        "data": data,
        "method": {"mode": spec["mode"], "esft_profile_tokens": plan["esft_profile_tokens"],
                   "affinity_update_every": plan["affinity_update_every"]},
        "checkpoint": {"save_final": False},
        "eval": {"every": eval_every(plan, steps), "max_pairs": plan["eval_max_pairs"]},
        "tracking": {"mlflow": False},
    }
    for key, value in spec["overrides"].items():
        set_dotted(cfg, key, value)
    return cfg


def config_problem(cfg: dict, nproc: int) -> str | None:
    """desmoe's own verdict on a run config (strict keys, validate()); None when it is valid."""
    from desmoe.config import config_from_dict, validate

    try:
        validate(config_from_dict(cfg), world_size=nproc)
    except ValueError as e:  # desmoe.config.ConfigError
        return str(e)
    return None


def estimate_s(plan: dict, specs: list[dict]) -> float:
    """Seconds the runs should take by the plan's cost model (start-up + steps + evaluations)."""
    c = plan["cost"]
    total = 0.0
    for s in specs:
        steps = steps_of(plan, len(s["domains"]))
        total += c["startup_s"] + c["step_s"] * steps + c["eval_s_per_set"] * (len(s["domains"]) + 1) * \
            evaluations_per_run(plan, steps)
    return total


def write_yaml(cfg: dict, path: str, command: str) -> str:
    text = yaml_text(cfg, command)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def yaml_text(cfg: dict, command: str) -> str:
    import yaml

    return f"# {command}\n" + yaml.safe_dump(cfg, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


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
    """``desmoe train --config CONFIG --nproc N``; returns its exit code, wall-clock and each rank's peak RSS (MiB).

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
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_rss_mib": [round(v / 1024, 1) for _, v in sorted(peaks.items())] or None}


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


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
            "eval": read_json("eval.json")}


class Runner:
    """Runs (or, analyse-only, finds) the planned runs under OUT/runs; name -> record."""

    def __init__(self, plan: dict, base: dict, out: str, nproc: int, *, reuse: bool, analyse_only: bool, log):
        self.plan, self.base, self.out, self.nproc = plan, base, out, nproc
        self.reuse, self.analyse_only, self.log = reuse, analyse_only, log
        self.runs: dict[str, dict] = {}
        self.reused: list[str] = []
        self.done = 0
        self.run_s = 0.0
        self.est_done_s = 0.0  # the estimate of the runs run so far (for the time left)
        self.est_skipped_s = 0.0  # ... of the runs reused

    def paths(self, name: str) -> dict[str, str]:
        d = os.path.join(self.out, "runs")
        return {"dir": os.path.join(d, name), "yaml": os.path.join(d, f"{name}.yaml"),
                "log": os.path.join(d, f"{name}.log"), "record": os.path.join(d, f"{name}.run.json")}

    @staticmethod
    def _finished(p: dict, text: str) -> tuple[dict | None, str]:
        """(record, "") of a run that ended (ok or failed) with the YAML ``text``; else (None, why not)."""
        if not os.path.isfile(p["record"]):
            return None, "missing"
        if not os.path.isfile(p["yaml"]):
            return None, "missing"
        with open(p["yaml"], encoding="utf-8") as f:
            if f.read() != text:
                return None, "stale"  # run with another config than the plan's now
        with open(p["record"], encoding="utf-8") as f:
            record = json.load(f)
        if record.get("status") == "ok" and not os.path.isfile(os.path.join(p["dir"], "summary.json")):
            return None, "missing"
        return record, ""

    def do(self, specs: list[dict], total: int, est_total: float) -> None:
        for spec in specs:
            self.one(spec, total, est_total)

    def one(self, spec: dict, total: int, est_total: float) -> dict:
        name, p = spec["name"], self.paths(spec["name"])
        cfg = run_config(self.plan, self.base, spec, out_dir=p["dir"], nproc=self.nproc)
        text = yaml_text(cfg, f"desmoe train --config {p['yaml']} --nproc {self.nproc}")
        meta = {k: spec[k] for k in ("name", "setting", "mode", "overrides", "lr", "seed", "domains", "stage")}
        meta.update(nproc=self.nproc, config=p["yaml"], log=p["log"])
        record, why = self._finished(p, text) if (self.reuse or self.analyse_only) else (None, "")
        if record is not None and record.get("status") != "ok" and not self.analyse_only:
            record = None  # --reuse runs a failed run again
        if self.analyse_only:
            if record is None:
                record = dict(meta, status=why)
        elif record is not None:
            self.reused.append(name)
            self.est_skipped_s += estimate_s(self.plan, [spec])
            self.log(f"run {name}: reused")
        else:
            est = estimate_s(self.plan, [spec])
            if os.path.isfile(p["record"]):
                os.remove(p["record"])  # a run killed from here on leaves no record to reuse
            os.makedirs(os.path.dirname(p["yaml"]), exist_ok=True)
            with open(p["yaml"], "w", encoding="utf-8") as f:
                f.write(text)
            problem = config_problem(cfg, self.nproc)
            if problem is not None:
                with open(p["log"], "w", encoding="utf-8") as f:
                    f.write(f"config rejected by desmoe before launching:\n{problem}\n")
                record = dict(meta, status="failed", error=problem, returncode=None, wall_s=0.0, peak_rss_mib=None)
            else:
                rec = run_cli(p["yaml"], self.nproc, p["log"])
                ok = rec["returncode"] == 0 and os.path.isfile(os.path.join(p["dir"], "summary.json"))
                record = dict(meta, **rec, status="ok" if ok else "failed")
                if not ok:
                    record["error"] = f"desmoe train exited {rec['returncode']}; log tail:\n{_tail(p['log'])}"
            with open(p["record"], "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
            self.done += 1
            if record["wall_s"] > 0:
                self.run_s += record["wall_s"]
                self.est_done_s += est
            else:  # rejected before launching
                self.est_skipped_s += est
            scale = self.run_s / self.est_done_s if self.est_done_s else 1.0
            left = max(0.0, est_total - self.est_done_s - self.est_skipped_s) * scale
            status = "ok" if record["status"] == "ok" else f"FAILED (log {p['log']})"
            self.log(f"run {len(self.runs) + 1}/{total} {name}: {status}, {record['wall_s']:.0f}s"
                     f" (estimated {est:.0f}s); about {left / 60:.0f} min left")
        if record["status"] == "ok":
            record = dict(record, **load_run(p["dir"]))
        self.runs[name] = record
        return record


# ---------------------------------------------------------------------------------------------
# Analysis (pure: run data in, numbers out)
# ---------------------------------------------------------------------------------------------


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


def evaluations(eval_json: dict | None, last_step: int | None = None) -> list[tuple[int, dict]]:
    """(step, results) of every evaluation after training started: the periodic ones (eval.every) and the
    final one (at ``last_step``, default one past the last periodic one); [] without a complete eval.json."""
    if not isinstance(eval_json, dict) or not eval_json.get("before") or not eval_json.get("after"):
        return []
    points = [(h["step"], h["results"]) for h in eval_json.get("history") or []]
    if last_step is None:
        last_step = (points[-1][0] + 1) if points else 1
    return points + [(last_step, eval_json["after"])]


def best_evaluation(eval_json: dict | None, domains: list[str], last_step: int | None = None) -> dict | None:
    """The evaluation (periodic or final) with the lowest average held-out domain loss (the earliest on a
    tie): {"step", "avg_domain_loss", "loss", "holdout_loss", "before_holdout_loss", "forgetting",
    "results"}; forgetting = its holdout loss - the holdout loss before training (the base model's)."""
    evs = evaluations(eval_json, last_step)
    if not evs:
        return None
    step, res = min(evs, key=lambda e: (average_domain_loss({d: e[1][d]["loss"] for d in domains}, domains), e[0]))
    before = eval_json["before"].get("holdout", {}).get("loss")
    hold = res.get("holdout", {}).get("loss")
    return {"step": step, "avg_domain_loss": average_domain_loss({d: res[d]["loss"] for d in domains}, domains),
            "loss": {d: res[d]["loss"] for d in domains}, "holdout_loss": hold, "before_holdout_loss": before,
            "forgetting": (hold - before) if hold is not None and before is not None else None, "results": res}


def eval_curve(eval_json: dict | None, rows: list[dict], domains: list[str]) -> list[dict]:
    """The held-out mean domain loss at step 0 (before), at every periodic evaluation (eval.every) and
    after the last step, with the training wall-clock ``train_s`` up to that step; [] without eval.json."""
    if not isinstance(eval_json, dict) or not eval_json.get("before") or not eval_json.get("after"):
        return []
    secs = training_seconds(rows)
    last = max(secs) if secs else 0
    points = [(0, eval_json["before"])] + evaluations(eval_json, last)
    return [{"step": s, "train_s": secs.get(s, 0.0), "avg_loss": average_domain_loss(
        {d: res[d]["loss"] for d in domains}, domains)} for s, res in points]


def holdout_curve(eval_json: dict | None, rows: list[dict]) -> list[tuple[int, float]]:
    """(step, general-holdout loss) before, at every periodic evaluation and after; [] without eval.json."""
    if not isinstance(eval_json, dict) or not eval_json.get("before") or not eval_json.get("after"):
        return []
    points = [(0, eval_json["before"])] + evaluations(eval_json, max((r["step"] for r in rows), default=0))
    return [(s, res["holdout"]["loss"]) for s, res in points if "holdout" in res]


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """The first point of ``curve`` after step 0 at or below ``target`` (its step and train_s), None if never."""
    for p in curve:
        if p["step"] > 0 and p["avg_loss"] <= target:
            return {"step": p["step"], "train_s": p["train_s"]}
    return None


def step_times(runs_rows: list[list[dict]]) -> dict[int, tuple[list[float], str]]:
    """step -> (its step_time_s in each run, phase), over several runs of one config."""
    out: dict[int, tuple[list[float], str]] = {}
    for rows in runs_rows:
        for r in {r["step"]: r for r in rows}.values():  # one record per step
            out.setdefault(r["step"], ([], r.get("phase", "full")))[0].append(r["step_time_s"])
    return out


def run_medians(runs_rows: list[list[dict]], steps: list[int]) -> list[float]:
    """Each run's median step time over those of ``steps`` it has (runs with none left out)."""
    want = set(steps)
    out = []
    for rows in runs_rows:
        t = [r["step_time_s"] for r in {r["step"]: r for r in rows}.values() if r["step"] in want]
        if t:
            out.append(statistics.median(t))
    return out


def overhead_stats(fft_runs: list[list[dict]], other_runs: list[list[dict]], skip: int) -> dict:
    """Median step time of fft and another mode over the same steps (the first ``skip`` left out) of all
    their runs (metrics rows of each), overall and per phase of the other mode; ratio = other / fft;
    ``fft_runs_s`` / ``other_runs_s``: each run's own median over those steps (the spread over runs)."""
    f, o = step_times(fft_runs), step_times(other_runs)
    common = [s for s in sorted(o) if s in f and s > skip]
    out = {"steps": len(common)}
    if not common:
        return out

    def medians(steps):
        fm = statistics.median(t for s in steps for t in f[s][0])
        om = statistics.median(t for s in steps for t in o[s][0])
        return {"steps": [steps[0], steps[-1]], "fft_s": fm, "other_s": om, "ratio": om / fm,
                "fft_runs_s": run_medians(fft_runs, steps), "other_runs_s": run_medians(other_runs, steps)}

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


def task_scores(results: dict | None, headline: dict[str, str]) -> dict[str, float] | None:
    """Each domain's headline task metric in percent from one evaluation's results (eval.json's "before",
    "after" or a history entry's "results"); None when a domain lacks its metric."""
    if not isinstance(results, dict) or not headline:
        return None
    out = {}
    for d, metric in headline.items():
        v = (results.get(d) or {}).get(metric)
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


def run_point(run: dict, heads: dict[str, str]) -> dict | None:
    """A finished run's point: its best evaluation (best_evaluation), task metrics there, and the final
    evaluation's numbers beside it; None when the run has no complete eval.json."""
    domains = run["domains"]
    last = run["summary"]["steps"] if run.get("summary") else None
    best = best_evaluation(run.get("eval"), domains, last)
    if best is None:
        return None
    final = best_evaluation({"before": run["eval"]["before"], "after": run["eval"]["after"]}, domains, last)
    task = task_scores(best.pop("results"), {d: h for d, h in heads.items() if d in domains})
    return {"name": run["name"], "setting": run["setting"], "mode": run["mode"], "lr": run["lr"],
            "seed": run["seed"], "n_domains": len(domains), "steps": last, **best, "task": task,
            "task_avg": sum(task.values()) / len(task) if task else None,
            "final": {"step": last, "avg_domain_loss": final["avg_domain_loss"], "forgetting": final["forgetting"]}}


def stats(values: list[float | None]) -> dict | None:
    """mean, sample std (0 for one value), min, max and n of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v),
            "max": max(v), "n": len(v)}


def aggregate(points: list[dict]) -> dict:
    """One (setting, LR, domain count)'s points over its seeds: stats of every number; per domain the seed
    mean (``loss``) and its stats (``loss_stats``: mean, std, min, max, n)."""
    p0 = points[0]
    domains = list(p0["loss"])
    tasks = [p["task"] for p in points]
    return {"setting": p0["setting"], "mode": p0["mode"], "lr": p0["lr"], "n_domains": p0["n_domains"],
            "seeds": [p["seed"] for p in points], "runs": [p["name"] for p in points],
            "avg_domain_loss": stats([p["avg_domain_loss"] for p in points]),
            "forgetting": stats([p["forgetting"] for p in points]),
            "holdout_loss": stats([p["holdout_loss"] for p in points]),
            "loss": {d: statistics.fmean(p["loss"][d] for p in points) for d in domains},
            "loss_stats": {d: stats([p["loss"][d] for p in points]) for d in domains},
            "task": ({d: statistics.fmean(t[d] for t in tasks) for d in tasks[0]}
                     if all(t is not None for t in tasks) else None),
            "task_avg": stats([p["task_avg"] for p in points]),
            "best_step": [p["step"] for p in points],
            "final_avg_domain_loss": stats([p["final"]["avg_domain_loss"] for p in points]),
            "final_forgetting": stats([p["final"]["forgetting"] for p in points])}


def pareto_front(points: list[dict]) -> list[dict]:
    """The non-dominated points (keys "forgetting", "loss": lower is better in both), sorted by forgetting:
    a point is dominated when another is no worse in both and better in one."""
    def dominated(p):
        return any(q["forgetting"] <= p["forgetting"] and q["loss"] <= p["loss"] and
                   (q["forgetting"] < p["forgetting"] or q["loss"] < p["loss"]) for q in points)

    front = [p for p in points if not dominated(p)]
    out, seen = [], set()
    for p in sorted(front, key=lambda p: (p["forgetting"], p["loss"])):
        if (p["forgetting"], p["loss"]) not in seen:  # equal points: the first
            seen.add((p["forgetting"], p["loss"]))
            out.append(p)
    return out


def front_loss_at(front: list[dict], f: float) -> float | None:
    """The front's loss at forgetting ``f``, linear between its points (sorted by forgetting); None
    outside its forgetting range."""
    if not front or f < front[0]["forgetting"] or f > front[-1]["forgetting"]:
        return None
    for a, b in zip(front, front[1:]):
        if a["forgetting"] <= f <= b["forgetting"]:
            if b["forgetting"] == a["forgetting"]:
                return min(a["loss"], b["loss"])
            w = (f - a["forgetting"]) / (b["forgetting"] - a["forgetting"])
            return a["loss"] + w * (b["loss"] - a["loss"])
    return front[0]["loss"]  # a single point at f


def compare_fronts(front: list[dict], other: list[dict]) -> dict:
    """Is ``front`` on or beyond ``other`` wherever both are defined? Both fronts are piecewise linear in
    forgetting F; on the overlap of their F ranges [max of the lows, min of the highs], ``front``'s loss
    minus ``other``'s is compared at every front point inside it and at its ends (the difference is
    linear between those, so its maximum is at one of them). ``max_diff`` <= 0: on or beyond everywhere
    (met); no overlap: met None. ``dominated``: how many of ``other``'s points some point of ``front`` is no
    worse than in both (a comparison that needs no shared range), of ``other_points``."""
    dom = sum(1 for p in other if any(q["forgetting"] <= p["forgetting"] and q["loss"] <= p["loss"] for q in front))
    none = {"overlap": None, "checks": [], "max_diff": None, "met": None, "dominated": dom, "other_points": len(other)}
    if not front or not other:
        return none
    lo = max(front[0]["forgetting"], other[0]["forgetting"])
    hi = min(front[-1]["forgetting"], other[-1]["forgetting"])
    if lo > hi:
        return none
    fs = sorted({lo, hi, *(p["forgetting"] for p in front + other if lo <= p["forgetting"] <= hi)})
    checks = [{"forgetting": f, "loss": front_loss_at(front, f), "other_loss": front_loss_at(other, f)} for f in fs]
    for c in checks:
        c["diff"] = c["loss"] - c["other_loss"]
    worst = max(c["diff"] for c in checks)
    return dict(none, overlap=[lo, hi], checks=checks, max_diff=worst, met=worst <= 1e-12)


def best_lr_group(groups: list[dict]) -> dict | None:
    """The group (one LR) with the lowest seed-mean average domain loss."""
    return min(groups, key=lambda g: (g["avg_domain_loss"]["mean"], g["lr"])) if groups else None


def closest_lr_group(groups: list[dict], target_loss: float) -> dict | None:
    """The group whose seed-mean average domain loss is closest to ``target_loss`` (the lower LR on a tie)."""
    return min(groups, key=lambda g: (abs(g["avg_domain_loss"]["mean"] - target_loss), g["lr"])) if groups else None


def better_esft(groups_by_setting: dict[str, list[dict]]) -> str | None:
    """The ESFT mode with the lower best (over LRs) seed-mean average domain loss."""
    best = {m: best_lr_group(groups_by_setting[m]) for m in ESFT_MODES if groups_by_setting.get(m)}
    return min(best, key=lambda m: best[m]["avg_domain_loss"]["mean"]) if best else None


def figure2_choice(groups_by_setting: dict[str, list[dict]]) -> dict:
    """role -> {"setting", "lr", "avg_domain_loss", "distance"}: fft, the better ESFT mode and desmoe, each
    at the LR whose average domain loss (all domains, seed mean) is closest to fft's best; {} without fft."""
    fft_best = best_lr_group(groups_by_setting.get("fft") or [])
    if fft_best is None:
        return {}
    target = fft_best["avg_domain_loss"]["mean"]
    out = {}
    for role, setting in (("fft", "fft"), ("esft", better_esft(groups_by_setting)), ("desmoe", "desmoe")):
        g = closest_lr_group(groups_by_setting.get(setting) or [], target) if setting else None
        if g is not None:
            out[role] = {"setting": setting, "lr": g["lr"], "avg_domain_loss": g["avg_domain_loss"]["mean"],
                         "distance": g["avg_domain_loss"]["mean"] - target}
    return out


def seed_time_to_target(run: dict, target: float) -> tuple[dict | None, list[dict]]:
    """(hit or None, eval curve) of one run: the first periodic or final evaluation at or below target."""
    curve = eval_curve(run.get("eval"), run["metrics"], run["domains"])
    return time_to_target(curve, target), curve


def group_time_to_target(runs: list[dict], target: float) -> dict:
    """Time to target over one group's seeds: reached = by every seed; step and training seconds are
    means over the seeds that reached it."""
    hits, curves = zip(*(seed_time_to_target(r, target) for r in runs)) if runs else ((), ())
    got = [h for h in hits if h is not None]
    return {"reached": bool(runs) and len(got) == len(runs), "reached_seeds": len(got), "seeds": len(runs),
            "step": statistics.fmean(h["step"] for h in got) if got else None,
            "train_s": statistics.fmean(h["train_s"] for h in got) if got else None,
            "each": list(hits), "curves": [[(p["step"], p["train_s"], p["avg_loss"]) for p in c] for c in curves]}


def mean_curve(curves: list[list[tuple]]) -> list[tuple[int, float, float, float, float]]:
    """(step, mean train_s, mean avg loss, min avg loss, max avg loss) over the seeds' curves, at the steps
    every seed's curve has."""
    if not curves:
        return []
    steps = [s for s, _, _ in curves[0] if all(any(t == s for t, _, _ in c) for c in curves[1:])]
    out = []
    for s in steps:
        pts = [next(p for p in c if p[0] == s) for c in curves]
        out.append((s, statistics.fmean(p[1] for p in pts), statistics.fmean(p[2] for p in pts),
                    min(p[2] for p in pts), max(p[2] for p in pts)))
    return out


def _group(points: list[dict]) -> dict[tuple, dict]:
    """(setting, lr, n_domains) -> aggregate over seeds."""
    by: dict[tuple, list[dict]] = {}
    for p in points:
        by.setdefault((p["setting"], p["lr"], p["n_domains"]), []).append(p)
    return {k: aggregate(sorted(v, key=lambda p: p["seed"])) for k, v in by.items()}


def run_status(runs: dict[str, dict]) -> dict:
    counts: dict[str, int] = {}
    for r in runs.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"counts": counts, "failed": [{"name": n, "log": r["log"], "error": (r.get("error") or "")[-1500:]}
                                         for n, r in runs.items() if r["status"] == "failed"]}


def analyse_sweep(plan: dict, runs: dict[str, dict]) -> dict:
    """The sweep's numbers (from its finished runs): points, groups, fronts, best LRs, Figure 2's LR choice."""
    domains = plan["domains"]
    n_all = len(domains)
    sets = settings(plan)
    ok = [r for r in runs.values() if r["status"] == "ok" and r["stage"] == "sweep"]
    heads = headline_metrics(next((r["data_summary"] for r in ok), None), domains)
    points = [p for p in (run_point(r, heads) for r in ok) if p is not None]
    groups = _group(points)
    by_setting = {s: sorted((g for (gs, _, n), g in groups.items() if gs == s and n == n_all), key=lambda g: g["lr"])
                  for s in sets}
    by_setting = {s: v for s, v in by_setting.items() if v}
    fronts = {s: pareto_front([{"lr": g["lr"], "loss": g["avg_domain_loss"]["mean"],
                                "forgetting": g["forgetting"]["mean"]} for g in v if g["forgetting"] is not None])
              for s, v in by_setting.items()}
    best = {s: best_lr_group(v) for s, v in by_setting.items()}
    fft_best = best.get("fft")
    base = next((r["eval"]["before"] for r in ok if r.get("eval")), None)
    base_row = None
    if base is not None:
        base_row = {"loss": {d: base[d]["loss"] for d in domains},
                    "avg_domain_loss": average_domain_loss({d: base[d]["loss"] for d in domains}, domains),
                    "holdout_loss": base.get("holdout", {}).get("loss"), "task": task_scores(base, heads)}
        base_row["task_avg"] = (sum(base_row["task"].values()) / len(base_row["task"])) if base_row["task"] else None
    comparisons = {}
    for s in ["desmoe", *[n for n, v in sets.items() if v["variant"]]]:
        for o in BASELINES:
            if s in fronts and o in fronts:
                comparisons[f"{s} vs {o}"] = dict(compare_fronts(fronts[s], fronts[o]), setting=s, other=o)
    return {"headline": heads, "points": points, "groups": list(groups.values()), "by_setting": by_setting,
            "fronts": fronts, "front_comparison": comparisons,
            "best_lr": {s: g["lr"] for s, g in best.items()},
            "fft_best": ({"lr": fft_best["lr"], "avg_domain_loss": fft_best["avg_domain_loss"]["mean"],
                          "forgetting": fft_best["forgetting"]["mean"]} if fft_best else None),
            "base": base_row, "better_esft": better_esft(by_setting), "figure2_choice": figure2_choice(by_setting)}


def analyse(plan: dict, runs: dict[str, dict]) -> dict:
    """Every table and figure's numbers from the runs (name -> record; unfinished ones have status
    "missing", failed ones "failed")."""
    sw = analyse_sweep(plan, runs)
    ok = {n: r for n, r in runs.items() if r["status"] == "ok"}
    tol = TARGETS["domain_metric_tolerance"]
    fft_best = sw["fft_best"]
    target_loss = fft_best["avg_domain_loss"] * (1 + tol) if fft_best else None

    # Figure 2: F vs number of domains, each role at its chosen LR
    choice = sw["figure2_choice"]
    counts = plan["domain_counts"]
    fig2 = {"counts": counts, "choice": choice, "forgetting": {}, "runs": {}}
    for role, c in choice.items():
        row = []
        for n in counts:
            names = [run_name(c["setting"], c["lr"], seed, n) for seed in plan["seeds"]]
            pts = [run_point(ok[x], sw["headline"]) for x in names if x in ok]
            row.append(stats([p["forgetting"] for p in pts if p is not None]))
            fig2["runs"].setdefault(role, []).append([x for x in names if x in ok])
        fig2["forgetting"][role] = row
    if "fft" in fig2["forgetting"] and "desmoe" in fig2["forgetting"]:
        fig2["reduction"] = [1 - d["mean"] / f["mean"] if d and f and f["mean"] > 0 else None
                             for d, f in zip(fig2["forgetting"]["desmoe"], fig2["forgetting"]["fft"])]

    # time to target: fft's best (over LRs, seed mean) x 1.02, each setting at its best LR (and every LR)
    ttt = {"target_avg_loss": target_loss, "fft_best": fft_best, "settings": {}, "per_lr": {}}
    if target_loss is not None:
        for s, groups in sw["by_setting"].items():
            for g in groups:
                t = group_time_to_target([ok[n] for n in g["runs"]], target_loss)
                ttt["per_lr"].setdefault(s, {})[lr_tag(g["lr"])] = {k: v for k, v in t.items() if k != "curves"}
                if g["lr"] == sw["best_lr"][s]:
                    ttt["settings"][s] = dict(t, lr=g["lr"], mean_curve=mean_curve(t["curves"]))
        f = ttt["settings"].get("fft")
        for v in ttt["settings"].values():
            both = f is not None and v["reached"] and f["reached"]
            v["time_ratio_to_fft"] = v["train_s"] / f["train_s"] if both and f["train_s"] else None
            v["step_ratio_to_fft"] = v["step"] / f["step"] if both and f["step"] else None

    # per-phase median step time, desmoe vs fft, over every sweep run of each on all domains
    def sweep_of(setting):
        return [r for r in ok.values() if r["setting"] == setting and r["stage"] == "sweep"]

    fr, dr = sweep_of("fft"), sweep_of("desmoe")
    over = overhead_stats([r["metrics"] for r in fr], [r["metrics"] for r in dr], plan["skip_steps"]) \
        if fr and dr else {"steps": 0}
    mem = {m: [max(r["peak_rss_mib"]) for r in rs if r.get("peak_rss_mib")] for m, rs in (("fft", fr), ("desmoe", dr))}
    overhead = {"step_time": over, "runs": {"fft": len(fr), "desmoe": len(dr)}, "peak_rss_mib": mem,
                "peak_rss_ratio": (max(mem["desmoe"]) / max(mem["fft"])) if mem["fft"] and mem["desmoe"] else None,
                "steps_time_s": {m: [max(training_seconds(r["metrics"]).values()) for r in rs if r["metrics"]]
                                 for m, rs in (("fft", fr), ("desmoe", dr))}}

    # general-holdout loss during training, each setting at its best LR (first seed)
    during = {}
    for s, lr in sw["best_lr"].items():
        r = next((ok[n] for n in sorted(ok) if ok[n]["setting"] == s and ok[n]["lr"] == lr and
                  ok[n]["stage"] == "sweep"), None)
        if r is not None:
            during[s] = holdout_curve(r["eval"], r["metrics"])

    rows_per_step = plan["micro_batch_size"] * next((r["nproc"] for r in ok.values()), 1)
    epochs = {n: epochs_per_domain(r["metrics"], r["data_summary"], rows_per_step) for n, r in ok.items()}
    return {"status": run_status(runs), "sweep": sw, "figure2": fig2, "time_to_target": ttt,
            "overhead": overhead, "holdout_during_training": during, "epochs": epochs,
            "targets": targets(sw, ttt), "paper_rows": paper_rows(sw)}


def targets(sw: dict, ttt: dict) -> list[dict]:
    """The three targets, measured (never tuned): a, b (one row per baseline), c."""
    tol, fr, tr = TARGETS["domain_metric_tolerance"], TARGETS["forgetting_ratio"], TARGETS["time_ratio"]
    out = []
    fft = sw["fft_best"]
    des = sw["by_setting"].get("desmoe") or []
    # (a) some desmoe LR: avg domain loss within 2% of fft's best while F <= 0.2 x that fft point's F
    a = {"name": f"(a) some desmoe LR: avg domain loss <= {1 + tol:g} x fft's best and F <= {fr:g} x that fft's F "
                 "(measured: the smallest F ratio among desmoe LRs within the loss tolerance)",
         "measured": None, "target": fr, "met": None, "detail": "no fft or desmoe runs finished"}
    if fft and des:
        cands = [(g, g["avg_domain_loss"]["mean"] / fft["avg_domain_loss"],
                  g["forgetting"]["mean"] / fft["forgetting"] if fft["forgetting"] > 0 else None) for g in des]
        desc = "; ".join(f"lr {lr_tag(g['lr'])}: loss ratio {lr_:.3f}, F ratio " +
                         ("—" if f_ is None else f"{f_:.3f}") for g, lr_, f_ in cands)
        within = [c for c in cands if c[1] <= 1 + tol and c[2] is not None]
        if fft["forgetting"] <= 0:
            a.update(detail=f"fft's best has F {fft['forgetting']:+.4f} <= 0: the ratio is undefined; " + desc)
        elif within:
            g, lr_, f_ = min(within, key=lambda c: c[2])
            a.update(measured=f_, met=f_ <= fr, detail=f"best: desmoe lr {lr_tag(g['lr'])}. All: " + desc)
        else:
            a.update(met=False, detail="no desmoe LR within the loss tolerance. " + desc)
    out.append(a)
    # (b) desmoe's front on or beyond each baseline's, at every forgetting level both fronts cover
    for o in BASELINES:
        c = sw["front_comparison"].get(f"desmoe vs {o}")
        out.append({"name": f"(b) desmoe's front on or beyond {o}'s wherever both are defined "
                            "(measured: max over the shared F range of desmoe's front loss - the other's)",
                    "measured": c and c["max_diff"], "target": 0.0, "met": c and c["met"],
                    "detail": "fronts missing" if c is None else (
                        ("no shared forgetting range" if c["overlap"] is None else
                         f"shared F range [{c['overlap'][0]:+.4f}, {c['overlap'][1]:+.4f}], {len(c['checks'])} check "
                         "points") + f"; desmoe's front dominates {c['dominated']} of {o}'s {c['other_points']} front "
                        "point(s)")})
    # (c) desmoe (best LR) reaches fft's best x 1.02 in <= 0.5 x fft's training time (fft at its best LR)
    d = ttt["settings"].get("desmoe")
    out.append({"name": f"(c) desmoe reaches {1 + tol:g} x fft's best avg domain loss in <= {tr:g} x fft's training "
                        "time (both at their best LR; measured: time ratio)",
                "measured": d and d["time_ratio_to_fft"], "target": tr,
                "met": None if d is None or "fft" not in ttt["settings"] else (
                    d["time_ratio_to_fft"] is not None and d["time_ratio_to_fft"] <= tr),
                "detail": "no runs" if d is None else
                f"desmoe reached it in {d['reached_seeds']}/{d['seeds']} seeds"})
    return out


def paper_rows(sw: dict) -> list[dict]:
    """Each mode at its best LR beside the paper's numbers."""
    rows = []
    if sw["base"]:
        rows.append({"mode": "base", "lr": None, "avg_domain_loss": sw["base"]["avg_domain_loss"], "forgetting": 0.0,
                     "task_avg": sw["base"]["task_avg"], "paper_downstream": None,
                     "paper_general": PAPER["general_avg"].get("base")})
    for s, groups in sw["by_setting"].items():
        g = best_lr_group(groups)
        rows.append({"mode": s, "lr": g["lr"], "avg_domain_loss": g["avg_domain_loss"]["mean"],
                     "forgetting": g["forgetting"]["mean"] if g["forgetting"] else None,
                     "task_avg": g["task_avg"]["mean"] if g["task_avg"] else None,
                     "paper_downstream": PAPER["downstream_avg"].get(s), "paper_general": PAPER["general_avg"].get(s)})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _f(v, fmt="{:.4f}") -> str:
    return "—" if v is None else fmt.format(v)


def _ms(s: dict | None, fmt="{:.4f}", signed=False) -> str:
    """mean ± std (min–max) of a stats dict."""
    if not s:
        return "—"
    f = ("{:+" + fmt[2:]) if signed else fmt
    if s["n"] == 1:
        return f.format(s["mean"])
    return f"{f.format(s['mean'])} ± {fmt.format(s['std'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def _yes(v) -> str:
    return "yes" if v else ("—" if v is None else "no")


def over_seeds(plan: dict) -> str:
    """What a band or error bar over seeds means, for titles and captions."""
    n = len(plan["seeds"])
    return f"min-max over {n} seed{'s' if n != 1 else ''}"


def _bar(st: dict | None) -> tuple | None:
    """(mean, min, max) of a stats dict: a bar with its min-max error bar (None: no bar)."""
    return (st["mean"], st["min"], st["max"]) if st else None


def domain_loss_bars(sw: dict, domains: list[str]) -> dict[str, list]:
    """domain_losses.png's bars: label -> per domain, then avg and holdout, (seed mean, min, max) over seeds
    of each mode at its best LR; the base model's (one evaluation) as plain numbers."""
    series = {}
    if sw["base"]:
        series["base"] = [sw["base"]["loss"][d] for d in domains] + [sw["base"]["avg_domain_loss"],
                                                                      sw["base"]["holdout_loss"]]
    for s, groups in sw["by_setting"].items():
        g = best_lr_group(groups)
        series[f"{s} @ {lr_tag(g['lr'])}"] = [_bar(g["loss_stats"][d]) for d in domains] + [
            _bar(g["avg_domain_loss"]), _bar(g["holdout_loss"])]
    return series


def step_time_bars(step_time: dict, phases: list[str]) -> dict[str, list]:
    """step_time.png's bars, ms: fft and desmoe -> per phase (pooled median, min, max of the runs' own medians)."""
    def bar(v, key):
        runs = v.get(f"{key}_runs_s")
        return (v[f"{key}_s"] * 1000, min(runs) * 1000, max(runs) * 1000) if runs else v[f"{key}_s"] * 1000

    return {m: [bar(step_time[p], key) for p in phases] for m, key in (("fft", "fft"), ("desmoe", "other"))}


def time_to_target_lines(ttt: dict) -> dict[str, list[tuple]]:
    """time_to_target.png's lines: label -> (mean train_s, mean avg loss, min, max over seeds) per evaluation."""
    return {f"{s} @ lr {lr_tag(v['lr'])}": [tuple(p[1:5]) for p in v["mean_curve"]]
            for s, v in ttt["settings"].items()}


def write_plots(res: dict, out: str) -> list[str]:
    from benchmarks._plots import bar_chart, line_chart, pareto_chart

    files = []
    sw = res["sweep"]
    spread = over_seeds(res["plan"])
    if sw["by_setting"]:
        path = os.path.join(out, "pareto.png")
        series = {}
        for s, groups in sw["by_setting"].items():
            pts = [g for g in groups if g["forgetting"]]
            series[s] = {"points": [(g["forgetting"]["mean"], g["avg_domain_loss"]["mean"],
                                     (g["forgetting"]["min"], g["forgetting"]["max"]),
                                     (g["avg_domain_loss"]["min"], g["avg_domain_loss"]["max"]), lr_tag(g["lr"]))
                                    for g in pts],
                         "front": [(p["forgetting"], p["loss"]) for p in sw["fronts"].get(s, [])]}
        hl = {}
        if sw["fft_best"]:
            hl[f"{1 + TARGETS['domain_metric_tolerance']:g} x fft's best"] = \
                sw["fft_best"]["avg_domain_loss"] * (1 + TARGETS["domain_metric_tolerance"])
        extra = {"base model": (0.0, sw["base"]["avg_domain_loss"])} if sw["base"] else {}
        pareto_chart(path, series, title="Average held-out domain loss vs forgetting at the best evaluation "
                     f"(seed mean; bars: {spread}; lines: Pareto fronts)",
                     xlabel="forgetting F = general-holdout loss - base model's (nats/token)",
                     ylabel="average domain loss (nats/token)", hlines=hl, extra_points=extra)
        files.append(path)
        path = os.path.join(out, "domain_losses.png")
        bar_chart(path, res["plan"]["domains"] + ["avg", "holdout"], domain_loss_bars(sw, res["plan"]["domains"]),
                  title="Held-out loss per domain at the best evaluation, each mode at its best LR (seed mean; "
                  f"bars: {spread})", ylabel="loss (nats/token)",
                  xlabel="held-out set (avg: mean over the domains; holdout: general text)", zero_based=False)
        files.append(path)
    f = res["figure2"]
    if f["forgetting"]:
        path = os.path.join(out, "forgetting_vs_domains.png")
        series = {}
        for role, row in f["forgetting"].items():
            c = f["choice"][role]
            series[f"{c['setting']} @ lr {lr_tag(c['lr'])}"] = [
                (n, s["mean"], s["min"], s["max"]) for n, s in zip(f["counts"], row) if s]
        line_chart(path, series, title=f"Forgetting vs number of domains (best evaluation; seed mean, bars: "
                   f"{spread})",
                   xlabel="domains (count)", ylabel="forgetting F (nats/token)", hlines={"no forgetting": 0.0},
                   integer_x=True)
        files.append(path)
    c = res["time_to_target"]
    if c["settings"]:
        path = os.path.join(out, "time_to_target.png")
        line_chart(path, time_to_target_lines(c),
                   title="Average held-out domain loss at each evaluation vs training time (seed mean; band: "
                   f"{spread})", xlabel="training time (s, summed step times; seed mean)",
                   ylabel="average domain loss (nats/token)", band=True,
                   hlines={f"target: {1 + TARGETS['domain_metric_tolerance']:g} x fft's best": c["target_avg_loss"]})
        files.append(path)
    o = res["overhead"]["step_time"]
    phases = [p for p in o if isinstance(o[p], dict)]
    if phases:
        path = os.path.join(out, "step_time.png")
        runs = res["overhead"]["runs"]
        bar_chart(path, phases, step_time_bars(o, phases),
                  title=f"Median step time on the same steps, per desmoe phase (bars: min-max of each run's median "
                  f"over {runs['fft']} fft / {runs['desmoe']} desmoe runs: all LRs and seeds)", ylabel="step time (ms)",
                  xlabel="desmoe phase (all: every step compared)")
        files.append(path)
    return files


def write_report(res: dict, path: str) -> None:
    base, plan, sw = res["base_model"], res["plan"], res["sweep"]
    doms = plan["domains"]
    n_all = len(doms)
    tol = TARGETS["domain_metric_tolerance"]
    L = []
    st = res["status"]
    L.append(f"# DES-MoE experiments at small scale (plan `{res['plan_name']}`)\n")
    L.append(f"Written by `{res['command']}` on {res['machine']['cpus']} CPU core(s) ({res['machine']['platform']}), "
             f"torch {res['machine']['torch']}, {res['nproc']} ranks, expert parallelism {res['nproc']}. "
             f"Runs planned: {res['planned_runs']}; " + ", ".join(f"{v} {k}" for k, v in sorted(st['counts'].items()))
             + (f" ({len(res['reused_runs'])} reused from an earlier invocation)" if res["reused_runs"] else "") +
             f". This invocation: {res['timing']['total_s'] / 60:.1f} min"
             + (" (analysis only, nothing run)" if res["analyse_only"] else
                f", of which runs {res['timing']['runs_s'] / 60:.1f} min (estimated beforehand "
                f"{res['timing']['estimate_s'] / 60:.1f} min)") +
             ". Times depend on the machine's load; the runs ran one after another.\n")
    if st["counts"].get("missing"):
        L.append(f"**Incomplete**: {st['counts']['missing']} planned run(s) have not finished; every number below is "
                 "over the finished ones (rerun with --reuse to continue, --analyse-only to re-analyse).\n")
    if st["failed"]:
        L.append("**Failed runs** (left out of every number):\n")
        L.append("| run | log | error (end) |\n|---|---|---|")
        for r in st["failed"]:
            err = " ".join(r["error"].split())[-300:].replace("|", "\\|")
            L.append(f"| {r['name']} | `{r['log']}` | {err} |")
        L.append("")
    steps = steps_of(plan, n_all)
    L.append("**Setup.** The paper fine-tunes DeepSeek-V2-Lite (16 B parameters, 64 routed + 2 shared experts) for up "
             "to 500 steps of 32 x 4096 tokens, evaluates every 100 steps and keeps the best checkpoint. Here the base "
             f"model has {base['parameters'] / 1e6:.1f} M parameters ({base['experts']} routed experts, "
             f"top-{base['top_k']}); each run on {n_all} domains trains {steps} steps "
             f"({plan['steps_per_domain']} per domain) of {plan['micro_batch_size']} x {res['nproc']} sequences of "
             f"{base['seq_len']} tokens at a {plan['lr_schedule']} LR after {plan['warmup_steps']} warm-up steps, "
             f"and is evaluated every {eval_every(plan, steps)} steps and after the last "
             f"({plan['evals_per_run']} evaluations after step 0). Held-out sets: {plan['eval_sequences']} sequences "
             f"per domain (the same for every run and seed), {res['holdout_sequences']} general-holdout sequences"
             + (f" (the plan asks {plan['holdout_sequences']}; the base model holds out only "
                f"{res['holdout_sequences']})" if res["holdout_sequences"] < plan["holdout_sequences"] else "") +
             f" (`data.holdout: {json.dumps(res['holdout'])}`); task metrics by greedy generation on the first "
             f"{plan['eval_max_pairs']} prompts per domain (eval.max_pairs). LRs "
             + ", ".join(f"`{s}`: " + ", ".join(lr_tag(x) for x in v["lrs"]) for s, v in settings(plan).items()) +
             f"; seeds {plan['seeds']}.\n")
    L.append("**Which numbers.** Each run's point is its evaluation (periodic or final) with the lowest average "
             "held-out domain loss, as the paper keeps its best checkpoint: the domain losses, task metrics and "
             "general-holdout loss of that evaluation, and forgetting F = that holdout loss - the base model's (the "
             "run's evaluation before training). No checkpoint weights are saved (checkpoint.save_final false): the "
             "numbers of that evaluation are what is reported. Losses are nats/token, lower is better; the paper's "
             "numbers are benchmark accuracies (higher is better) and stand beside ours for orientation only.\n")

    L.append("## Base model\n")
    L.append(f"`{base['dir']}` (benchmarks/pretrain_base.py, recipe `{base['recipe']}`): pretrained "
             f"{base['steps']} steps on {base['train_rows']} rows ({base['epochs']:.1f} epochs) in "
             f"{base['pretrain_time_s']:.0f} s; {100 * base['domain_fraction']:.0f}% of each domain (never fine-tuned "
             f"on). General holdout: {base['holdout_rows']} rows of {base['seq_len']} tokens, never trained on.\n")
    L.append("| | general-holdout loss |\n|---|---|")
    L.append(f"| unigram baseline (token frequencies of the pretraining rows) | {base['unigram_holdout_loss']:.4f} |")
    L.append(f"| base model | {base['holdout_loss']:.4f} |")
    if sw["base"]:
        L.append(f"| base model on the {res['holdout_sequences']} rows the runs evaluate (a run's evaluation before "
                 f"training) | {_f(sw['base']['holdout_loss'])} |")
    L.append("")
    L.append("Pretraining curve (train: mean over the interval; val: rows never trained on):\n")
    L.append("| step | epoch | train loss | val loss |\n|---|---|---|---|")
    for c in res["base_model_recipe"].get("curve", []):
        L.append(f"| {c['step']} | {c['epoch']} | {c['train_loss']:.4f} | {c['val_loss']:.4f} |")
    L.append("")

    L.append(f"## Sweep: every mode at every LR, {len(plan['seeds'])} seed(s), {n_all} domains\n")
    L.append("Seed mean ± sample std (min–max over seeds) at each run's best evaluation; \"final\" is the last "
             "evaluation's (seed mean), for comparison.\n")
    L.append("| mode | lr | seeds | avg domain loss | F | avg task metric, % | best at step | final avg loss | "
             "final F |")
    L.append("|---" * 9 + "|")
    if sw["base"]:
        L.append(f"| base | — | — | {sw['base']['avg_domain_loss']:.4f} | 0 | {_f(sw['base']['task_avg'], '{:.2f}')} "
                 "| 0 | — | — |")
    for s, groups in sw["by_setting"].items():
        for g in groups:
            L.append(f"| {s} | {lr_tag(g['lr'])} | {len(g['seeds'])} | {_ms(g['avg_domain_loss'])} | "
                     f"{_ms(g['forgetting'], signed=True)} | {_ms(g['task_avg'], '{:.2f}')} | "
                     f"{', '.join(str(x) for x in g['best_step'])} | {_f(g['final_avg_domain_loss']['mean'])} | "
                     f"{_f(g['final_forgetting'] and g['final_forgetting']['mean'], '{:+.4f}')} |")
    L.append("")
    L.append("Held-out loss per domain at the best evaluation, seed mean ± sample std (min–max over seeds):\n")
    L.append("| mode | lr | " + " | ".join(doms) + " | holdout |")
    L.append("|---" * (len(doms) + 3) + "|")
    if sw["base"]:
        L.append("| base | — | " + " | ".join(f"{sw['base']['loss'][d]:.4f}" for d in doms) +
                 f" | {_f(sw['base']['holdout_loss'])} |")
    for s, groups in sw["by_setting"].items():
        for g in groups:
            L.append(f"| {s} | {lr_tag(g['lr'])} | " + " | ".join(_ms(g["loss_stats"][d]) for d in doms) +
                     f" | {_ms(g['holdout_loss'])} |")
    L.append("\n![domain losses](domain_losses.png)\n")
    L.append(f"*Each mode at its best LR: bars are seed means, black error bars the {over_seeds(plan)}; the base "
             "model is one evaluation (no error bar).*\n")
    heads = sw["headline"]
    if heads:
        L.append("Headline task metric per domain at the best evaluation (seed mean, percent: exact match and token "
                 f"accuracy x 100, chrF 0-100; generation on {plan['eval_max_pairs']} prompts per domain):\n")
        L.append("| mode | lr | " + " | ".join(f"{d} ({heads[d]})" for d in doms if d in heads) + " | average |")
        L.append("|---" * (len(heads) + 3) + "|")
        if sw["base"] and sw["base"]["task"]:
            L.append("| base | — | " + " | ".join(f"{sw['base']['task'][d]:.1f}" for d in doms if d in heads) +
                     f" | {sw['base']['task_avg']:.2f} |")
        for s, groups in sw["by_setting"].items():
            for g in groups:
                if g["task"]:
                    L.append(f"| {s} | {lr_tag(g['lr'])} | " + " | ".join(f"{g['task'][d]:.1f}" for d in doms
                                                                            if d in heads) +
                             f" | {g['task_avg']['mean']:.2f} |")
        L.append("")

    L.append("## Pareto fronts: average domain loss vs forgetting\n")
    L.append("Per mode, the LRs whose (seed-mean F, seed-mean average domain loss) no other LR of the mode beats in "
             "both, by increasing F.\n")
    L.append("| mode | front (lr: F, avg domain loss) |\n|---|---|")
    for s, fr in sw["fronts"].items():
        L.append(f"| {s} | " + "; ".join(f"{lr_tag(p['lr'])}: {p['forgetting']:+.4f}, {p['loss']:.4f}" for p in fr)
                 + " |")
    L.append("\n![pareto](pareto.png)\n")
    L.append("Front comparison (target b): both fronts are drawn as straight lines between their points; on the "
             "overlap of their F ranges the first front's loss minus the second's is taken at every front point "
             "inside the overlap and at its ends (the difference is linear in between, so its maximum is at one of "
             "them). Max difference <= 0: the first front is on or beyond the second at every shared forgetting "
             "level. Without an overlap nothing is compared.\n")
    L.append("\"Dominated\" needs no shared range: how many of the second front's points some point of the first is "
             "no worse than in both F and loss.\n")
    L.append("| fronts | shared F range | check points | max loss difference | on or beyond | dominated |")
    L.append("|---|---|---|---|---|---|")
    for k, c in sw["front_comparison"].items():
        ov = "none" if c["overlap"] is None else f"[{c['overlap'][0]:+.4f}, {c['overlap'][1]:+.4f}]"
        L.append(f"| {k} | {ov} | {len(c['checks'])} | {_f(c['max_diff'], '{:+.4f}')} | {_yes(c['met'])} | "
                 f"{c['dominated']}/{c['other_points']} |")
    L.append("")

    f = res["figure2"]
    L.append("## Figure 2: forgetting as the number of domains grows\n")
    if not f["choice"]:
        L.append("No fft run finished: no LR to choose.\n")
    else:
        target = sw["fft_best"]["avg_domain_loss"]
        L.append(f"Each curve's LR: the one whose average domain loss on {n_all} domains (seed mean) is closest to "
                 f"fft's best, {target:.4f} (fft at lr {lr_tag(sw['fft_best']['lr'])}); the ESFT mode is the one with "
                 f"the lower best average domain loss ({sw['better_esft']}). F at each run's best evaluation, seed "
                 f"mean ± std (min–max); the first n domains of {', '.join(doms)}, {plan['steps_per_domain']} steps "
                 f"per domain; the {n_all}-domain point is the sweep's. Reduction = 1 - F_desmoe / F_fft. Paper: from "
                 f"2 to 6 domains FFT loses {PAPER['general_drop_2_to_6_domains']['fft']} general points, DES-MoE "
                 f"{PAPER['general_drop_2_to_6_domains']['desmoe']}.\n")
        roles = list(f["forgetting"])
        L.append("| domains | " + " | ".join(f"F {f['choice'][r]['setting']} @ {lr_tag(f['choice'][r]['lr'])}"
                                            for r in roles) + " | reduction |")
        L.append("|---" * (len(roles) + 2) + "|")
        for i, n in enumerate(f["counts"]):
            red = f.get("reduction", [None] * len(f["counts"]))[i]
            L.append(f"| {n} | " + " | ".join(_ms(f["forgetting"][r][i], signed=True) for r in roles) +
                     f" | {_f(red, '{:.3f}')} |")
        L.append("\n![forgetting](forgetting_vs_domains.png)\n")

    c = res["time_to_target"]
    L.append("## Time to target (Figure 3)\n")
    if c["target_avg_loss"] is None:
        L.append("No fft run finished: no target.\n")
    else:
        L.append(f"Target: {1 + tol:g} x fft's best average domain loss (over LRs, seed mean) = "
                 f"{c['target_avg_loss']:.4f}. Per mode at its best LR: the first evaluation (periodic, every "
                 f"{eval_every(plan, steps)} steps, or final) at or below it, and the training seconds to that step "
                 "(the sum of step times from metrics.jsonl: start-up, evaluation and ESFT's profiling excluded); "
                 "means over the seeds that reached it. The evaluation cadence bounds the resolution. Paper (whole "
                 f"runs): FFT {PAPER['wall_clock_min']['fft']} min, ESFT {PAPER['wall_clock_min']['esft']}, DES-MoE "
                 f"{PAPER['wall_clock_min']['desmoe']} (-68.6%).\n")
        L.append("| mode | lr | reached (seeds) | step | training s | time / fft | steps / fft |")
        L.append("|---" * 7 + "|")
        for s, v in c["settings"].items():
            L.append(f"| {s} | {lr_tag(v['lr'])} | {v['reached_seeds']}/{v['seeds']} | {_f(v['step'], '{:.0f}')} | "
                     f"{_f(v['train_s'], '{:.1f}')} | {_f(v['time_ratio_to_fft'], '{:.3f}')} | "
                     f"{_f(v['step_ratio_to_fft'], '{:.3f}')} |")
        L.append("\n![time to target](time_to_target.png)\n")
        L.append("*Each line: seed means (x: training seconds, y: average domain loss) at step 0 and at every "
                 f"evaluation; the shaded band: the average domain loss's {over_seeds(plan)} at each "
                 "evaluation.*\n")
        during = res["holdout_during_training"]
        if during:
            L.append("General-holdout loss at every evaluation, each mode at its best LR (first seed; step 0 is the "
                     "base model):\n")
            steps_l = max((v for v in during.values()), key=len)
            L.append("| mode | " + " | ".join(f"step {s}" for s, _ in steps_l) + " |")
            L.append("|---" * (len(steps_l) + 1) + "|")
            for m, pts in during.items():
                L.append(f"| {m} | " + " | ".join(f"{v:.4f}" for _, v in pts) + " |")
            L.append("")

    o = res["overhead"]
    L.append("## Step time: desmoe vs fft\n")
    L.append(f"Median step time over the same steps (the first {plan['skip_steps']} left out) of every sweep run "
             f"on {n_all} domains ({o['runs']['fft']} fft, {o['runs']['desmoe']} desmoe runs: all LRs and seeds), "
             "per desmoe phase; peak resident memory (VmHWM of the larger rank) per run.\n")
    L.append("| steps | fft ms/step | desmoe ms/step | desmoe / fft |\n|---|---|---|---|")
    for p, v in o["step_time"].items():
        if isinstance(v, dict):
            L.append(f"| {p} ({v['steps'][0]}-{v['steps'][1]}) | {v['fft_s'] * 1000:.1f} | {v['other_s'] * 1000:.1f} "
                     f"| {v['ratio']:.3f} |")
    mem = o["peak_rss_mib"]
    L.append(f"\nPeak RSS, MiB: fft {', '.join(f'{v:.0f}' for v in mem['fft']) or '—'}; desmoe "
             f"{', '.join(f'{v:.0f}' for v in mem['desmoe']) or '—'}; ratio of the maxima "
             f"{_f(o['peak_rss_ratio'], '{:.3f}')}.\n")
    L.append("![step time](step_time.png)\n")
    L.append("*Bars: the median over every step of every run (as in the table); error bars: min–max of each run's "
             "own median over those steps (all LRs and seeds).*\n")

    L.append("## Beside the paper\n")
    L.append("Each mode at its best LR (seed mean, best evaluation). Paper columns: downstream and general averages "
             "(accuracy, %; \"base\" is the paper's vanilla model).\n")
    L.append("| mode | lr | avg domain loss | F | avg task metric, % | paper downstream avg | paper general avg |")
    L.append("|---" * 7 + "|")
    for r in res["paper_rows"]:
        L.append(f"| {r['mode']} | {'—' if r['lr'] is None else lr_tag(r['lr'])} | {r['avg_domain_loss']:.4f} | "
                 f"{_f(r['forgetting'], '{:+.4f}')} | {_f(r['task_avg'], '{:.2f}')} | "
                 f"{_f(r['paper_downstream'], '{:.1f}')} | {_f(r['paper_general'], '{:.1f}')} |")
    L.append("")

    L.append("## Targets, as measured\n")
    L.append("| target | measured | threshold | met | detail |\n|---|---|---|---|---|")
    for tg in res["targets"]:
        L.append(f"| {tg['name']} | {_f(tg['measured'], '{:.3f}')} | {tg['target']} | {_yes(tg['met'])} | "
                 f"{tg['detail']} |")
    over = {n: {d: e for d, e in ep.items() if e > 1.0} for n, ep in res["epochs"].items()}
    over = {n: v for n, v in over.items() if v}
    L.append("")
    L.append("Epochs over each domain's training rows: " + (
        "every run read each row at most once." if not over else
        "more than one in " + "; ".join(f"{n}: " + ", ".join(f"{d} {e:.2f}" for d, e in v.items())
                                        for n, v in over.items()) + ".") + "\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def base_summary(model_dir: str, trained_now: bool, pretrain_s: float) -> dict:
    info = pretrain_base.load_recipe_info(model_dir)
    r = info["recipe"]
    m = r["model"]
    return {"dir": model_dir, "info": info, "recipe": r["name"], "trained_now": trained_now,
            "pretrain_time_s": info["total_time_s"], "ensure_time_s": pretrain_s,
            "parameters": info["parameters"], "experts": m.get("num_experts", m.get("n_routed_experts")),
            "top_k": m["num_experts_per_tok"], "seq_len": r["data"]["seq_len"], "steps": r["train"]["steps"],
            "train_rows": info["data"]["train_rows"], "epochs": info["data"]["epochs"],
            "domain_fraction": r["data"]["domain_fraction"], "holdout_rows": r["data"]["holdout_sequences"],
            "holdout_loss": info["final"]["holdout_loss"],
            "unigram_holdout_loss": info["final"]["unigram_holdout_loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=sorted(PLANS), default=None, help="which plan (default full)")
    p.add_argument("--quick", action="store_true", help="= --plan quick: CI's smoke test (small model, 3 domains)")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce_<plan>, runs/reproduce for full)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (expert parallelism = nproc)")
    p.add_argument("--cache", default=None, help="base-model cache folder (default $DESMOE_CACHE/base_models)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs whose YAML is unchanged; run the rest")
    p.add_argument("--analyse-only", action="store_true",
                   help="run nothing: analyse the finished planned runs in OUT/runs and write the results")
    a = p.parse_args(argv)
    if a.quick and a.plan not in (None, "quick"):
        p.error("--quick is --plan quick")
    plan_name = "quick" if a.quick else (a.plan or "full")
    plan = PLANS[plan_name]
    t0 = time.perf_counter()
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", "reproduce" if plan_name == "full"
                                                else f"reproduce_{plan_name}"))
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)

    def log(msg):
        print(f"[reproduce {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    if plan["recipe"] not in pretrain_base.RECIPES:
        p.error(f"plan {plan_name}: recipe {plan['recipe']!r} is not in benchmarks/pretrain_base.RECIPES")
    recipe = pretrain_base.RECIPES[plan["recipe"]]
    if a.analyse_only:
        model_dir, trained_now = pretrain_base.base_model_dir(recipe, a.cache), False
        if not os.path.isfile(os.path.join(model_dir, "recipe.json")):
            p.error(f"--analyse-only: the base model {model_dir} is not in the cache")
    else:
        model_dir, trained_now = pretrain_base.ensure_base_model(recipe, a.cache, log=log)
    base = base_summary(model_dir, trained_now, time.perf_counter() - t0)
    pretrain_s = time.perf_counter() - t0

    sweep = sweep_runs(plan)
    fig2_shape = [{"domains": plan["domains"][:n]} for n in plan["domain_counts"] if n != len(plan["domains"])
                  for _ in plan["seeds"] for _ in FIGURE2_ROLES]  # Figure 2's runs, LRs not chosen yet
    n_fig2 = len(fig2_shape)
    est = estimate_s(plan, sweep) + estimate_s(plan, fig2_shape)
    log(f"plan {plan_name}: {len(sweep)} sweep runs + {n_fig2} Figure 2 runs = {len(sweep) + n_fig2} runs; "
        f"estimated {est / 60:.0f} min on the plan's cost model" + (" (analysis only: nothing runs)"
                                                                    if a.analyse_only else ""))
    runner = Runner(plan, base, out, a.nproc, reuse=a.reuse, analyse_only=a.analyse_only, log=log)
    t_runs = time.perf_counter()
    total = len(sweep) + n_fig2
    runner.do(sweep, total, est)
    choice = analyse_sweep(plan, runner.runs)["figure2_choice"]
    fig2 = figure2_runs(plan, choice)
    if fig2 and not a.analyse_only:
        log("Figure 2 LRs: " + ", ".join(f"{r} {c['setting']} @ {lr_tag(c['lr'])}" for r, c in choice.items()))
    runner.do(fig2, total, est)
    runs_s = time.perf_counter() - t_runs

    import torch

    res = {
        "plan_name": plan_name,
        "quick": plan_name == "quick",
        "analyse_only": a.analyse_only,
        "command": "python -m benchmarks.reproduce" + (" --quick" if a.quick else f" --plan {plan_name}") +
                   (f" --nproc {a.nproc}" if a.nproc != 2 else "") + (" --reuse" if a.reuse else "") +
                   (" --analyse-only" if a.analyse_only else ""),
        "nproc": a.nproc,
        "plan": plan,
        "planned_runs": len(sweep) + max(n_fig2, len(fig2)),
        "holdout_sequences": holdout_rows(plan, base["info"]),
        "holdout": holdout_mapping(base["info"]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg")
                    else None},
        "base_model": {k: v for k, v in base.items() if k != "info"},
        "base_model_recipe": base["info"],
        "paper": PAPER,
        "targets_spec": TARGETS,
        "runs": {n: {k: v for k, v in r.items() if k not in ("metrics", "data_summary", "eval", "summary")}
                 for n, r in runner.runs.items()},
        "reused_runs": runner.reused,
    }
    if len(fig2) < n_fig2:
        # Figure 2's runs not planned yet (no fft result to choose LRs from): count them as missing
        res["runs_not_planned"] = n_fig2 - len(fig2)
    res.update(analyse(plan, runner.runs))
    if res.get("runs_not_planned"):
        res["status"]["counts"]["missing"] = res["status"]["counts"].get("missing", 0) + res["runs_not_planned"]
    res["timing"] = {"pretrain_s": pretrain_s, "runs_s": runs_s, "estimate_s": est, "total_s": 0.0}
    res["plots"] = [os.path.basename(f) for f in write_plots(res, out)]
    res["timing"]["total_s"] = time.perf_counter() - t0
    write_report(res, os.path.join(out, "report.md"))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=2)
    log(f"wrote {out}/results.json, report.md and {len(res['plots'])} plots; "
        f"{', '.join(f'{v} {k}' for k, v in sorted(res['status']['counts'].items()))}; "
        f"total {res['timing']['total_s'] / 60:.1f} min")
    for r in res["status"]["failed"]:
        log(f"FAILED run {r['name']}: log {r['log']}")
    for tg in res["targets"]:
        log(f"target {tg['name'][:3]} measured {_f(tg['measured'], '{:.3f}')} (threshold {tg['target']}) -> "
            f"{'met' if tg['met'] else 'not met' if tg['met'] is not None else 'undetermined'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
