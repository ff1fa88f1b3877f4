"""Label-free domains through the real CLI: ``desmoe discover`` on a tiny model, and ``desmoe train --nproc 2``
with data.discover (discovery once, labels in config.yaml, affinity of the discovered domains), stopped and
resumed without rediscovery, then ``desmoe eval --data`` on the true domains."""

import json
import os

import pytest
import yaml

from desmoe.data import example_text
from desmoe.data.builtin import builtin_segments
from tests.integration.launch import desmoe

pytestmark = pytest.mark.integration

DOMAINS = ("math", "law", "translation")
TINY = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16,
        "moe_intermediate_size": 64}


def _unlabelled(tmp_path, n=30, labelled_every=None):
    path = tmp_path / "unlabelled.jsonl"
    with open(path, "w") as f:
        for d in DOMAINS:
            for i, ex in enumerate(builtin_segments(d)[:n]):
                record = {"text": example_text(ex)}
                if labelled_every and i % labelled_every == 0:
                    record["domain"] = d
                f.write(json.dumps(record) + "\n")
    return str(path)


def _config(tmp_path, train, name="cfg.yaml", **data):
    cfg = {"run": {"name": "disc", "seed": 5}, "model": {"tiny": dict(TINY)},
           "parallel": {"ep_size": 2},
           "train": {"max_steps": 6, "micro_batch_size": 2, "lr": 3e-3, "log_every": 2},
           "data": {"seq_len": 64, "tokenizer": "byte", "eval_sequences": 2, **data},
           "method": {"mode": "desmoe", "affinity_update_every": 2}, "eval": {"max_pairs": 2},
           "checkpoint": {"every": 3}}
    if train is not None:
        cfg["data"]["train"] = train
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_discover_cli_writes_labels_report_and_figure_and_refuses_to_overwrite(tmp_path):
    cfg = _config(tmp_path, _unlabelled(tmp_path, n=20, labelled_every=4), discover={"clusters": 3})
    out = tmp_path / "found"
    proc = _ok(desmoe("discover", "--config", cfg, "--out", str(out), timeout=120))
    assert "data.discover: 15 of 60 records carry a domain label; labels are ignored for training" in proc.stdout
    assert f"data.discover.labels={out}/records.jsonl" in proc.stdout
    records = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(records) == 60 and {r["domain"] for r in records} == {"cluster_0", "cluster_1", "cluster_2"}
    assert sum("given_domain" in r for r in records) == 15
    report = json.load(open(out / "report.json"))
    assert report["k"] == 3 and report["given"]["examples"] == 15
    assert (out / "report.md").is_file() and (out / "clusters.png").stat().st_size > 1000

    again = desmoe("discover", "--config", cfg, "--out", str(out), timeout=120)
    assert again.returncode == 2 and "already holds discovered labels" in again.stderr and "--overwrite" in again.stderr
    _ok(desmoe("discover", "--config", cfg, "--out", str(out), "--overwrite", "data.discover.clusters=2",
               timeout=120))
    assert {json.loads(line)["domain"] for line in open(out / "records.jsonl")} == {"cluster_0", "cluster_1"}
    too_many = desmoe("discover", "--config", cfg, "--out", str(tmp_path / "x"), "data.discover.clusters=99",
                      timeout=120)
    assert too_many.returncode == 2 and "data.discover.clusters: 99 but data.train has 60 example" in too_many.stderr
    assert "Traceback" not in too_many.stderr and not (tmp_path / "x").exists()


def test_train_discovers_once_resumes_and_evaluates_on_the_true_domains(tmp_path):
    cfg = _config(tmp_path, _unlabelled(tmp_path), discover={"clusters": 3})
    run = tmp_path / "run"
    first = _ok(desmoe("train", "--nproc", "2", "--config", cfg, "--output-dir", str(run), "--stop-at-step", "3"))
    assert "data.discover: 90 records clustered, none with a domain label" in first.stdout
    labels = run / "discovery" / "records.jsonl"
    assert labels.is_file() and (run / "discovery" / "report.json").is_file()
    stamp = labels.stat().st_mtime_ns
    saved = yaml.safe_load(open(run / "config.yaml"))
    names = ["cluster_0", "cluster_1", "cluster_2"]
    assert saved["data"]["discover"]["labels"] == str(labels) and saved["data"]["train"] == str(labels)
    assert list(saved["data"]["domains"]) == names
    assert [r["domain"] for r in json.load(open(run / "data_summary.json"))] == names

    second = _ok(desmoe("train", "--nproc", "2", "--resume", str(run)))
    assert "resumed from" in second.stdout and "data.discover:" not in second.stdout
    assert labels.stat().st_mtime_ns == stamp  # no rediscovery
    assert json.load(open(run / "summary.json"))["steps"] == 6
    updates = sorted(p for p in os.listdir(run / "affinity") if p.endswith(".json"))
    assert updates and json.load(open(run / "affinity" / updates[-1]))["domains"] == names

    true_cfg = _config(tmp_path, None, name="true.yaml", domains={d: {"builtin": d, "max_examples": 30}
                                                                  for d in DOMAINS})
    proc = _ok(desmoe("eval", str(run), "--data", true_cfg, timeout=300))
    result = json.load(open(run / "eval_step6_true.json"))
    assert set(DOMAINS) <= set(result["results"]) and "on the data of" in proc.stdout
    bad = desmoe("eval", str(run), "--data", str(tmp_path / "missing.yaml"), timeout=120)
    assert bad.returncode == 2 and "--data" in bad.stderr and "Traceback" not in bad.stderr
