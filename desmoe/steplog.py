"""Step logging: the loop's per-step numbers, summed over ranks once per log interval, into
metrics.jsonl, MLflow (desmoe.tracking) and the progress display; and the count of skipped
(non-finite) steps that stops a run.

    log = StepLog(domains, mode=..., master=..., metrics_file=..., tracker=..., expert_load=..., moe_layers=...)
    log.add(StepRecord(step, step_time_s, elapsed_s, lr, extra, stats))   # every step, every rank
    log.flush()                                                           # every log interval, every rank
"""

from __future__ import annotations

import json
import math
import typing

import torch

from desmoe import dist
from desmoe.progress import Progress
from desmoe.router_stats import load_metrics

PHASE_INDEX = {"full": 0, "esft": 0, "lora": 0, "warmup": 1, "stabilization": 2, "consolidation": 3}
"""The phase as a number, for metric plots (MLflow metrics are numeric)."""


class StepRecord(typing.NamedTuple):
    """One optimizer step, buffered until the next log interval."""

    step: int
    step_time_s: float
    elapsed_s: float
    lr: float
    extra: dict
    """The method's metrics of the step (phase, lambda), plus skipped_step when it was skipped."""
    stats: torch.Tensor
    """[domains, 4] float64, this rank: task-loss sum, KD-loss sum, micro-batches, tokens."""


def finite_or_none(x: torch.Tensor) -> float | None:
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    v = float(x)
    return v if math.isfinite(v) else None


class StepLog:
    """Buffered step records of one rank; rank 0 (``master``) writes them. Every rank calls flush()
    at the same steps (it all-reduces)."""

    def __init__(self, domains: list[str], *, mode: str, master: bool, metrics_file=None, tracker=None,
                 expert_load=None, moe_layers: list[int] | None = None):
        self.names, self.mode, self.master = list(domains), mode, master
        self.metrics_file, self.tracker = metrics_file, tracker
        self.expert_load = expert_load
        """desmoe.router_stats.ExpertLoad (routed-token shares per expert), or None."""
        self.moe_layers = moe_layers or []
        """Layer indices that name the expert-load metrics (empty: 0, 1, ... of the MoE layers)."""
        self.progress: Progress | None = None
        self.pending: list[StepRecord] = []

    def start_progress(self, total: int, *, start_step: int, every: int) -> None:
        if self.master:  # only rank 0 reports progress
            self.progress = Progress(total, start_step=start_step, every=every)

    def write(self, msg: str) -> None:
        """A message above the progress display (rank 0)."""
        if self.master:
            self.progress.write(msg)

    def add(self, record: StepRecord) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        """Sum the buffered steps' stats over ranks, append them to metrics.jsonl, print a progress line.

        NOTE: one all-reduce per log interval, not per step: the logged numbers are the same (every
        rank's losses and tokens), the collectives far fewer."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        stacked = dist.all_reduce_sum(torch.stack([p.stats for p in pending]))  # [steps, domains, 4]
        load = self.expert_load.collect() if self.expert_load is not None else None  # [L, E] shares, all ranks
        if not self.master:
            return
        tracked = [(rec.step, self._write(rec, stats)) for rec, stats in zip(pending, stacked)]
        self.metrics_file.flush()
        if load is not None:
            tracked[-1][1].update(load_metrics(load, self.moe_layers or list(range(load.shape[0]))))
        self.tracker.log_many(tracked)
        last, stats = pending[-1], stacked[-1]
        losses = {self.names[j]: float(stats[j, 0] / stats[j, 2]) for j in range(len(self.names)) if stats[j, 2] > 0}
        self.progress.update(last.step, phase=last.extra["phase"], losses=losses, lr=last.lr,
                             tokens_per_s=float(stats[:, 3].sum()) / last.step_time_s)

    def _write(self, rec: StepRecord, stats: torch.Tensor) -> dict[str, float]:
        """One step's metrics.jsonl lines (one per domain it trained); returns its MLflow values."""
        tokens = int(stats[:, 3].sum())
        values = {"lr": rec.lr, "lambda": rec.extra["lambda"], "tokens_per_s": tokens / rec.step_time_s,
                  "step_time_s": rec.step_time_s, "phase_index": PHASE_INDEX.get(rec.extra["phase"], -1),
                  "skipped_step": float(rec.extra.get("skipped_step", False))}
        for j, name in enumerate(self.names):
            n = stats[j, 2]
            if n > 0:
                record = {"step": rec.step, "domain": name, "loss": finite_or_none(stats[j, 0] / n),
                          "kd_loss": finite_or_none(stats[j, 1] / n), **rec.extra, "lr": rec.lr, "tokens": tokens,
                          "tokens_per_s": tokens / rec.step_time_s, "step_time_s": rec.step_time_s,
                          "elapsed_s": rec.elapsed_s, "mode": self.mode}
                self.metrics_file.write(json.dumps(record) + "\n")
                values[f"loss/{name}"] = float(stats[j, 0] / n)
                values[f"kd_loss/{name}"] = float(stats[j, 1] / n)
        return values

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics_file is not None and not self.metrics_file.closed:
            self.metrics_file.close()


class BadSteps:
    """Skipped non-finite steps: in a row and in all; ``limit`` in a row stops the run."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def observe(self, bad: bool) -> bool:
        """Count one step; True when ``limit`` bad steps in a row have been reached."""
        self.in_row = self.in_row + 1 if bad else 0
        self.total += int(bad)
        return self.in_row >= self.limit
