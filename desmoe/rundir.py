"""The run directory: what a run writes there, and reading a run back.

    <run>/config.yaml          the resolved config (config.before_resume_step<N>.yaml: an earlier one)
    <run>/ds_config.json       the DeepSpeed config the engine was built from
    <run>/metrics.jsonl        one line per optimizer step and domain (metrics.discarded.jsonl: repeated steps)
    <run>/data_summary.json    the data scan printed before training
    <run>/eval.json, eval.md   evaluation before, during and after training
    <run>/summary.json         the run's result (written when it finishes)
    <run>/affinity/step<N>.json, .png   each affinity update (desmoe modes)
    <run>/esft_selection.json  the experts ESFT profiling selected (esft modes)
    <run>/checkpoints/         see desmoe.checkpoint

Every writer here is called on rank 0 only; nothing here talks to other ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading

from desmoe.affinity_report import AFFINITY_DIR, save_affinity_heatmaps
from desmoe.config import Config, ConfigError, load_config
from desmoe.data import DomainData
from desmoe.evaluation import markdown_table

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DISCARDED_METRICS_FILE = "metrics.discarded.jsonl"
DS_CONFIG_FILE = "ds_config.json"
DATA_SUMMARY_FILE = "data_summary.json"
SUMMARY_FILE = "summary.json"
ESFT_SELECTION_FILE = "esft_selection.json"
EVAL_FILE = "eval.json"
EVAL_TABLE_FILE = "eval.md"
RUN_ARTIFACTS = (SUMMARY_FILE, DATA_SUMMARY_FILE, ESFT_SELECTION_FILE, EVAL_FILE, EVAL_TABLE_FILE, AFFINITY_DIR)
"""What a finished run logs to MLflow besides the start artifacts (in this order; those that exist)."""


class RunDirError(ValueError):
    """A directory given as a run directory is not one (missing, or without a usable config.yaml)."""


# ---- a new run -------------------------------------------------------------------------------


def taken_files(output_dir: str) -> list[str]:
    """The files that show ``output_dir`` already holds a run."""
    return [f for f in (CONFIG_FILE, METRICS_FILE) if os.path.exists(os.path.join(output_dir, f))]


def checkpoint_bytes(model) -> int:
    """Estimated size of one checkpoint: fp32 weights, master copy and Adam's two moments (16 bytes per
    parameter), plus 10%."""
    return int(sum(p.numel() for p in model.parameters()) * 16 * 1.1)


def check_output_dir(output_dir: str, need: int) -> None:
    """The run directory can be created and written, and its file system has ``need`` bytes free."""
    parent = output_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError([f"run.output_dir: {output_dir} cannot be created or written ({parent} is not writable). "
                           "Choose another --output-dir."])
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError([f"run.output_dir: {parent} has {free / 2**20:,.0f} MiB free; one checkpoint needs about "
                           f"{need / 2**20:,.0f} MiB. Free space or choose another --output-dir."])


def write_run_config(output_dir: str, text: str, resumed_at: int | None) -> None:
    """config.yaml of the run; a resumed run with other settings keeps the earlier one beside it."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if resumed_at is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if old == text:
            return
        os.replace(path, os.path.join(output_dir, f"config.before_resume_step{resumed_at}.yaml"))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(output_dir: str, name: str, value, *, indent: int | None = 2) -> str:
    path = os.path.join(output_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent)
    return path


def open_metrics(output_dir: str, start_step: int):
    """metrics.jsonl for appending. A resumed run keeps the lines up to its checkpoint's step and moves
    later ones (steps it will repeat) to metrics.discarded.jsonl."""
    path = os.path.join(output_dir, METRICS_FILE)
    if start_step == 0 or not os.path.isfile(path):
        return open(path, "w", encoding="utf-8")
    keep, drop = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                drop.append(line if line.endswith("\n") else line + "\n")  # a line cut by a kill
                continue
            (keep if step <= start_step else drop).append(line)
    if drop:
        with open(os.path.join(output_dir, DISCARDED_METRICS_FILE), "a", encoding="utf-8") as f:
            f.writelines(drop)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")


