"""``desmoe compare RUN_DIR [RUN_DIR ...] [--out DIR]``: runs side by side, as tables and two figures.

    <out>/compare.md                     the tables (also printed)
    <out>/compare.json                   every number of the tables, per run
    <out>/domain_loss_vs_forgetting.png  average domain loss after training vs forgetting F, one point per run
    <out>/per_domain_loss.png            each domain's loss after training per run, before training marked

The default ``<out>`` is ``<parent of the first RUN_DIR>/compare``: beside the runs, e.g. runs/compare.
A folder holding only such an output (compare.json, no config.yaml) given as a RUN_DIR is skipped, so
that ``desmoe compare runs/*/`` works again after a first comparison.

Forgetting F = the run's loss on data.holdout (general text no domain trains on) after training minus
its holdout loss before training, i.e. the base model's (METHOD.md; benchmarks/reproduce.py uses the
same F at its best evaluation, this command at the final one). Lower is better, for F as for the
domain losses. The average domain loss is over the domains every run has.

A run without summary.json did not finish: its row is marked "unfinished at step N" and shows what it
has: the evaluation before training, the last periodic evaluation (eval.every) as "after", the steps
and seconds metrics.jsonl recorded. One run alone is allowed (a table of one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from desmoe import rundir
from desmoe.config import Config
from desmoe.constants import METRICS
from desmoe.evaluation import mean_domain
from desmoe.figures import canvas_figure, save_png

COMPARE_FILES = ("compare.md", "compare.json", "domain_loss_vs_forgetting.png", "per_domain_loss.png")
EXCLUDED_SETTINGS = {
    "run.name": "differs by construction",
    "run.output_dir": "differs by construction",
    "run.overwrite": "does not change the result",
    "tracking.*": "MLflow bookkeeping, does not change the result",
    "method.mode": "its own column",
    "model.*": "column base model, when runs differ in it",
}
"""Config keys never shown as settings that differ (key or section.*), and why."""
PERCENT = {"exact_match": 100.0, "token_accuracy": 100.0, "chrf": 1.0}
"""Task metrics shown in percent (chrF is 0..100 already)."""
LOSS_UNIT = "nats/token"


class CompareError(ValueError):
    """A RUN_DIR that cannot be compared (missing, not a run, unreadable), or runs with nothing in common."""


# ---- one run -----------------------------------------------------------------------------------


def _read_json(run_dir: str, name: str):
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"{path} cannot be read ({e}). Was the run killed while writing it? Move the file "
                           "away to compare the rest of the run, or leave the run out.") from e


def _read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl's rows; a line cut by a kill is left out."""
    path = os.path.join(run_dir, rundir.METRICS_FILE)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def flatten_settings(value, prefix: str = "") -> dict:
    """A config mapping as {"section.key[.subkey]": value}; lists and empty mappings stay whole."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten_settings(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _excluded(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in EXCLUDED_SETTINGS)


def base_model(cfg: Config) -> tuple[str, str]:
    """(identity, description) of a run's base model: model.path (resolved), or model.tiny's settings."""
    m = cfg.model
    if m.path:
        path = os.path.realpath(m.path)
        try:  # the model_type, for the description only: a model directory gone or broken since is no error
            hf = _read_json(path, "config.json") if os.path.isdir(path) else None
        except CompareError:
            hf = None
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        return f"path:{path}", f"model.path {path}" + (f" ({kind})" if kind else "")
    tiny = dict(m.tiny or {})
    kind = tiny.pop("model_type", "?")
    return (f"tiny:{json.dumps(m.tiny, sort_keys=True)}",
            f"model.tiny {kind} (" + ", ".join(f"{k}={v}" for k, v in tiny.items()) + ")")


def _numbers(results: dict | None) -> dict | None:
    """An evaluation's numbers per set (loss, ppl, task metrics), without its examples."""
    if not isinstance(results, dict):
        return None
    return {s: {k: v for k, v in ms.items() if k in ("loss", "ppl", *METRICS) and isinstance(v, (int, float))}
            for s, ms in results.items() if isinstance(ms, dict)}


