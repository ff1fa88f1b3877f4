"""Bad input through the real CLI: one clear paragraph, exit code 2, no traceback, nothing written."""

import json
import os

import pytest
import yaml

from tests.conftest import CONFIGS, tiny_config_dict
from tests.integration.launch import desmoe

pytestmark = pytest.mark.integration


def _write(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def _assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    assert proc.stderr.startswith("desmoe: error:"), proc.stderr[:2000]
    for n in needles:
        assert n in proc.stderr, proc.stderr


def _cases(tmp_path):
    good = tiny_config_dict(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 0}))
    yield "missing config", [str(tmp_path / "nope.yaml")], ["does not exist"]
    yield "yaml syntax", [_write(tmp_path, "train:\n  max_steps: [1\n")], ["YAML syntax error at line"]
    yield "unknown key", [_write(tmp_path, dict(good, train={"max_step": 3}))], ["train.max_step: unknown key"]
    yield "unknown model type", [_write(tmp_path, dict(good, model={"tiny": {"model_type": "bert"}}))], \
        ["'bert' is not supported", "qwen3_moe"]
    yield "model dir missing", [_write(tmp_path, dict(good, model={"path": str(tmp_path / "no-model")}))], \
        ["is not a directory"]
    yield "model without MoE", [_write(tmp_path, dict(good, model={"path": str(tmp_path / "dense")}))], \
        ["has no MoE layers", "num_experts"]
    yield "data file missing", [_write(tmp_path, dict(good, data={"domains": {"x": {"train": "none.jsonl"}}}))], \
        ["data.domains.x.train", "does not exist"]
    yield "empty domain", [_write(tmp_path, dict(good, data={"domains": {"x": {"train": str(empty)}}}))], \
        ["domain(s) x have no examples"]
    yield "ep_size vs world", [_write(tmp_path, dict(good, parallel={"ep_size": 2})), "--nproc", "1"], \
        ["does not divide the world size 1"]


def test_bad_inputs_fail_cleanly(tmp_path):
    for name, args, needles in _cases(tmp_path):
        proc = desmoe("train", "--config", *args, timeout=120)
        try:
            _assert_clean_failure(proc, *needles)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    assert not (tmp_path / "run").exists()  # nothing was written by any failed run


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = desmoe("train", "--config", _write(tmp_path, tiny_config_dict(tmp_path)), timeout=120)
    _assert_clean_failure(proc, "already holds a run", "run.overwrite=true")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_help_and_unknown_command():
    assert desmoe("--help").returncode == 0
    proc = desmoe("fly")
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr
    listing = desmoe("config")
    assert listing.returncode == 0 and "ep_size" in listing.stdout and "max_steps" in listing.stdout
