"""desmoe.rundir: the files a run writes into its directory, and reading a run directory back."""

import json
import os

import pytest
import torch
from PIL import Image

from desmoe import rundir
from desmoe.config import ConfigError, DataSection, DomainSection, dump_config, load_config
from desmoe.data import ByteTokenizer, build_domain_data
from tests.conftest import tiny_config_dict


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def _metric_line(step, domain="math"):
    return json.dumps({"step": step, "domain": domain, "loss": 1.0 / step}) + "\n"


# ---- metrics.jsonl -----------------------------------------------------------------------------


def test_open_metrics_of_a_new_run_truncates_an_old_file(tmp_path):
    (tmp_path / rundir.METRICS_FILE).write_text(_metric_line(1) + _metric_line(2))
    with rundir.open_metrics(str(tmp_path), 0) as f:
        assert f.mode == "w"
        f.write(_metric_line(1, "code"))
    assert _lines(tmp_path / rundir.METRICS_FILE) == [_metric_line(1, "code")]
    assert not (tmp_path / rundir.DISCARDED_METRICS_FILE).exists()


def test_open_metrics_of_a_resume_without_a_file_starts_one(tmp_path):
    with rundir.open_metrics(str(tmp_path), 5) as f:
        f.write(_metric_line(6))
    assert _lines(tmp_path / rundir.METRICS_FILE) == [_metric_line(6)]
    assert not (tmp_path / rundir.DISCARDED_METRICS_FILE).exists()


def test_open_metrics_of_a_resume_moves_repeated_steps_and_a_cut_line_aside(tmp_path):
    kept = [_metric_line(1), _metric_line(1, "code"), _metric_line(2), _metric_line(2, "code")]
    later = [_metric_line(3), _metric_line(3, "code"), _metric_line(4)]
    cut = '{"step": 4, "domain": "co'  # the job was killed mid-write: no newline, not JSON
    (tmp_path / rundir.METRICS_FILE).write_text("".join(kept + later) + cut)
    earlier_discard = _metric_line(9, "law")
    (tmp_path / rundir.DISCARDED_METRICS_FILE).write_text(earlier_discard)

    f = rundir.open_metrics(str(tmp_path), 2)
    try:
        assert f.mode == "a"
        f.write(_metric_line(3, "law"))
    finally:
        f.close()

    assert _lines(tmp_path / rundir.METRICS_FILE) == kept + [_metric_line(3, "law")]
    # appended after what an earlier resume discarded; the cut line gets its newline
    assert _lines(tmp_path / rundir.DISCARDED_METRICS_FILE) == [earlier_discard] + later + [cut + "\n"]
    assert not (tmp_path / (rundir.METRICS_FILE + ".tmp")).exists()


def test_open_metrics_moves_lines_without_a_step_and_keeps_the_checkpoint_step(tmp_path):
    lines = [_metric_line(4), "[1, 2]\n", '{"domain": "math"}\n', _metric_line(5)]
    (tmp_path / rundir.METRICS_FILE).write_text("".join(lines))
    rundir.open_metrics(str(tmp_path), 4).close()
    assert _lines(tmp_path / rundir.METRICS_FILE) == [_metric_line(4)]
    assert _lines(tmp_path / rundir.DISCARDED_METRICS_FILE) == lines[1:]


# ---- config.yaml -------------------------------------------------------------------------------


