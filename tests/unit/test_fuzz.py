"""Hostile and random inputs to the config loader and the data reader: every input ends in success or a
clean error (ConfigError / DataError), never another exception, never executed code."""

import json
import os
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desmoe.config import ConfigError, config_from_dict, load_config, validate
from desmoe.data import DataError, load_domain_examples

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
keys = st.one_of(st.sampled_from(["run", "model", "train", "data", "method", "parallel", "eval", "tracking",
                                  "checkpoint", "tiny", "domains", "max_steps", "lr", "ep_size", "mode", "seq_len",
                                  "train", "builtin", "weight", "path", "output_dir"]), st.text(max_size=8))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=20)


@FUZZ
@given(tree=st.dictionaries(keys, trees, max_size=6))
def test_config_trees_end_in_a_config_or_a_config_error(tree, tmp_path):
    try:
        cfg = config_from_dict(tree, source="fuzz")
        validate(cfg)
    except ConfigError as e:
        assert str(e).startswith(f"{len(e.problems)} problem(s)")


@FUZZ
@given(text=st.text(alphabet=string.printable + "\u00e9\u4e2d\x00", max_size=300))
def test_config_text_ends_in_a_config_or_a_config_error(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path))
    except ConfigError:
        pass


@FUZZ
@given(overrides=st.lists(st.text(max_size=30), max_size=4))
def test_overrides_end_in_a_config_or_a_config_error(overrides, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {domains: {math: {builtin: math}}}\n", encoding="utf-8")
    try:
        load_config(str(path), overrides)
    except ConfigError:
        pass


@pytest.mark.parametrize("payload", [
    "run: !!python/object/apply:os.system ['touch {marker}']\n",
    "run: !!python/name:os.system\n",
    "run: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "x: &a [*a]\n",
])
def test_yaml_tags_never_run_code(payload, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.yaml"
    path.write_text(payload.format(marker=marker), encoding="utf-8")
    with pytest.raises(ConfigError):
        load_config(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("value", ["a\x00b", "~nobody_such_user/x", "../" * 40 + "etc/passwd"])
def test_path_tricks_in_the_config_get_a_clean_answer(value, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"domains": {"d": {"train": value}}}}), encoding="utf-8")
    with pytest.raises(ConfigError):
        cfg = load_config(str(path))
        load_domain_examples(cfg.data)


def _data_cfg(tmp_path, name, on_bad_record, fmt="text"):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"on_bad_record": on_bad_record,
                                             "domains": {"d": {"train": name, "format": fmt}}}}), encoding="utf-8")
    return load_config(str(path)).data


lines = st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
                  st.dictionaries(st.sampled_from(["text", "prompt", "response", "messages", "domain", "x"]),
                                  st.one_of(scalars, st.lists(st.dictionaries(
                                      st.sampled_from(["role", "content"]), st.text(max_size=10), max_size=2),
                                      max_size=3)), max_size=3).map(lambda d: json.dumps(d).encode()))


@FUZZ
@given(records=st.lists(lines, max_size=8), fmt=st.sampled_from(["text", "prompt_response", "chat"]),
       on_bad=st.sampled_from(["error", "skip"]))
def test_data_files_end_in_examples_or_a_data_error(records, fmt, on_bad, tmp_path):
    name = f"d{abs(hash((tuple(records), fmt, on_bad)))}.jsonl"
    (tmp_path / name).write_bytes(b"\n".join(records))
    try:
        cfg = _data_cfg(tmp_path, name, on_bad, fmt)
        examples, report = load_domain_examples(cfg)
    except (DataError, ConfigError) as e:
        assert str(e)
        return
    assert isinstance(examples["d"], list) and examples["d"]
    if on_bad == "error":
        assert report["d"].skipped == 0
    os.remove(tmp_path / name)
