"""desmoe.steplog: buffered step records into metrics.jsonl, the tracker and the progress line (one
process, no process group: dist.all_reduce_sum returns its input); BadSteps."""

import io
import json
import math

import pytest
import torch

from desmoe import dist
from desmoe.progress import Progress
from desmoe.steplog import BadSteps, StepLog, StepRecord, finite_or_none

DOMAINS = ["math", "code", "law"]


class FakeTracker:
    def __init__(self):
        self.calls = []

    def log_many(self, records):
        self.calls.append([(step, dict(values)) for step, values in records])


class FixedLoad:
    """Stands in for router_stats.ExpertLoad: the same shares at every collect()."""

    def __init__(self, shares):
        self.shares, self.collected = shares, 0

    def collect(self):
        self.collected += 1
        return self.shares


def _stats(rows):
    """[domains, 4] float64: task-loss sum, KD-loss sum, micro-batches, tokens."""
    return torch.tensor(rows, dtype=torch.float64)


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def log(tmp_path):
    assert not dist.is_initialized()  # all_reduce_sum is the identity here
    f = open(tmp_path / "metrics.jsonl", "w", encoding="utf-8")
    log = StepLog(DOMAINS, mode="desmoe", master=True, metrics_file=f, tracker=FakeTracker())
    log.progress = Progress(10, every=1, stream=io.StringIO())
    yield log
    log.close()


def _two_steps(log):
    log.add(StepRecord(1, 0.5, 0.5, 1e-3, {"phase": "warmup", "lambda": 0.25},
                       _stats([[4.0, 1.0, 2, 100], [0, 0, 0, 0], [6.0, 0.5, 3, 50]])))
    log.add(StepRecord(2, 0.25, 0.75, 2e-3, {"phase": "mystery", "lambda": 0.5, "skipped_step": True},
                       _stats([[float("nan"), float("inf"), 1, 40], [3.0, 0.3, 1, 60], [0, 0, 0, 0]])))


def _metrics(log):
    with open(log.metrics_file.name, encoding="utf-8") as f:
        return [_strict(line) for line in f]


def test_flush_writes_one_line_per_step_and_trained_domain(log):
    _two_steps(log)
    assert _metrics(log) == []  # buffered until flush
    log.flush()
    assert log.pending == []
    common1 = {"phase": "warmup", "lambda": 0.25, "lr": 1e-3, "tokens": 150, "tokens_per_s": 300.0,
               "step_time_s": 0.5, "elapsed_s": 0.5, "mode": "desmoe"}
    common2 = {"phase": "mystery", "lambda": 0.5, "skipped_step": True, "lr": 2e-3, "tokens": 100,
               "tokens_per_s": 400.0, "step_time_s": 0.25, "elapsed_s": 0.75, "mode": "desmoe"}
    lines = _metrics(log)
    assert [(r["step"], r["domain"]) for r in lines] == [(1, "math"), (1, "law"), (2, "math"), (2, "code")]
    assert lines[0] == {"step": 1, "domain": "math", "loss": 2.0, "kd_loss": 0.5, **common1}
    assert lines[1] == {"step": 1, "domain": "law", "loss": 2.0, "kd_loss": pytest.approx(0.5 / 3), **common1}
    # a non-finite loss is null: the file stays strict JSON (_strict refuses NaN / Infinity)
    assert lines[2] == {"step": 2, "domain": "math", "loss": None, "kd_loss": None, **common2}
    assert lines[3] == {"step": 2, "domain": "code", "loss": 3.0, "kd_loss": pytest.approx(0.3), **common2}


def test_flush_gives_the_tracker_one_entry_per_step(log):
    _two_steps(log)
    log.flush()
    (call,) = log.tracker.calls
    assert [step for step, _ in call] == [1, 2]
    first, second = call[0][1], call[1][1]
    assert first == {"lr": 1e-3, "lambda": 0.25, "tokens_per_s": 300.0, "step_time_s": 0.5, "phase_index": 1,
                     "skipped_step": 0.0, "loss/math": 2.0, "kd_loss/math": 0.5, "loss/law": 2.0,
                     "kd_loss/law": pytest.approx(0.5 / 3)}
    assert second["phase_index"] == -1 and second["skipped_step"] == 1.0  # an unknown phase; a skipped step
    assert math.isnan(second["loss/math"]) and second["loss/code"] == 3.0
    assert "loss/law" not in second and "loss/code" not in first  # only domains that had micro-batches