def load_run(run_dir: str) -> dict:
    """What a run directory holds, for comparing it (CompareError if it is not a run).

    Keys: dir, config (Config), settings (flattened config.yaml), model / model_desc (base model identity
    and description), domains, holdout (data.holdout is set), finished (summary.json exists), mode,
    world_size, max_steps, last_step / elapsed_s (metrics.jsonl's last row), train_time_s, before / after
    ({set: {loss, ppl, task metrics}}), after_step (None: the final evaluation; N: the periodic one of
    step N, for an unfinished run), history (steps of the periodic evaluations), status.
    """
    if not os.path.isdir(run_dir):
        what = "is a file, not a run directory" if os.path.exists(run_dir) else "does not exist"
        raise CompareError(f"{run_dir} {what}. Pass the --output-dir of each desmoe train run to compare (a glob "
                           "such as runs/*/ matches directories only).")
    try:
        cfg = rundir.load_run_config(run_dir)
    except rundir.RunDirError as e:
        raise CompareError(str(e)) from e
    summary, evals = _read_json(run_dir, rundir.SUMMARY_FILE), _read_json(run_dir, rundir.EVAL_FILE)
    summary = summary if isinstance(summary, dict) else None
    evals = evals if isinstance(evals, dict) else {}
    rows = _read_metrics(run_dir)
    last = max(rows, key=lambda r: r["step"]) if rows else None
    before = _numbers(evals.get("before") or (summary or {}).get("eval_before"))
    after = _numbers(evals.get("after") or (summary or {}).get("eval_after"))
    history = [h for h in evals.get("history") or [] if isinstance(h, dict) and "step" in h
               and isinstance(h.get("results"), dict)]
    after_step = None
    if after is None and history:
        after, after_step = _numbers(history[-1].get("results")), history[-1]["step"]
    model, model_desc = base_model(cfg)
    run = {"dir": os.path.abspath(run_dir), "config": cfg, "settings": flatten_settings(cfg.to_dict()),
           "model": model, "model_desc": model_desc, "domains": list(cfg.data.domains),
           "holdout": cfg.data.holdout is not None, "finished": summary is not None, "mode": cfg.method.mode,
           "world_size": (summary or {}).get("world_size"), "max_steps": cfg.train.max_steps,
           "last_step": last["step"] if last else None, "elapsed_s": last.get("elapsed_s") if last else None,
           "train_time_s": (summary or {}).get("train_time_s"), "before": before, "after": after,
           "after_step": after_step, "history": [h["step"] for h in history]}
    if summary is None:
        run["train_time_s"] = run["elapsed_s"]
    run["status"] = _status(run)
    return run


def _status(run: dict) -> str:
    if run["finished"]:
        return "finished"
    got = f"at step {run['last_step']} of {run['max_steps']}" if run["last_step"] else "before its first step"
    if run["after_step"] is not None:
        after = f"'after' = its eval at step {run['after_step']}"
    else:
        after = "no evaluation after training started"
    return f"unfinished {got}; {after}"


# ---- several runs ------------------------------------------------------------------------------


def short_names(dirs: list[str]) -> list[str]:
    """The shortest trailing path of each directory that tells them apart (its name, if that is unique)."""
    parts = [os.path.normpath(d).split(os.sep) for d in dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [os.path.normpath(d) for d in dirs]


def _is_compare_output(path: str) -> bool:
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "compare.json"))
            and not os.path.isfile(os.path.join(path, rundir.CONFIG_FILE)))


def _loss(results: dict | None, domains: list[str]) -> float | None:
    """The mean loss over ``domains``; None unless every one was evaluated."""
    if results is None or any("loss" not in results.get(d, {}) for d in domains):
        return None
    return mean_domain(results, domains, "loss")


def _holdout(results: dict | None) -> float | None:
    return ((results or {}).get("holdout") or {}).get("loss")


