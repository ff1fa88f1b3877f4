"""make demo's script end to end, at smoke size: base model, fft and desmoe runs, the comparison."""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.launch import ROOT, run_env

pytestmark = pytest.mark.integration


def test_demo_trains_both_halves_and_compares_them(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--recipe", "quick", "--out", str(out),
           "train.max_steps=6", "train.warmup_steps=1", "method.affinity_update_every=2", "data.eval_sequences=2",
           "data.holdout_sequences=4", "eval.max_pairs=2", "eval.max_new_tokens=4"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summaries = {m: json.loads((out / m / "summary.json").read_text()) for m in ("fft", "desmoe")}
    assert {m: s["mode"] for m, s in summaries.items()} == {"fft": "fft", "desmoe": "desmoe"}
    for s in summaries.values():  # the same pretrained base model, so the same numbers before training
        assert s["eval_before"] == summaries["fft"]["eval_before"] and "holdout" in s["eval_before"]
    assert (out / "desmoe" / "affinity" / "evolution.png").is_file()
    compare = json.loads((out / "compare" / "compare.json").read_text())
    rows = {r["name"]: r for r in compare["runs"]}
    assert set(rows) == {"fft", "desmoe"}
    for name, s in summaries.items():
        f = s["eval_after"]["holdout"]["loss"] - s["eval_before"]["holdout"]["loss"]
        assert rows[name]["forgetting"] == pytest.approx(f)
    for fig in ("domain_loss_vs_forgetting.png", "per_domain_loss.png"):
        assert (out / "compare" / fig).stat().st_size > 0
    assert "| fft | fft | finished |" in proc.stdout and "| desmoe | desmoe | finished |" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in proc.stdout