def test_flush_prints_the_last_steps_progress_line(log):
    _two_steps(log)
    log.flush()
    out = log.progress.stream.getvalue().splitlines()
    assert len(out) == 1  # one line per flush, for its last step
    assert out[0].startswith("step 2/10 | mystery | loss math nan, code 3.0000 | lr 2.00e-03 | 400 tok/s | eta ")
    log.write("phase: stabilization from step 3")
    assert log.progress.stream.getvalue().splitlines()[-1] == "phase: stabilization from step 3"


def test_flush_with_nothing_pending_does_nothing(log):
    log.flush()
    assert log.tracker.calls == [] and log.progress.stream.getvalue() == "" and _metrics(log) == []
    _two_steps(log)
    log.flush()
    log.flush()
    assert len(log.tracker.calls) == 1 and len(_metrics(log)) == 4


def test_expert_load_metrics_go_with_the_last_step(log):
    log.expert_load = FixedLoad(torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    log.moe_layers = [1, 3]
    _two_steps(log)
    log.flush()
    assert log.expert_load.collected == 1
    (call,) = log.tracker.calls
    assert not any(k.startswith("expert_load/") for k in call[0][1])
    loads = {k: v for k, v in call[1][1].items() if k.startswith("expert_load/")}
    assert loads == {"expert_load/layer1/max_over_mean": 2.0, "expert_load/layer1/entropy": pytest.approx(0.5),
                     "expert_load/layer3/max_over_mean": 4.0, "expert_load/layer3/entropy": 0.0}
    log.moe_layers = []  # unnamed: the MoE layers count from 0
    _two_steps(log)
    log.flush()
    assert {k for k in log.tracker.calls[1][1][1] if k.startswith("expert_load/")} == {
        "expert_load/layer0/max_over_mean", "expert_load/layer0/entropy",
        "expert_load/layer1/max_over_mean", "expert_load/layer1/entropy"}


def test_other_ranks_write_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("earlier\n")
    with open(path, encoding="utf-8") as closed_file:
        pass  # a closed file: any write or flush would raise
    log = StepLog(DOMAINS, mode="fft", master=False, metrics_file=closed_file, tracker=None)
    log.start_progress(10, start_step=0, every=1)
    assert log.progress is None
    _two_steps(log)
    log.flush()
    log.write("only rank 0 prints")
    assert log.pending == [] and path.read_text() == "earlier\n"
    log.close()


def test_start_progress_on_rank_zero(log):
    log.start_progress(300, start_step=40, every=50)
    assert (log.progress.total, log.progress.start_step, log.progress.every) == (300, 40, 50)


def test_close_closes_the_metrics_file_and_the_progress(log):
    log.close()
    assert log.metrics_file.closed and log.progress.closed
    log.close()  # twice is harmless


def test_finite_or_none():
    assert finite_or_none(torch.tensor(1.5)) == 1.5
    assert [finite_or_none(torch.tensor(v)) for v in (float("nan"), float("inf"), -float("inf"))] == [None] * 3


def test_bad_steps_counts_in_a_row_and_in_all():
    bad = BadSteps(limit=3)
    assert [bad.observe(b) for b in (True, True, False, True, True)] == [False] * 5
    assert (bad.in_row, bad.total) == (2, 4)
    assert bad.observe(True) is True and (bad.in_row, bad.total) == (3, 5)
    assert bad.observe(True) is True  # still past the limit
    assert bad.observe(False) is False and (bad.in_row, bad.total) == (0, 6)


def test_bad_steps_limit_one_stops_at_the_first():
    bad = BadSteps(limit=1)
    assert bad.observe(False) is False
    assert bad.observe(True) is True and bad.total == 1