def _row(run: dict, name: str, shared: list[str], settings: list[str], labels: dict[str, str]) -> dict:
    """A run's row of the comparison (what compare.json lists per run)."""
    before, after = run["before"], run["after"]
    hold_before, hold_after = _holdout(before), _holdout(after)

    def per_domain(results, keys):
        return {d: {k: v for k, v in (results or {}).get(d, {}).items() if k in keys} for d in shared}

    return {"name": name, "dir": run["dir"], "mode": run["mode"], "status": run["status"], "domains": run["domains"],
            "finished": run["finished"], "base_model": labels[run["model"]], "world_size": run["world_size"],
            "steps": run["max_steps"] if run["finished"] else run["last_step"], "max_steps": run["max_steps"],
            "train_time_s": run["train_time_s"], "after_step": run["after_step"],
            "settings": {k: run["settings"].get(k, "(absent)") for k in settings},
            "loss_before": {d: v.get("loss") for d, v in per_domain(before, ("loss",)).items()},
            "loss_after": {d: v.get("loss") for d, v in per_domain(after, ("loss",)).items()},
            "eval_before": per_domain(before, ("loss", "ppl", *METRICS)),
            "eval_after": per_domain(after, ("loss", "ppl", *METRICS)),
            "avg_domain_loss_before": _loss(before, shared), "avg_domain_loss_after": _loss(after, shared),
            "holdout_loss_before": hold_before, "holdout_loss_after": hold_after,
            "forgetting": hold_after - hold_before if hold_after is not None and hold_before is not None else None,
            "left_out_domains": [d for d in run["domains"] if d not in shared]}


def default_out(run_dirs: list[str]) -> str:
    """Where compare writes without --out: ``<parent of the first run>/compare``."""
    return os.path.join(os.path.dirname(os.path.abspath(run_dirs[0])), "compare")


def compare_runs(run_dirs: list[str], out_dir: str | None = None, *, write: bool = True) -> dict:
    """Compare run directories: {"runs": [row per run], "shared_domains", "settings" (the keys that differ),
    "excluded_settings", "same_base_model", "base_models" {label: description}, "task_metrics" {domain:
    [metric]}, "notes", "skipped", "out", "files"}. Writes compare.md, compare.json and the two figures to
    ``out_dir`` (default: default_out) unless ``write`` is false. CompareError on a bad RUN_DIR."""
    skipped = [d for d in run_dirs if _is_compare_output(d)]
    dirs = [d for d in run_dirs if d not in skipped]
    if not dirs:
        raise CompareError("no run directory given" + (f" (skipped compare outputs: {', '.join(skipped)})"
                                                      if skipped else "") + ". Pass one or more desmoe train "
                           "--output-dir directories.")
    seen: dict[str, str] = {}
    for d in dirs:
        real = os.path.realpath(d)
        if real in seen:
            raise CompareError(f"{d} is given twice (also as {seen[real]}). Pass each run directory once.")
        seen[real] = d
    runs = [load_run(d) for d in dirs]
    names = short_names([r["dir"] for r in runs])
    shared = [d for d in runs[0]["domains"] if all(d in r["domains"] for r in runs)]
    if not shared:
        raise CompareError("the runs have no domain in common (" + "; ".join(
            f"{n}: {', '.join(r['domains']) or 'none'}" for n, r in zip(names, runs)) + "). Compare runs that "
            "trained on at least one same data.domains entry.")
    labels: dict[str, str] = {}
    for r in runs:
        labels.setdefault(r["model"], f"M{len(labels) + 1}")
    others = tuple(f"data.domains.{d}." for r in runs for d in r["domains"] if d not in shared)
    keys = list(dict.fromkeys(k for r in runs for k in r["settings"]
                              if not _excluded(k) and not k.startswith(others)))
    settings = [k for k in keys if len({json.dumps(r["settings"].get(k, "(absent)"), sort_keys=True)
                                        for r in runs}) > 1]
    rows = [_row(r, n, shared, settings, labels) for r, n in zip(runs, names)]
    task = {d: [m for m in METRICS if any(m in row[w][d] for row in rows for w in ("eval_before", "eval_after"))]
            for d in shared}
    result = {"runs": rows, "shared_domains": shared, "settings": settings, "excluded_settings": EXCLUDED_SETTINGS,
              "same_domains": all(r["domains"] == runs[0]["domains"] for r in runs),
              "same_base_model": len(labels) == 1,
              "base_models": {lab: next(r["model_desc"] for r in runs if r["model"] == key)
                              for key, lab in labels.items()},
              "task_metrics": {d: ms for d, ms in task.items() if ms}, "skipped": skipped}
    result["notes"] = _notes(result, runs)
    result["out"] = os.path.abspath(out_dir if out_dir is not None else default_out(dirs))
    result["files"] = [os.path.join(result["out"], f) for f in COMPARE_FILES]
    if write:
        save_comparison(result)
    return result