def data_summary(domains: dict[str, DomainData], scan: dict) -> tuple[str, list[dict]]:
    """The scan table printed before training (and its rows, saved as data_summary.json).

    ``truncated`` / ``split`` count the examples longer than data.seq_len (cut, or continued over
    rows: whichever data.long_examples does); ``dropped_tokens`` the tokens truncation cut off.
    """
    rows = [{"domain": d.name, "examples": d.examples, "tokens": d.tokens, "trained_tokens": d.trained_tokens,
             "truncated": d.truncated, "split": d.split, "dropped_tokens": d.dropped_tokens,
             "skipped": scan[d.name].skipped, "train_seqs": d.train_ids.shape[0], "eval_seqs": d.eval_ids.shape[0],
             "eval_examples": len(d.eval_examples), "metrics": list(d.metrics),
             "first_skipped": scan[d.name].first_skip} for d in domains.values()]
    w = max([12, *(len(r["domain"]) for r in rows)])  # the name column fits every name (translation_de, ...)
    lines = [f"{'domain':<{w}} {'examples':>9} {'tokens':>10} {'trained':>10} {'truncated':>9} {'split':>6} "
             f"{'skipped':>8} {'train seqs':>11} {'eval seqs':>10}  metric"]
    for r in rows:
        lines.append(f"{r['domain']:<{w}} {r['examples']:>9} {r['tokens']:>10} {r['trained_tokens']:>10} "
                     f"{r['truncated']:>9} {r['split']:>6} {r['skipped']:>8} {r['train_seqs']:>11} "
                     f"{r['eval_seqs']:>10}  {r['metrics'][0]}")
    mixed = scan.get("data.train")
    if mixed is not None and mixed.skipped:
        rows.append({"domain": "data.train", "skipped": mixed.skipped, "first_skipped": mixed.first_skip})
    for r in rows:
        if r.get("dropped_tokens"):
            lines.append(f"{r['domain']}: truncation to data.seq_len dropped {r['dropped_tokens']} token(s) of "
                         f"{r['truncated']} example(s)")
        if r["skipped"]:
            lines.append(f"{r['domain']}: skipped {r['skipped']} bad record(s); first: {r['first_skipped']}")
    return "\n".join(lines), rows


def write_eval(output_dir: str, before: dict, after: dict | None, history: list[dict]) -> None:
    """eval.json (before, after, periodic history) and eval.md (the table)."""
    write_json(output_dir, EVAL_FILE, {"before": before, "after": after, "history": history})
    text = f"# Evaluation of {output_dir}\n\n"
    text += markdown_table(before, after) if after is not None else markdown_table(None, before)
    if history:
        text += "\n\n## During training\n\n| step | mean domain loss |\n|---|---|\n"
        text += "\n".join(f"| {h['step']} | {h['mean_loss']:.4f} |" for h in history)
    with open(os.path.join(output_dir, EVAL_TABLE_FILE), "w", encoding="utf-8") as f:
        f.write(text + "\n")


