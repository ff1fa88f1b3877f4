"""desmoe.compare: runs side by side (``desmoe compare``), from run directories built by hand with known numbers."""

import json
import os

import pytest

from desmoe import compare, rundir
from desmoe.compare import CompareError, compare_runs, format_table, load_run, main
from desmoe.config import config_from_dict, dump_config

TINY = {"model_type": "qwen3_moe", "hidden_size": 64}
PNG = b"\x89PNG\r\n\x1a\n"


def _results(losses: dict, **metrics) -> dict:
    """An evaluation's results: {set: {loss, ppl, token_accuracy, ...}}; metrics: {name: {set: value}}."""
    out = {s: {"loss": v, "ppl": 2.0 ** v, "token_accuracy": 0.5} for s, v in losses.items()}
    for metric, values in metrics.items():
        for s, v in values.items():
            out[s][metric] = v
    return out


BEFORE = _results({"math": 2.0, "code": 3.0, "holdout": 4.0}, exact_match={"math": 0.1})


def make_run(root, name, *, before=BEFORE, after=None, domains=("math", "code"), finished=True, history=(),
             steps=None, holdout=True, sections=None, model=None, train_time_s=12.5):
    """A run directory as desmoe train leaves it: config.yaml, eval.json, metrics.jsonl, summary.json
    (finished only); ``steps``: the steps metrics.jsonl records (default: all of train.max_steps)."""
    out = os.path.join(str(root), name)
    os.makedirs(out)
    data = {"domains": {d: {"builtin": d} for d in domains}}
    if holdout:
        data["holdout"] = {"builtin": "general"}
    cfg = {"run": {"name": name, "output_dir": out}, "model": model or {"tiny": TINY},
           "train": {"max_steps": 10, "lr": 1e-3}, "data": data, "tracking": {"mlflow": False, "experiment": name}}
    for k, v in (sections or {}).items():
        cfg.setdefault(k, {}).update(v)
    with open(os.path.join(out, rundir.CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(dump_config(config_from_dict(cfg)))
    rundir.write_eval(out, before, after if finished else None, list(history))
    with open(os.path.join(out, rundir.METRICS_FILE), "w", encoding="utf-8") as f:
        for s in steps if steps is not None else range(1, 11):
            f.write(json.dumps({"step": s, "domain": domains[s % len(domains)], "loss": 1.0, "step_time_s": 1.5,
                                "elapsed_s": 1.5 * s}) + "\n")
    if finished:
        rundir.write_json(out, rundir.SUMMARY_FILE, {"output_dir": out, "steps": 10, "mode": cfg.get("method", {}).get(
            "mode", "fft"), "world_size": 2, "ep_size": 1, "train_time_s": train_time_s, "eval_before": before,
            "eval_after": after, "best": None})
    return out


@pytest.fixture
def two_runs(tmp_path):
    """fft: after math 1.0, code 2.0, holdout 4.5 (F +0.5); desmoe (phi 0.5): math 1.2, code 2.2, holdout 4.25."""
    a = make_run(tmp_path, "fft_run", after=_results({"math": 1.0, "code": 2.0, "holdout": 4.5},
                                                     exact_match={"math": 0.25}))
    b = make_run(tmp_path, "desmoe_run", after=_results({"math": 1.25, "code": 2.25, "holdout": 4.25},
                                                        exact_match={"math": 0.5}),
                 sections={"method": {"mode": "desmoe", "phi": 0.5}, "train": {"lr": 3e-4}}, train_time_s=20.0)
    return a, b


# ---- the numbers -------------------------------------------------------------------------------


def test_forgetting_average_loss_and_time_per_run(two_runs, tmp_path):
    res = compare_runs(list(two_runs), write=False)
    fft, des = res["runs"]
    assert (fft["name"], fft["mode"], des["name"], des["mode"]) == ("fft_run", "fft", "desmoe_run", "desmoe")
    assert fft["avg_domain_loss_before"] == 2.5 and fft["avg_domain_loss_after"] == 1.5
    assert des["avg_domain_loss_after"] == 1.75
    assert (fft["holdout_loss_before"], fft["holdout_loss_after"], fft["forgetting"]) == (4.0, 4.5, 0.5)
    assert des["forgetting"] == 0.25
    assert fft["loss_after"] == {"math": 1.0, "code": 2.0} and fft["loss_before"] == {"math": 2.0, "code": 3.0}
    assert fft["eval_after"]["math"] == {"loss": 1.0, "ppl": 2.0, "token_accuracy": 0.5, "exact_match": 0.25}
    assert (fft["train_time_s"], des["train_time_s"], fft["world_size"], fft["steps"]) == (12.5, 20.0, 2, 10)
    assert fft["status"] == "finished" and res["same_base_model"] and res["same_domains"]
    assert res["task_metrics"] == {"math": ["exact_match", "token_accuracy"], "code": ["token_accuracy"]}
    assert res["out"] == str(tmp_path / "compare") and not os.path.exists(res["out"])  # write=False


def test_only_settings_that_differ_are_columns(two_runs):
    res = compare_runs(list(two_runs), write=False)
    # run.name, run.output_dir, tracking.experiment and method.mode differ too, but are never settings
    assert res["settings"] == ["train.lr", "method.phi"]
    assert [r["settings"] for r in res["runs"]] == [{"train.lr": 1e-3, "method.phi": 0.6},
                                                     {"train.lr": 3e-4, "method.phi": 0.5}]
    table = format_table(res)
    head = table.splitlines()[4]
    assert head == ("| run | mode | status | train.lr | method.phi | world size | steps | train time (s) | "
                    "avg domain loss before | avg domain loss after | holdout loss before | holdout loss after | F |")
    assert "| fft_run | fft | finished | 0.001 | 0.6 | 2 | 10 | 12.5 | 2.5000 | 1.5000 | 4.0000 | 4.5000 | +0.5000 |" \
        in table
    assert "| desmoe_run | desmoe | finished | 0.0003 | 0.5 | 2 | 10 | 20.0 | 2.5000 | 1.7500 | 4.0000 | 4.2500 | " \
        "+0.2500 |" in table
    assert "never shown: run.name (differs by construction), run.output_dir" in table
    assert "| fft_run | 2.0000 | 1.0000 | 3.0000 | 2.0000 |" in table  # per-domain loss before/after
    assert "| run | math exact_match before | math exact_match after | math token_accuracy before" in table
    assert "| fft_run | 10.0 | 25.0 | 50.0 | 50.0 | 50.0 | 50.0 |" in table  # task metrics in %


def test_runs_with_the_same_settings_have_no_setting_columns(tmp_path):
    after = _results({"math": 1.0, "code": 2.0, "holdout": 4.5})
    res = compare_runs([make_run(tmp_path, "a", after=after), make_run(tmp_path, "b", after=after)], write=False)
    assert res["settings"] == []
    assert "no other setting differs between the runs" in format_table(res)


def test_one_run_is_a_table_of_one(two_runs):
    res = compare_runs([two_runs[0]], write=False)
    assert len(res["runs"]) == 1 and res["settings"] == []
    assert "| fft_run | fft | finished |" in format_table(res)


def test_different_domains_compare_the_shared_ones_and_say_which_are_left_out(tmp_path):
    a = make_run(tmp_path, "a", domains=("math", "code", "law"),
                 before=_results({"math": 2.0, "code": 3.0, "law": 9.0, "holdout": 4.0}),
                 after=_results({"math": 1.0, "code": 2.0, "law": 8.0, "holdout": 4.5}))
    b = make_run(tmp_path, "b", domains=("code", "math"), after=_results({"math": 1.5, "code": 2.5, "holdout": 4.0}))
    res = compare_runs([a, b], write=False)
    assert res["shared_domains"] == ["math", "code"] and not res["same_domains"]
    assert res["runs"][0]["avg_domain_loss_after"] == 1.5  # law's 8.0 left out
    assert res["runs"][0]["left_out_domains"] == ["law"] and res["runs"][1]["left_out_domains"] == []
    assert not any(k.startswith("data.domains.law.") for k in res["settings"])
    table = format_table(res)
    assert ("The runs' domains differ: compared on the shared ones (math, code); left out per run: a: law."
            in table)
    assert "| a | fft | finished | math, code, law |" in table and "| b | fft | finished | code, math |" in table
    assert "law" not in table.split("## Per-domain loss")[1].split("## Notes")[0]


def test_runs_without_a_shared_domain_are_refused(tmp_path):
    a = make_run(tmp_path, "a", domains=("math",), before=_results({"math": 1.0}), after=_results({"math": 1.0}))
    b = make_run(tmp_path, "b", domains=("law",), before=_results({"law": 1.0}), after=_results({"law": 1.0}))
    with pytest.raises(CompareError, match=r"^the runs have no domain in common \(a: math; b: law\)\. Compare runs"):
        compare_runs([a, b], write=False)


def test_an_unfinished_run_shows_what_it_has_and_is_marked(tmp_path, two_runs):
    hist = [{"step": 4, "mean_loss": 2.0, "loss": 2.0,
             "results": _results({"math": 1.5, "code": 2.5, "holdout": 4.75})}]
    c = make_run(tmp_path, "killed", finished=False, history=hist, steps=range(1, 7))
    with open(os.path.join(c, rundir.METRICS_FILE), "a", encoding="utf-8") as f:
        f.write('{"step": 7, "dom')  # killed mid-line
    run = load_run(c)
    assert not run["finished"] and (run["last_step"], run["elapsed_s"], run["after_step"]) == (6, 9.0, 4)
    res = compare_runs([two_runs[0], c], write=False)
    row = res["runs"][1]
    assert row["status"] == "unfinished at step 6 of 10; 'after' = its eval at step 4"
    assert (row["avg_domain_loss_after"], row["forgetting"], row["train_time_s"], row["steps"]) == (2.0, 0.75, 9.0, 6)
    assert row["world_size"] is None
    table = format_table(res)
    assert "| killed | fft | unfinished at step 6 of 10; 'after' = its eval at step 4 | - | 6 | 9.0 |" in table
    assert "Unfinished (no summary.json): killed;" in table


def test_a_run_killed_before_any_evaluation_after_start(tmp_path, two_runs):
    c = make_run(tmp_path, "early", finished=False, steps=[])
    res = compare_runs([two_runs[0], c], write=False)
    row = res["runs"][1]
    assert row["status"] == "unfinished before its first step; no evaluation after training started"
    assert row["avg_domain_loss_before"] == 2.5 and row["avg_domain_loss_after"] is None and row["forgetting"] is None
    assert "| 2.5000 | - | 4.0000 | - | - |" in format_table(res)
    compare.save_comparison(res)  # the figures leave it out
    assert os.path.getsize(os.path.join(res["out"], "domain_loss_vs_forgetting.png")) > 0


def test_runs_of_different_base_models_are_marked(tmp_path, two_runs):
    model_dir = tmp_path / "base"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    c = make_run(tmp_path, "other_base", model={"path": str(model_dir)},
                 after=_results({"math": 1.0, "code": 2.0, "holdout": 4.5}))
    res = compare_runs([*two_runs, c], write=False)
    assert not res["same_base_model"]
    assert [r["base_model"] for r in res["runs"]] == ["M1", "M1", "M2"]
    assert res["base_models"] == {"M1": "model.tiny qwen3_moe (hidden_size=64)",
                                  "M2": f"model.path {os.path.realpath(model_dir)} (deepseek_v2)"}
    table = format_table(res)
    assert "| run | mode | status | base model |" in table and "| other_base | fft | finished | M2 |" in table
    assert "F is each run's change from its own base model: it is not comparable across base models" in table


def test_tiny_models_with_other_settings_are_other_base_models(tmp_path, two_runs):
    c = make_run(tmp_path, "wider", model={"tiny": dict(TINY, hidden_size=128)},
                 after=_results({"math": 1.0, "code": 2.0, "holdout": 4.5}))
    assert not compare_runs([two_runs[0], c], write=False)["same_base_model"]


def test_a_run_without_holdout_has_no_forgetting(tmp_path, two_runs):
    c = make_run(tmp_path, "no_holdout", holdout=False, before=_results({"math": 2.0, "code": 3.0}),
                 after=_results({"math": 1.0, "code": 2.0}))
    res = compare_runs([two_runs[0], c], write=False)
    assert res["runs"][1]["forgetting"] is None and res["runs"][1]["avg_domain_loss_after"] == 1.5
    table = format_table(res)
    assert "No data.holdout in no_holdout: no holdout loss, no F." in table
    assert "data.holdout differs between runs: their F measure forgetting on different text." in table


def test_runs_with_the_same_dir_name_get_unique_names(tmp_path):
    after = _results({"math": 1.0, "code": 2.0, "holdout": 4.5})
    os.makedirs(tmp_path / "x")
    os.makedirs(tmp_path / "y")
    res = compare_runs([make_run(tmp_path / "x", "run", after=after), make_run(tmp_path / "y", "run", after=after)],
                       write=False)
    assert [r["name"] for r in res["runs"]] == ["x/run", "y/run"]


# ---- bad input ---------------------------------------------------------------------------------


def test_a_missing_path_is_one_clear_error(tmp_path, two_runs):
    with pytest.raises(CompareError, match=r"nope does not exist\. Pass the --output-dir of each desmoe train run"):
        compare_runs([two_runs[0], str(tmp_path / "nope")], write=False)


def test_a_directory_that_is_not_a_run_says_so(tmp_path, two_runs):
    other = tmp_path / "notes"
    other.mkdir()
    with pytest.raises(CompareError) as e:
        compare_runs([two_runs[0], str(other)], write=False)
    assert str(e.value) == str(pytest.raises(rundir.RunDirError, rundir.load_run_config, str(other)).value)
    assert "is not a desmoe run directory: it has no config.yaml" in str(e.value)


def test_a_file_and_a_broken_config_are_clear_errors(tmp_path, two_runs):
    (tmp_path / "x.log").write_text("log")
    with pytest.raises(CompareError, match=r"x.log is a file, not a run directory\. Pass the --output-dir"):
        compare_runs([str(tmp_path / "x.log")], write=False)
    with open(os.path.join(two_runs[1], rundir.CONFIG_FILE), "a", encoding="utf-8") as f:
        f.write("bogus: 1\n")
    with pytest.raises(CompareError, match=r"config.yaml cannot be used: 1 problem\(s\)"):
        compare_runs(list(two_runs), write=False)


def test_a_cut_summary_is_a_clear_error(two_runs):
    path = os.path.join(two_runs[0], rundir.SUMMARY_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"steps": 1')
    with pytest.raises(CompareError, match=r"summary.json cannot be read \(.*\)\. Was the run killed while writing"):
        compare_runs(list(two_runs), write=False)


def test_a_run_given_twice_is_refused(two_runs):
    with pytest.raises(CompareError, match=r"is given twice \(also as .*fft_run\)\. Pass each run directory once\."):
        compare_runs([two_runs[0], two_runs[1], two_runs[0] + os.sep], write=False)


# ---- files and the command ---------------------------------------------------------------------


def test_files_written(two_runs, tmp_path):
    out = tmp_path / "cmp"
    res = compare_runs(list(two_runs), str(out))
    assert res["files"] == [str(out / f) for f in compare.COMPARE_FILES]
    assert (out / "compare.md").read_text() == format_table(res)
    saved = json.loads((out / "compare.json").read_text())
    assert [r["forgetting"] for r in saved["runs"]] == [0.5, 0.25] and saved["settings"] == ["train.lr", "method.phi"]
    for png in ("domain_loss_vs_forgetting.png", "per_domain_loss.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 1000


def test_default_out_is_beside_the_runs_and_skipped_as_a_run(two_runs, tmp_path):
    res = compare_runs(list(two_runs))
    assert res["out"] == str(tmp_path / "compare") and (tmp_path / "compare" / "compare.json").is_file()
    again = compare_runs([*two_runs, str(tmp_path / "compare")])  # as `desmoe compare runs/*/` passes it
    assert len(again["runs"]) == 2 and again["skipped"] == [str(tmp_path / "compare")]
    assert "Skipped (compare outputs, not runs):" in format_table(again)


def test_main_prints_the_table_and_the_files(two_runs, tmp_path, capsys):
    assert main([*two_runs, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# desmoe compare: 2 run(s)") and "| fft_run | fft | finished |" in out
    assert f"written:\n  {tmp_path / 'o' / 'compare.md'}\n" in out


def test_main_reports_bad_input_in_one_paragraph_exit_2(two_runs, tmp_path, capsys):
    assert main([two_runs[0], str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("desmoe: error: ") and "nope does not exist" in captured.err
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # argparse: RUN_DIR is required
        main([])
    assert e.value.code == 2