def _notes(result: dict, runs: list[dict]) -> list[str]:
    rows, notes = result["runs"], []
    left = [f"{row['name']}: {', '.join(row['left_out_domains'])}" for row in rows if row["left_out_domains"]]
    if left:
        notes.append(f"The runs' domains differ: compared on the shared ones ({', '.join(result['shared_domains'])});"
                     f" left out per run: {'; '.join(left)}.")
    if not result["same_base_model"]:
        notes.append("The runs fine-tune different base models (column base model: " + "; ".join(
            f"{lab} = {desc}" for lab, desc in result["base_models"].items()) + "). F is each run's change from "
            "its own base model: it is not comparable across base models, nor are the losses.")
    if len({json.dumps(r["config"].to_dict()["data"]["holdout"], sort_keys=True) for r in runs}) > 1:
        notes.append("data.holdout differs between runs: their F measure forgetting on different text.")
    no_holdout = [row["name"] for row, r in zip(rows, runs) if not r["holdout"]]
    if no_holdout:
        notes.append(f"No data.holdout in {', '.join(no_holdout)}: no holdout loss, no F.")
    unfinished = [row["name"] for row in rows if not row["finished"]]
    if unfinished:
        notes.append(f"Unfinished (no summary.json): {', '.join(unfinished)}; their 'after' is the last periodic "
                     "evaluation if any, their time the elapsed_s of metrics.jsonl's last step.")
    if result["skipped"]:
        notes.append(f"Skipped (compare outputs, not runs): {', '.join(result['skipped'])}.")
    return notes


# ---- output ------------------------------------------------------------------------------------