def test_write_run_config_of_a_new_run_replaces_the_file(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("old: 1\n")
    rundir.write_run_config(str(tmp_path), "new: 2\n", resumed_at=None)
    assert (tmp_path / rundir.CONFIG_FILE).read_text() == "new: 2\n"
    assert sorted(os.listdir(tmp_path)) == [rundir.CONFIG_FILE]


def test_write_run_config_of_a_resume_with_the_same_settings_keeps_one_file(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("same: 1\n")
    rundir.write_run_config(str(tmp_path), "same: 1\n", resumed_at=40)
    assert sorted(os.listdir(tmp_path)) == [rundir.CONFIG_FILE]
    assert (tmp_path / rundir.CONFIG_FILE).read_text() == "same: 1\n"


def test_write_run_config_of_a_resume_with_other_settings_keeps_the_old_one_beside(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("train: {lr: 1}\n")
    rundir.write_run_config(str(tmp_path), "train: {lr: 2}\n", resumed_at=40)
    assert sorted(os.listdir(tmp_path)) == ["config.before_resume_step40.yaml", rundir.CONFIG_FILE]
    assert (tmp_path / "config.before_resume_step40.yaml").read_text() == "train: {lr: 1}\n"
    assert (tmp_path / rundir.CONFIG_FILE).read_text() == "train: {lr: 2}\n"


# ---- preflight ---------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_check_output_dir_names_the_dir_below_an_unwritable_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o555)
    target = str(parent / "a" / "b")
    try:
        with pytest.raises(ConfigError) as e:
            rundir.check_output_dir(target, need=0)
    finally:
        os.chmod(parent, 0o755)
    assert f"run.output_dir: {target} cannot be created or written ({parent} is not writable)" in str(e.value)


def test_check_output_dir_reports_free_and_needed_mebibytes(tmp_path):
    need = 2**70  # more than any file system has
    with pytest.raises(ConfigError) as e:
        rundir.check_output_dir(str(tmp_path / "new" / "run"), need=need)
    (problem,) = e.value.problems
    assert problem.startswith(f"run.output_dir: {tmp_path} has ")  # the nearest existing folder is checked
    assert f"one checkpoint needs about {need / 2**20:,.0f} MiB" in problem
    rundir.check_output_dir(str(tmp_path / "new" / "run"), need=0)
    assert not (tmp_path / "new").exists()  # a check only: nothing is created


def test_checkpoint_bytes_is_16_bytes_a_parameter_plus_a_tenth():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 2, bias=False))  # 55 + 10 params
    assert rundir.checkpoint_bytes(model) == int(65 * 16 * 1.1) == 1144


# ---- data summary ------------------------------------------------------------------------------


def _scanned_domains(tmp_path):
    """Two domains, one bad line in a's file and one in the mixed file (skipped), one mixed record for a."""
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"text": f"alpha {i}"}) + "\n" for i in range(12)) + "{not json\n")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f" a{i}"}) + "\n" for i in range(12)))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"domain": "a", "text": "alpha mixed"}) + "\ngarbage\n")
    cfg = DataSection(domains={"a": DomainSection(train=str(a)),
                               "b": DomainSection(train=str(b), format="prompt_response")},
                      train=str(mixed), seq_len=16, eval_sequences=1, on_bad_record="skip")
    return build_domain_data(cfg, ByteTokenizer())


def test_data_summary_rows_are_the_domains_numbers_and_the_skipped_records(tmp_path):
    domains, scan = _scanned_domains(tmp_path)
    table, rows = rundir.data_summary(domains, scan)

    assert [r["domain"] for r in rows] == ["a", "b", "data.train"]
    a, b, mixed = rows
    # 12 lines of a.jsonl + the mixed file's record; bytes: "alpha 0".."alpha 9", "alpha 10", "alpha 11", "alpha mixed"
    assert a["examples"] == 13 and a["tokens"] == 10 * 7 + 2 * 8 + 11
    assert a["skipped"] == 1 and a["first_skipped"].startswith(f"{tmp_path / 'a.jsonl'}:13: malformed JSON")
    assert b["skipped"] == 0 and b["first_skipped"] is None and b["metrics"] == ["exact_match"]
    assert mixed == {"domain": "data.train", "skipped": 1, "first_skipped": scan["data.train"].first_skip}
    assert mixed["first_skipped"].startswith(f"{tmp_path / 'mixed.jsonl'}:2: malformed JSON")
    for row in (a, b):
        d = domains[row["domain"]]
        assert row["trained_tokens"] == d.trained_tokens and row["truncated"] == row["split"] == 0
        assert row["train_seqs"] == d.train_ids.shape[0] and row["eval_seqs"] == d.eval_ids.shape[0] == 1
        assert row["eval_examples"] == len(d.eval_examples) > 0
    assert json.loads(json.dumps(rows)) == rows  # saved as data_summary.json

    lines = table.splitlines()
    assert lines[0].split() == ["domain", "examples", "tokens", "trained", "truncated", "split", "skipped", "train",
                                "seqs", "eval", "seqs", "metric"]
    assert lines[1].split() == ["a", "13", "97", str(a["trained_tokens"]), "0", "0", "1", str(a["train_seqs"]), "1",
                                "token_accuracy"]
    assert lines[2].split() == ["b", "12", str(b["tokens"]), str(b["trained_tokens"]), "0", "0", "0",
                                str(b["train_seqs"]), "1", "exact_match"]
    assert lines[0].index("metric") == lines[1].index("token_accuracy") == lines[2].index("exact_match")  # columns
    assert lines[3:] == [f"a: skipped 1 bad record(s); first: {a['first_skipped']}",
                         f"data.train: skipped 1 bad record(s); first: {mixed['first_skipped']}"]


# ---- eval, affinity, artifacts -----------------------------------------------------------------


BEFORE = {"math": {"loss": 2.0, "token_accuracy": 0.25}, "code": {"loss": 3.0, "token_accuracy": 0.125}}
AFTER = {"math": {"loss": 1.5, "token_accuracy": 0.5}, "code": {"loss": 2.5, "token_accuracy": 0.375}}


