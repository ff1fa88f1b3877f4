"""The real recipe on 2 ranks over gloo with AutoEP ep_size 2: it learns, splits experts, keeps replicas equal."""

import json
import os

import pytest

from tests.conftest import CONFIGS
from tests.integration.launch import desmoe, torchrun

pytestmark = pytest.mark.integration

DEMO = os.path.join(CONFIGS, "demo.yaml")
# The demo, made small: 2 layers of width 64 and 20 steps.
SHORT = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.max_steps=20", "train.log_every=5", "train.warmup_steps=2", "data.seq_len=64",
         "data.domains.code.max_examples=60", "data.domains.law.max_examples=200",
         "data.domains.math.max_examples=800"]


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_experts_split_across_ranks_and_replicated_weights_stay_identical(tmp_path, zero_stage):
    torchrun("train_worker.py", str(tmp_path), DEMO, f"parallel.zero_stage={zero_stage}", *SHORT)
    ranks = [json.loads((tmp_path / f"inspect_rank{r}.json").read_text()) for r in (0, 1)]

    # Each MoE layer holds half of the 8 experts on each rank: rank r owns experts 4r..4r+3.
    for r, info in enumerate(ranks):
        assert [(l["ep_rank"], l["num_local_experts"], l["num_experts"]) for l in info["layers"]] == [(r, 4, 8)] * 2
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys()
    experts = [n for n in p0 if p0[n]["expert"]]
    replicated = [n for n in p0 if not p0[n]["expert"]]
    assert len(experts) == 2 * 3  # w1, w2, w3 of two MoE layers
    assert any("router" in n for n in replicated) and any("embed" in n for n in replicated)
    for n in experts:
        assert p0[n]["shape"][0] == 4 and p0[n]["shape"] == p1[n]["shape"]
        assert p0[n]["after"] != p1[n]["after"], f"{n}: ranks hold different experts, so weights must differ"
        assert p0[n]["after"] != p0[n]["before"], f"{n}: experts were trained"
    for n in replicated:
        assert p0[n]["after"] == p1[n]["after"], f"{n}: replicated weight diverged between ranks"
        assert p0[n]["after"] != p0[n]["before"], f"{n}: weight was trained"

    # The loss went down, on held-out rows of every domain.
    summary = ranks[0]["summary"]
    for domain, before in summary["eval_loss_before"].items():
        assert summary["eval_loss_after"][domain] < before - 0.5, domain
    assert summary["eval_loss_before"] == ranks[1]["summary"]["eval_loss_before"]


def test_cli_run_writes_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = desmoe("train", "--config", DEMO, "--nproc", "2", "--output-dir", str(out), *SHORT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"run directory: {out}" in proc.stdout
    for domain in ("math", "code", "law"):
        assert any(line.startswith(domain) for line in proc.stdout.splitlines())

    rows = _read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))  # accumulation 1: one domain per step
    for r in rows:
        assert {"step", "domain", "loss", "lr", "tokens_per_s"} <= r.keys()
        assert r["domain"] in ("math", "code", "law")
    first, last = rows[:5], rows[-5:]
    assert sum(r["loss"] for r in last) / 5 < sum(r["loss"] for r in first) / 5 - 1.0

    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 20 and resolved["parallel"]["ep_size"] == 2
    assert resolved["run"]["output_dir"] == str(out)
    summary = {r["domain"]: r for r in json.loads((out / "data_summary.json").read_text())}
    assert set(summary) == {"math", "code", "law"} and summary["code"]["examples"] == 60
    assert all(r["skipped"] == 0 and r["trained_tokens"] > 0 for r in summary.values())
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["expert_parallel"]["autoep_size"] == 2
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step20"
    files = os.listdir(ckpt / "step20")
    assert any("expert" in f for f in files), files  # expert shards saved
    assert any(f.startswith("mp_rank_00_model_states") for f in files), files

    # Same seed, same run: identical metrics (timings aside).
    out2 = tmp_path / "run2"
    proc = desmoe("train", "--config", DEMO, "--nproc", "2", "--output-dir", str(out2), *SHORT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    strip = lambda rs: [(r["step"], r["domain"], r["loss"]) for r in rs]  # noqa: E731
    assert strip(_read_metrics(out2)) == strip(rows)