class FigureWriter:
    """Draws the affinity heatmaps in a child process, so that the training loop neither waits for them nor
    shares the interpreter lock with matplotlib (a drawing thread slows a launch-bound step by 10-30% while
    it draws; benchmarks/heatmap_cost.py).

        figures = FigureWriter()
        write_affinity(output_dir, record, figures)   # the JSON now; its PNG in the child process
        figures.close()                                # waits for every pending PNG (end of run, or failure)

    The child (desmoe.affinity_report.figure_worker) starts at the first ``submit`` (again after ``close``)
    and reads each record back from its JSON file. A figure that fails (or a child that dies) is reported
    once (``warn``; later failures are only listed in ``failures``) and never raised. Each PNG is written
    under a temporary name and renamed, so a reader never sees half of one. A process that ends without
    ``close`` loses the pending figures (the child ends when its input closes), not its exit.
    """

    def __init__(self, warn=None):
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.failures: list[tuple[str, str]] = []
        """(png path, error) of each figure that could not be drawn."""
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._pending: dict[str, int] = {}
        """png path -> figures of it submitted and not answered yet (a resumed run may redraw a step)."""
        self._done = threading.Condition()

    def submit(self, json_path: str, png_path: str) -> None:
        """Queue the heatmaps of the record in ``json_path`` (already written) as ``png_path``; returns at once."""
        with self._done:
            self._pending[png_path] = self._pending.get(png_path, 0) + 1
        try:
            if self._proc is None:
                self._start()
            self._proc.stdin.write(json.dumps([json_path, png_path]) + "\n")
            self._proc.stdin.flush()
        except OSError as e:  # could not start, or the child is gone
            self._failed(png_path, f"the figure process is not running ({type(e).__name__}: {e})")

    def join(self) -> None:
        """Wait until every submitted figure is written (or has failed)."""
        with self._done:
            self._done.wait_for(lambda: not self._pending)

    def close(self) -> list[tuple[str, str]]:
        """Wait for the pending figures and end the child process; returns ``failures``. Safe to call again."""
        if self._proc is not None:
            with contextlib.suppress(OSError):  # the child is already gone
                self._proc.stdin.close()
            self._reader.join()
            self._proc = self._reader = None
        return self.failures

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
                   OMP_NUM_THREADS="1")
        # the child ignores Ctrl-C (it reaches the whole process group): it ends when its input closes
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "from desmoe.affinity_report import figure_worker; figure_worker()")
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env, text=True, encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, args=(self._proc,), name="desmoe-figures", daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        """The child's answers (one JSON line [png path, error or null] per figure) until it ends."""
        for line in proc.stdout:
            try:
                png, error = json.loads(line)
            except (ValueError, TypeError):
                continue  # not an answer (something else printed to stdout)
            if error is None:
                with self._done:
                    self._answered(png)
            else:
                self._failed(png, error)
        code = proc.wait()
        with self._done:
            left = [png for png, n in self._pending.items() for _ in range(n)]
        for png in left:  # the child died before drawing them
            self._failed(png, f"the figure process ended (exit code {code}) before drawing it")

    def _answered(self, png: str) -> None:
        """(holding _done) one figure of ``png`` is no longer pending."""
        left = self._pending.pop(png, 1) - 1
        if left > 0:
            self._pending[png] = left
        self._done.notify_all()

    def _failed(self, png: str, error: str) -> None:
        with self._done:
            self.failures.append((png, error))
            self._answered(png)
            first = len(self.failures) == 1
        if first:
            self.warn(f"warning: the affinity heatmap {png} could not be drawn ({error}); its JSON record is "
                      "complete. Later figure failures are not reported.")


def write_affinity(output_dir: str, record: dict, figures: FigureWriter | None = None) -> None:
    """affinity/step<N>.json of one affinity update (desmoe.method records), and its heatmaps (.png):
    drawn here, or handed to ``figures`` (the training loop's, so that it does not wait)."""
    folder = os.path.join(output_dir, AFFINITY_DIR)
    os.makedirs(folder, exist_ok=True)
    name = f"step{record['step']:06d}"
    write_json(folder, name + ".json", record, indent=None)
    if figures is None:
        save_affinity_heatmaps(record, os.path.join(folder, name + ".png"))
    else:
        figures.submit(os.path.join(folder, name + ".json"), os.path.join(folder, name + ".png"))


def run_artifacts(output_dir: str) -> list[tuple[str, str | None]]:
    """(path, MLflow artifact_path) of the run's result files that exist, for the tracker."""
    return [(os.path.join(output_dir, name), name if name == AFFINITY_DIR else None) for name in RUN_ARTIFACTS
            if os.path.exists(os.path.join(output_dir, name))]


# ---- an existing run -------------------------------------------------------------------------


def load_run_config(run_dir: str) -> Config:
    """The resolved desmoe config of a run directory (its config.yaml); RunDirError if it is not a run."""
    if not os.path.isdir(run_dir):
        raise RunDirError(f"run directory {run_dir!r} does not exist or is not a directory. Pass the --output-dir "
                          "of a desmoe train run.")
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} is not a desmoe run directory: it has no config.yaml. Pass the --output-dir "
                          "of a desmoe train run.")
    try:
        return load_config(path)
    except ConfigError as e:
        raise RunDirError(f"{path} cannot be used: {e}") from e