def test_write_eval_before_and_after_without_history(tmp_path):
    rundir.write_eval(str(tmp_path), BEFORE, AFTER, [])
    assert json.loads((tmp_path / "eval.json").read_text()) == {"before": BEFORE, "after": AFTER, "history": []}
    md = (tmp_path / "eval.md").read_text()
    assert md.startswith(f"# Evaluation of {tmp_path}\n\n")
    assert "| set | loss before | loss after | token_accuracy before | token_accuracy after |" in md
    assert "| math | 2.0000 | 1.5000 | 0.2500 | 0.5000 |" in md
    assert "| code | 3.0000 | 2.5000 | 0.1250 | 0.3750 |" in md
    assert "During training" not in md and md.endswith("|\n")


def test_write_eval_during_training_has_the_history_section(tmp_path):
    history = [{"step": 10, "mean_loss": 2.25}, {"step": 20, "mean_loss": 1.98772}]
    rundir.write_eval(str(tmp_path), BEFORE, None, history)
    assert json.loads((tmp_path / "eval.json").read_text()) == {"before": BEFORE, "after": None, "history": history}
    md = (tmp_path / "eval.md").read_text()
    assert "| set | loss | token_accuracy |" in md and "before" not in md  # only the one set of numbers
    assert "| math | 2.0000 | 0.2500 |" in md
    assert md.endswith("## During training\n\n| step | mean domain loss |\n|---|---|\n"
                       "| 10 | 2.2500 |\n| 20 | 1.9877 |\n")


def _affinity_record(step=12):
    return {"step": step, "domains": ["math", "code"], "layers": [0, 2],
            "affinity": [[[0.9, 0.1, -1.0], [0.2, 0.8, 0.5]], [[0.5, 0.5, 0.0], [1.0, 0.0, 0.3]]],
            "masks": [[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [1, 0, 0]]]}


def test_write_affinity_writes_the_record_and_its_heatmap(tmp_path):
    record = _affinity_record()
    rundir.write_affinity(str(tmp_path), record)
    rundir.write_affinity(str(tmp_path), _affinity_record(step=123456))  # the folder exists already
    folder = tmp_path / rundir.AFFINITY_DIR
    assert sorted(os.listdir(folder)) == ["step000012.json", "step000012.png", "step123456.json", "step123456.png"]
    assert json.loads((folder / "step000012.json").read_text()) == record
    assert "\n" not in (folder / "step000012.json").read_text()  # one line
    with Image.open(folder / "step000012.png") as img:
        assert img.format == "PNG" and img.width > 3 * 22 and img.height > 2 * 2 * 22


def test_run_artifacts_lists_only_what_exists_in_order(tmp_path):
    assert rundir.run_artifacts(str(tmp_path)) == []
    for name in ("eval.md", rundir.SUMMARY_FILE, "metrics.jsonl"):
        (tmp_path / name).write_text("{}")
    (tmp_path / rundir.AFFINITY_DIR).mkdir()
    assert rundir.run_artifacts(str(tmp_path)) == [(str(tmp_path / "summary.json"), None),
                                                   (str(tmp_path / "eval.md"), None),
                                                   (str(tmp_path / "affinity"), "affinity")]


# ---- reading a run back ------------------------------------------------------------------------


def test_load_run_config_of_a_missing_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(rundir.RunDirError, match=f"run directory '{missing}' does not exist or is not a directory"):
        rundir.load_run_config(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match="does not exist or is not a directory"):
        rundir.load_run_config(str(tmp_path / "file"))


def test_load_run_config_of_a_dir_without_config(tmp_path):
    (tmp_path / rundir.METRICS_FILE).write_text("")
    with pytest.raises(rundir.RunDirError) as e:
        rundir.load_run_config(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path} is not a desmoe run directory: it has no config.yaml.")


def test_load_run_config_of_a_broken_config(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("train: {max_stepz: 3}\n")
    with pytest.raises(rundir.RunDirError) as e:
        rundir.load_run_config(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / rundir.CONFIG_FILE} cannot be used: ")
    assert "train.max_stepz: unknown key" in str(e.value)
    assert isinstance(e.value.__cause__, ConfigError)


def test_load_run_config_reads_what_dump_config_wrote(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)), ["train.max_steps=7", "train.lr=3e-4"])
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_run_config(str(run), dump_config(cfg), resumed_at=None)
    back = rundir.load_run_config(str(run))
    assert back.train.max_steps == 7 and back.train.lr == pytest.approx(3e-4)
    assert back.run.output_dir == str(run) and back.data.domains["math"].builtin == "math"
    assert dump_config(back) == dump_config(cfg)
