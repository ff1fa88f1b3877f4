"""python -m benchmarks.reproduce --quick: the whole experiment pipeline runs and writes well-formed results.

The numbers are not asserted (they are what the report is for), except the base model's one
promise: its general-holdout loss is below the unigram baseline's.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.reproduce import PLANS, TABLE_MODES
from tests.integration.launch import ROOT, run_env

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_reproduce_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "reproduce"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--quick", "--out", str(out)],
                          env=run_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    res = json.loads((out / "results.json").read_text())
    plan = PLANS["quick"]
    for key in ("base_model", "runs", "table", "forgetting_vs_domains", "time_to_target", "overhead", "targets",
                "timing", "plots", "paper"):
        assert key in res, key
    base = res["base_model"]
    assert base["holdout_loss"] < base["unigram_holdout_loss"]

    rows = res["table"]["rows"]
    assert [r["mode"] for r in rows] == ["base", *TABLE_MODES]
    for r in rows:
        assert set(r["loss"]) == set(plan["domains"])
        assert all(math.isfinite(v) for v in [*r["loss"].values(), r["holdout_loss"], r["forgetting"]])

    f = res["forgetting_vs_domains"]
    assert f["counts"] == plan["domain_counts"]
    assert set(f["forgetting"]) == set(plan["forgetting_modes"])
    assert all(len(v) == len(plan["domain_counts"]) for v in f["forgetting"].values())
    during = res["holdout_during_training"]  # general-holdout loss at every evaluation of the (a) runs
    assert set(during) == set(TABLE_MODES) and all(len(v) >= 3 and v[0][0] == 0 for v in during.values())
    assert len(res["runs"]) == len(TABLE_MODES) + len(plan["forgetting_modes"]) * (len(plan["domain_counts"]) - 1)

    c = res["time_to_target"]
    assert c["primary"] == "eval"  # the runs on all domains evaluate every eval_every steps
    for kind in ("eval", "train_loss"):
        assert set(c[kind]["methods"]) == set(TABLE_MODES) and c[kind]["target_avg_loss"] > 0
        assert c[kind]["methods"]["fft"]["reached"]  # fft reaches 1.02 x its own best by definition

    o = res["overhead"]
    assert o["step_time"]["all"]["fft_s"] > 0 and o["step_time"]["all"]["other_s"] > 0
    assert len(o["peak_rss_mib"]["fft"]) == plan["repeats"] and all(v > 0 for v in o["peak_rss_mib"]["desmoe"])
    assert all(len(r["peak_rss_mib"]) == 2 for r in res["runs"].values())  # one peak per rank, 2 ranks
    assert len(res["targets"]) >= 3 and all({"name", "measured", "target", "met"} <= t.keys() for t in res["targets"])

    report = (out / "report.md").read_text()
    for heading in ("## Base model", "## (a) Tables 1-2", "## (b) Figure 2", "## (c) Figure 3", "## (d) Overhead",
                    "## Targets"):
        assert heading in report
    assert "| mode | " + " | ".join(plan["domains"]) + " |" in report
    assert report.count("|---|") >= 6  # a table per section

    assert len(res["plots"]) == 4
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in report, name


def _micro_recipe():
    import copy

    from benchmarks import pretrain_base as pb

    r = copy.deepcopy(pb.QUICK)
    r["name"] = "micro"
    r["model"].update(hidden_size=32, num_hidden_layers=1, head_dim=8, intermediate_size=64, num_experts=4,
                      moe_intermediate_size=16)
    r["train"].update(steps=4, batch_size=2, warmup_steps=1, log_every=2)
    return r


def test_pretraining_is_deterministic_cached_and_atomic(tmp_path, monkeypatch):
    from benchmarks import pretrain_base as pb

    recipe = _micro_recipe()
    first, trained = pb.ensure_base_model(recipe, str(tmp_path / "a"), log=lambda m: None)
    assert trained and first.startswith(str(tmp_path / "a"))
    again, trained = pb.ensure_base_model(recipe, str(tmp_path / "a"), log=lambda m: None)
    assert again == first and not trained  # cached: nothing trained
    second, _ = pb.ensure_base_model(recipe, str(tmp_path / "b"), log=lambda m: None)
    a, b = pb.load_recipe_info(first), pb.load_recipe_info(second)
    def losses(info):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in info["curve"]]

    assert a["final"] == b["final"] and losses(a) == losses(b)
    assert a["data"] == b["data"] and a["tokenizer_sha256"] == b["tokenizer_sha256"]
    with open(os.path.join(first, "model.safetensors"), "rb") as fa, \
            open(os.path.join(second, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()
    assert {"config.json", "model.safetensors", "tokenizer.model", "recipe.json"} <= set(os.listdir(first))

    # a run killed half-way leaves nothing in the cache
    def killed(recipe, out_dir, **kw):
        open(os.path.join(out_dir, "config.json"), "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(pb, "pretrain", killed)
    with pytest.raises(KeyboardInterrupt):
        pb.ensure_base_model(recipe, str(tmp_path / "c"), log=lambda m: None)
    assert list((tmp_path / "c").iterdir()) == []
