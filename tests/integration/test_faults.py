"""Non-finite steps (2 ranks over gloo, AutoEP ep_size 2): skipped on every rank and counted, the LR schedule
stays on the step clock, and too many in a row stop the run with its last checkpoint intact."""

import json
import os
import subprocess
import sys

import pytest

from desmoe import checkpoint
from tests.conftest import CONFIGS
from tests.integration.launch import ROOT, run_env

pytestmark = pytest.mark.integration

DEMO = os.path.join(CONFIGS, "demo.yaml")
SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.warmup_steps=4", "train.lr_schedule=constant", "train.log_every=4",
         "data.seq_len=64", "data.domains.code.max_examples=60", "data.domains.law.max_examples=200",
         "data.domains.math.max_examples=800", "tracking.mlflow=false"]


def _train(out, *overrides, fault=""):
    env = run_env()
    env["DESMOE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "desmoe.cli", "train", "--nproc", "2", "--config", DEMO,
                           "--output-dir", str(out), *SMALL, *overrides], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    # and an MLflow server that is not there: one warning, training goes on, metrics.jsonl has everything
    proc = _train(tmp_path / "run", "train.max_steps=8", "tracking.mlflow=true", "tracking.uri=http://127.0.0.1:9",
                  fault="nan_loss@3,nan_loss@4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if line.startswith("desmoe: warning: MLflow")]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0] and "metrics.jsonl" in warnings[0]
    assert "step 3: non-finite loss or gradient; the update was skipped (1 in a row, 1 in all)" in proc.stdout
    assert "step 4: non-finite loss or gradient; the update was skipped (2 in a row, 2 in all)" in proc.stdout
    rows = _metrics(tmp_path / "run")
    assert sorted({r["step"] for r in rows}) == list(range(1, 9))
    for r in rows:
        bad = r["step"] in (3, 4)
        assert r.get("skipped_step", False) is bad
        assert (r["loss"] is None) is bad  # strict JSON: null, not NaN
        assert r["lr"] == pytest.approx(3e-3 * min(1.0, r["step"] / 4))  # the schedule follows the step count
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    after = summary["eval_loss_after"]
    assert all(v == v and v < summary["eval_loss_before"][k] for k, v in after.items())  # finite, and learned


def test_too_many_bad_steps_stop_the_run_with_its_checkpoint_intact(tmp_path):
    steps = ",".join(f"nan_loss@{s}" for s in range(5, 13))
    proc = _train(tmp_path / "run", "train.max_steps=12", "train.max_bad_steps=3", "checkpoint.every=2",
                  "checkpoint.keep=5", fault=steps)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "3 steps in a row (to step 7) had a non-finite loss or gradient" in proc.stderr
    assert "Traceback" not in proc.stderr
    root = tmp_path / "run" / "checkpoints"
    # saved at 2, 4 and 6 (step 6 was skipped, so its weights are those of step 4); nothing after the stop
    assert checkpoint.complete_tags(str(root)) == ["step2", "step4", "step6"]
    assert checkpoint.latest_tag(str(root)) == "step6"
    assert "Last complete checkpoint: step6" in proc.stderr
