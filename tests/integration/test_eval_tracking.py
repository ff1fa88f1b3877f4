"""A short training run against a real `mlflow server` with periodic evaluation, then `desmoe eval` of its
checkpoints in one process: metrics read back from the server, eval files, best checkpoint, equal results."""

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CONFIGS
from tests.integration.launch import desmoe
from tests.integration.test_mlflow_server import mlflow_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.max_steps=12", "train.warmup_steps=2",
         "train.log_every=4", "data.seq_len=64", "data.domains.code.max_examples=60",
         "data.domains.law.max_examples=200", "data.domains.math.max_examples=800",
         "method.affinity_update_every=3", "eval.every=4", "eval.keep_best=true", "eval.max_pairs=8"]


def test_training_logs_to_a_real_mlflow_server_and_desmoe_eval_matches(mlflow_server, tmp_path):  # noqa: F811
    url, _ = mlflow_server
    run_dir = tmp_path / "run"
    proc = desmoe("train", "--config", os.path.join(CONFIGS, "desmoe_demo.yaml"), "--nproc", "2", "--output-dir",
                  str(run_dir), *SMALL, f"tracking.uri={url}", "tracking.experiment=ci")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "warning" not in proc.stdout.lower()

    info = json.load(open(run_dir / "mlflow_run.json"))
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "12" and run.data.params["method.mode"] == "desmoe"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    for domain in ("math", "code", "law"):
        history = client.get_metric_history(info["run_id"], f"loss/{domain}")
        mine = {r["step"]: r["loss"] for r in rows if r["domain"] == domain}
        assert {m.step: m.value for m in history} == pytest.approx(mine)  # every step, the same values
    for key in ("lambda", "lr", "tokens_per_s", "phase_index", "expert_load/layer0/max_over_mean",
                "affinity_overlap/math-code", "eval/math/loss", "eval_after/holdout/loss", "eval_after/math/exact_match"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"config.yaml", "summary.json", "eval.json", "eval.md", "affinity"} <= artifacts

    evals = json.load(open(run_dir / "eval.json"))
    assert [h["step"] for h in evals["history"]] == [4, 8]
    assert set(evals["after"]) == {"math", "code", "law", "holdout"}
    assert {"loss", "ppl", "token_accuracy", "exact_match"} <= set(evals["after"]["math"])
    best = json.load(open(run_dir / "checkpoints" / "best" / "best.json"))
    assert best["value"] == min(h["mean_loss"] for h in evals["history"])

    # desmoe eval: the exported checkpoint in one process gives the training-time numbers
    out = desmoe("eval", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    single = json.load(open(run_dir / "eval_step12.json"))["results"]
    for name, metrics in evals["after"].items():
        assert single[name]["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
        assert single[name]["token_accuracy"] == pytest.approx(metrics["token_accuracy"], abs=1e-9)
    assert single["math"]["exact_match"] == evals["after"]["math"]["exact_match"]
    out = desmoe("eval", str(run_dir), "--checkpoint", "best")
    assert out.returncode == 0, out.stderr[-3000:]
    at_best = json.load(open(run_dir / "eval_best.json"))["results"]
    h = [h for h in evals["history"] if h["step"] == best["step"]][0]
    assert at_best["math"]["loss"] == pytest.approx(h["results"]["math"]["loss"], abs=1e-5)