def _num(v, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _setting(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return format(v, "g")
    return json.dumps(v)


def _table(head: list[str], body: list[list[str]]) -> str:
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [head] + body]
    return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def format_table(result: dict) -> str:
    """compare_runs' result as markdown: an overview table, per-domain losses, task metrics, then notes."""
    rows, shared = result["runs"], result["shared_domains"]
    model_col = [] if result["same_base_model"] else ["base model"]
    domain_col = [] if result["same_domains"] else ["domains"]
    head = (["run", "mode", "status", *model_col, *domain_col, *result["settings"], "world size", "steps",
             "train time (s)", "avg domain loss before", "avg domain loss after", "holdout loss before",
             "holdout loss after", "F"])
    body = [[r["name"], r["mode"], r["status"], *([r["base_model"]] if model_col else []),
             *([", ".join(r["domains"])] if domain_col else []),
             *(_setting(r["settings"][k]) for k in result["settings"]), _num(r["world_size"], "d"),
             _num(r["steps"], "d"), _num(r["train_time_s"], ".1f"), _num(r["avg_domain_loss_before"]),
             _num(r["avg_domain_loss_after"]), _num(r["holdout_loss_before"]), _num(r["holdout_loss_after"]),
             _num(r["forgetting"], "+.4f")] for r in rows]
    text = [f"# desmoe compare: {len(rows)} run(s)", "",
            f"Losses in {LOSS_UNIT}; lower is better. Average domain loss over {', '.join(shared)}. "
            "F (forgetting) = holdout loss after - holdout loss before training.", "", _table(head, body), "",
            f"## Per-domain loss ({LOSS_UNIT})", "",
            _table(["run", *(f"{d} {w}" for d in shared for w in ("before", "after"))],
                   [[r["name"], *(_num(r[f"loss_{w}"][d]) for d in shared for w in ("before", "after"))]
                    for r in rows])]
    task = result["task_metrics"]
    if task:
        cols = [(d, m) for d, ms in task.items() for m in ms]
        text += ["", "## Task metrics (%)", "",
                 _table(["run", *(f"{d} {m} {w}" for d, m in cols for w in ("before", "after"))],
                        [[r["name"], *(_num(_percent(r[f"eval_{w}"][d].get(m), m), ".1f") for d, m in cols
                                       for w in ("before", "after"))] for r in rows])]
    excluded = ", ".join(f"{k} ({why})" for k, why in result["excluded_settings"].items())
    shown = "the settings (config.yaml keys) that differ between runs" if result["settings"] else \
        "no other setting differs between the runs"
    if not result["same_domains"]:
        excluded += ", data.domains.<d>.* of a domain not in every run (column domains)"
    text += ["", "## Notes", "", f"- Setting columns: {shown}; never shown: {excluded}."]
    text += [f"- {n}" for n in result["notes"]]
    return "\n".join(text) + "\n"


def _percent(v, metric: str):
    return None if v is None else v * PERCENT.get(metric, 1.0)


def save_comparison(result: dict) -> list[str]:
    """Write compare.md, compare.json and the two figures to result["out"]; their paths."""
    out = result["out"]
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
            f.write(format_table(result))
        rundir.write_json(out, "compare.json", result)
        save_loss_vs_forgetting(result, os.path.join(out, "domain_loss_vs_forgetting.png"))
        save_per_domain_loss(result, os.path.join(out, "per_domain_loss.png"))
    except OSError as e:
        raise CompareError(f"cannot write the comparison to {out} ({e}). Choose another --out DIR.") from e
    return result["files"]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def save_loss_vs_forgetting(result: dict, path: str) -> None:
    """Scatter of average domain loss after training (y) vs F (x), one labelled point per run (hollow:
    unfinished), and the base model at F = 0 when every run shares it. Lower-left is better."""
    fig = canvas_figure(7.0, 5.0, dpi=120)
    ax = fig.add_subplot()
    rows = result["runs"]
    points = [(r, c) for r, c in zip(rows, _colors(len(rows)))
              if r["forgetting"] is not None and r["avg_domain_loss_after"] is not None]
    for r, c in points:
        x, y = r["forgetting"], r["avg_domain_loss_after"]
        ax.scatter([x], [y], s=60, color=c, facecolors=c if r["finished"] else "none", linewidths=1.5, zorder=3,
                   label=r["name"] + ("" if r["finished"] else " (unfinished)"))
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    base = [r["avg_domain_loss_before"] for r in rows if r["avg_domain_loss_before"] is not None]
    if result["same_base_model"] and base:
        y0 = sum(base) / len(base)
        ax.scatter([0.0], [y0], marker="*", s=160, color="black", zorder=3, label="base model (before training)")
        ax.annotate("base model", (0.0, y0), textcoords="offset points", xytext=(6, -10), fontsize=8)
    if points or base:
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no run has both F and an average domain loss after training\n"
                "(data.holdout unset, or no evaluation after training started)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel(f"forgetting F = holdout loss after - before ({LOSS_UNIT})")
    ax.set_ylabel(f"average domain loss after training ({LOSS_UNIT})")
    title = "Domain loss vs forgetting (lower-left is better)"
    if not result["same_base_model"]:
        title += "\nbase models differ: F not comparable"
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15, y=0.1)  # room for the labels beside the points
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def save_per_domain_loss(result: dict, path: str) -> None:
    """Grouped bars: each shared domain's loss after training, one bar per run; a black tick marks the
    loss before training."""
    rows, domains = result["runs"], result["shared_domains"]
    fig = canvas_figure(max(7.0, 2.5 + len(domains) * (0.5 + 0.35 * len(rows))), 4.5, dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    marked = False
    for i, (r, c) in enumerate(zip(rows, _colors(len(rows)))):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(domains))]
        after = [r["loss_after"][d] for d in domains]
        ax.bar([x for x, v in zip(xs, after) if v is not None], [v for v in after if v is not None], width * 0.9,
               color=c, label=r["name"] + ("" if r["finished"] else " (unfinished)"))
        before = [(x, r["loss_before"][d]) for x, d in zip(xs, domains) if r["loss_before"][d] is not None]
        if before:
            ax.scatter([x for x, _ in before], [v for _, v in before], marker="_", s=max(80, 900 * width),
                       linewidths=2, color="black", zorder=3, label=None if marked else "before training")
            marked = True
    ax.set_xticks(range(len(domains)), domains)
    ax.set_xlabel("domain")
    ax.set_ylabel(f"loss ({LOSS_UNIT})")
    ax.set_title("Per-domain loss: bars after training, ticks before (lower is better)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


# ---- the command -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``desmoe compare RUN_DIR [RUN_DIR ...] [--out DIR]``; 0, or 2 on a bad RUN_DIR (one-paragraph error)."""
    p = argparse.ArgumentParser(prog="desmoe compare", description="Compare desmoe runs: per-domain loss and task "
                                "metrics, average domain loss, holdout loss, forgetting F, training time, and the "
                                "settings that differ. Writes compare.md, compare.json and two PNG figures.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (desmoe train --output-dir)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write the comparison (default: <parent of the first RUN_DIR>/compare)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = compare_runs(args.run_dirs, args.out)
    except CompareError as e:
        print(f"desmoe: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print("written:\n" + "\n".join(f"  {f}" for f in result["files"]))
    return 0
