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

from benchmarks.reproduce import BASELINES, FIGURE2_ROLES, PLANS, run_name, settings, sweep_runs
from tests.integration.launch import ROOT, run_env

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


def _reproduce(out, *extra):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--quick", "--out", str(out), *extra],
                          env=run_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_quick_reproduce_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "reproduce"
    first = _reproduce(out)
    assert "sweep runs +" in first.stdout and "estimated" in first.stdout  # the plan and its estimate, at start

    res = json.loads((out / "results.json").read_text())
    plan = PLANS["quick"]
    sets = settings(plan)
    for key in ("base_model", "runs", "status", "sweep", "figure2", "time_to_target", "overhead", "targets",
                "timing", "plots", "paper", "paper_rows"):
        assert key in res, key
    base = res["base_model"]
    assert base["holdout_loss"] < base["unigram_holdout_loss"]
    n_sweep = len(sweep_runs(plan))
    n_fig2 = (len(plan["domain_counts"]) - 1) * len(plan["seeds"]) * len(FIGURE2_ROLES)
    assert res["status"]["counts"] == {"ok": n_sweep + n_fig2} and res["status"]["failed"] == []
    assert len(res["runs"]) == n_sweep + n_fig2 == res["planned_runs"]
    assert all(len(r["peak_rss_mib"]) == 2 for r in res["runs"].values())  # one peak per rank, 2 ranks

    sw = res["sweep"]
    assert set(sw["by_setting"]) == set(sets)  # every mode and the variant
    for s, groups in sw["by_setting"].items():
        assert [g["lr"] for g in groups] == sets[s]["lrs"]
        for g in groups:
            assert g["seeds"] == plan["seeds"] and set(g["loss"]) == set(plan["domains"])
            assert all(math.isfinite(v) for v in [*g["loss"].values(), g["avg_domain_loss"]["mean"],
                                                   g["forgetting"]["mean"]])
            assert all(0 < st <= plan["steps_per_domain"] * len(plan["domains"]) for st in g["best_step"])
    assert set(sw["fronts"]) == set(sets) and all(sw["fronts"].values())
    assert {"desmoe vs fft", "desmoe vs esft_gate", "desmoe vs esft_token", "desmoe vs lora"} <= set(
        sw["front_comparison"])

    f = res["figure2"]
    assert f["counts"] == plan["domain_counts"] and set(f["choice"]) == set(FIGURE2_ROLES)
    assert f["choice"]["fft"]["lr"] == sw["fft_best"]["lr"]
    for role, row in f["forgetting"].items():
        assert len(row) == len(plan["domain_counts"]) and all(x is not None and x["n"] == len(plan["seeds"])
                                                              for x in row), role
    c = res["time_to_target"]
    assert c["target_avg_loss"] > 0 and set(c["settings"]) == set(sets)
    assert c["settings"]["fft"]["reached"]  # fft's best LR reaches 1.02 x its own best by definition
    assert res["overhead"]["step_time"]["all"]["fft_s"] > 0 and res["overhead"]["step_time"]["all"]["other_s"] > 0
    assert len(res["targets"]) == 2 + len(BASELINES) and all({"name", "measured", "target", "met", "detail"} <= t.keys()
                                            for t in res["targets"])

    report = (out / "report.md").read_text()
    for heading in ("## Base model", "## Sweep", "## Pareto fronts", "## Figure 2", "## Time to target",
                    "## Step time", "## Beside the paper", "## Targets"):
        assert heading in report
    assert "| mode | lr | " + " | ".join(plan["domains"]) + " | holdout |" in report
    assert run_name("desmoe", 1e-3, 1, len(plan["domains"])) in res["runs"]
    assert len(res["plots"]) == 5
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in report, name

    # resumable: --analyse-only runs nothing and finds every run; --reuse runs nothing either
    again = _reproduce(out, "--analyse-only")
    assert ": ok," not in again.stdout
    res2 = json.loads((out / "results.json").read_text())
    assert res2["status"]["counts"] == res["status"]["counts"] and res2["sweep"]["fronts"] == sw["fronts"]
    reused = _reproduce(out, "--reuse")
    assert json.loads((out / "results.json").read_text())["reused_runs"] == list(res["runs"])
    assert ": ok," not in reused.stdout


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
