"""MLflow tracking against an embedded sqlite store: what a user finds in MLflow after a run."""

import json
import os
import time

import pytest

from desmoe.tracking import MAX_PARAM_LENGTH, RUN_FILE, Tracker, clean_key, default_uri, flatten

CFG = {"run": {"name": "t"}, "train": {"lr": 1e-3, "betas": [0.9, 0.95], "max_steps": 10},
       "model": {"tiny": {"model_type": "qwen3_moe"}, "path": None}, "method": {"mode": "desmoe"}}
DS = {"zero_optimization": {"stage": 1}, "expert_parallel": {"enabled": True, "autoep_size": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs/ folder (one sqlite store) for the module: creating a store takes about a second."""
    return tmp_path_factory.mktemp("runs")


def new_run_dir(runs, name):
    d = runs / name
    d.mkdir()
    (d / "config.yaml").write_text("train:\n  lr: 0.001\n")
    (d / "ds_config.json").write_text(json.dumps(DS))
    return str(d)


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start(run_dir, warnings=None, **kw):
    return Tracker.start(CFG, DS, output_dir=run_dir, run_name=os.path.basename(run_dir),
                         warn=None if warnings is None else warnings.append, **kw)


def test_params_metrics_artifacts_land_in_the_default_store_beside_the_run(runs):
    run_dir = new_run_dir(runs, "a")
    t = start(run_dir)
    assert t.enabled and t.uri == f"sqlite:///{runs}/mlflow.db" == default_uri(run_dir)
    t.log_many([(1, {"loss/math": 2.0, "loss/code": 3.0, "phase": "warmup"}), (2, {"loss/math": 1.5})])
    t.log_metrics({"eval_loss/math": 1.4}, step=2)
    (runs / "a" / "summary.json").write_text("{}")
    t.log_artifact(str(runs / "a" / "summary.json"))
    (runs / "a" / "affinity").mkdir()
    (runs / "a" / "affinity" / "step000020.json").write_text("{}")
    t.log_artifact(str(runs / "a" / "affinity"), artifact_path="affinity")
    t.finish()

    c = client_for(t.uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a"
    p = run.data.params
    assert p["train.lr"] == "0.001" and p["train.betas"] == "[0.9, 0.95]" and p["model.path"] == "None"
    assert p["model.tiny.model_type"] == "qwen3_moe"
    assert p["ds.zero_optimization.stage"] == "1" and p["ds.expert_parallel.autoep_size"] == "2"
    assert run.data.tags["desmoe.mode"] == "desmoe" and run.data.tags["desmoe.output_dir"] == run_dir
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss/math")] == [(1, 2.0), (2, 1.5)]
    assert "phase" not in run.data.metrics  # strings are not metrics
    assert run.data.metrics["eval_loss/math"] == 1.4
    assert sorted(a.path for a in c.list_artifacts(t.run_id)) == ["affinity", "config.yaml", "ds_config.json",
                                                                  "summary.json"]
    assert [a.path for a in c.list_artifacts(t.run_id, "affinity")] == ["affinity/step000020.json"]
    # artifacts beside the store, not ./mlruns of whatever directory training started in
    assert run.info.artifact_uri.startswith(f"file://{runs}/mlartifacts/")
    assert json.loads((runs / "a" / RUN_FILE).read_text())["run_id"] == t.run_id


def test_resume_continues_the_same_run_and_a_fresh_start_does_not(runs):
    run_dir = new_run_dir(runs, "b")
    t1 = start(run_dir)
    t1.log_many([(1, {"loss": 2.0})])
    t1.finish("KILLED")
    assert client_for(t1.uri).get_run(t1.run_id).info.status == "KILLED"

    t2 = Tracker.start({**CFG, "train": {**CFG["train"], "max_steps": 20}}, DS, output_dir=run_dir, run_name="b",
                       resume=True)
    assert t2.enabled and t2.run_id == t1.run_id
    c = client_for(t2.uri)
    assert c.get_run(t2.run_id).info.status == "RUNNING"
    t2.log_many([(2, {"loss": 1.0})])
    t2.finish()
    run = c.get_run(t2.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(t2.run_id, "loss")] == [1, 2]
    # params are immutable in MLflow: the first value stays, the change is noted
    assert run.data.params["train.max_steps"] == "10"
    assert run.data.tags["desmoe.resume_changed_params"] == "train.max_steps=20"

    t3 = start(run_dir)  # not a resume (run.overwrite): a new MLflow run
    assert t3.enabled and t3.run_id != t1.run_id
    t3.finish()
    assert json.loads((runs / "b" / RUN_FILE).read_text())["run_id"] == t3.run_id


def test_resume_of_a_run_unknown_to_the_store_starts_a_new_one(runs):
    run_dir = new_run_dir(runs, "c")
    (runs / "c" / RUN_FILE).write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": default_uri(run_dir)}))
    t = start(run_dir, resume=True)
    assert t.enabled and t.run_id != "0" * 32
    t.finish()


def test_long_values_many_params_and_odd_keys_fit_mlflow_limits(runs):
    run_dir = new_run_dir(runs, "d")
    cfg = {"data": {"domains": {f"dom{i}": {"weight": i} for i in range(150)}},
           "model": {"tiny": {"note": "x" * 10000}}, "odd": {"a:b*c?": 1, "../up": 2}}
    t = Tracker.start(cfg, {}, output_dir=run_dir, run_name="d")
    assert t.enabled
    t.finish()
    p = client_for(t.uri).get_run(t.run_id).data.params
    assert len(p) == 150 + 3 and p["data.domains.dom149.weight"] == "149"
    assert len(p["model.tiny.note"]) == MAX_PARAM_LENGTH and p["model.tiny.note"].endswith("...")
    assert p["odd.a_b_c_"] == "1" and p["odd.../up"] == "2"
    assert clean_key("a//b/../c") == "a/_/b/_/c"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2], "e": {}}, "d": None}, "p.") == {
        "p.a.b": "1", "p.a.c": "[1, 2]", "p.a.e": "{}", "p.d": "None"}


def test_dead_server_warns_once_and_costs_seconds(tmp_path):
    warnings = []
    t0 = time.perf_counter()
    t = Tracker.start(CFG, DS, output_dir=str(tmp_path / "run"), run_name="x", uri="http://127.0.0.1:9",
                      warn=warnings.append)
    t.log_many([(1, {"loss": 1.0})])
    t.log_artifact(__file__)
    t.finish("FAILED")
    elapsed = time.perf_counter() - t0
    assert not t.enabled
    assert len(warnings) == 1
    assert "http://127.0.0.1:9" in warnings[0] and "metrics.jsonl" in warnings[0]
    assert elapsed < 10, f"a dead MLflow server cost {elapsed:.1f} s"


def test_failure_mid_run_warns_once_on_stderr_and_later_calls_do_nothing(runs, capsys):
    t = start(new_run_dir(runs, "e"))
    assert t.enabled

    def broken(*args, **kwargs):
        raise ConnectionError("store went away")

    t._client.log_batch = broken
    t.log_many([(1, {"loss": 1.0})])
    t.log_many([(2, {"loss": 1.0})])
    t0 = time.perf_counter()
    t.finish()
    assert time.perf_counter() - t0 < 5
    t.log_many([(3, {"loss": 1.0})])
    err = capsys.readouterr().err
    assert err.count("desmoe: warning: MLflow tracking at sqlite:///") == 1
    assert "store went away" in err and "metrics.jsonl still has every metric" in err
    assert not t.enabled


def test_a_missing_artifact_is_reported_and_tracking_stays_on(runs):
    warnings = []
    t = start(new_run_dir(runs, "f"), warnings)
    t.log_artifact(str(runs / "f" / "nope.json"))
    t.log_many([(1, {"loss": 1.0})])
    assert t.enabled and len(warnings) == 1 and "nope.json does not exist" in warnings[0]
    t.finish()
    assert not t.enabled  # after finish every call does nothing
    assert client_for(t.uri).get_run(t.run_id).data.metrics["loss"] == 1.0


def test_disabled_tracker_does_nothing():
    t = Tracker()
    t.log_many([(1, {"loss": 1.0})])
    t.log_artifact("/nonexistent")
    t.finish()
    assert not t.enabled and t.run_id is None
    with pytest.raises(ValueError, match="FINISHED"):
        t.finish("DONE")
