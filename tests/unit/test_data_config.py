"""The data section's keys for long examples, eval files, metrics and record size."""

import pytest

from desmoe.config import ConfigError, describe, load_config
from tests.conftest import tiny_config_dict


def test_data_keys_have_defaults_and_load(tmp_path, write_yaml):
    (tmp_path / "e.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)))
    d = cfg.data
    assert (d.long_examples, d.max_record_bytes, d.chat_template) == ("split", 16 * 1024 * 1024, "auto")
    assert d.domains["math"].eval is None and d.domains["math"].metric is None
    data = tiny_config_dict(tmp_path, data={"long_examples": "truncate", "max_record_bytes": 1 << 30,
                                            "domains": {"qa": {"train": "e.jsonl", "eval": "e.jsonl",
                                                               "format": "prompt_response", "metric": "chrf"}}})
    cfg = load_config(write_yaml(data))
    assert cfg.data.long_examples == "truncate" and cfg.data.max_record_bytes == 1 << 30
    assert cfg.data.domains["qa"].metric == "chrf"
    text = describe()
    for key in ("long_examples", "max_record_bytes", "chat_template", "  eval:", "  metric:"):
        assert key in text


def test_bad_data_keys_are_reported_together(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path, data={
        "long_examples": "chop", "max_record_bytes": 10,
        "domains": {"a": {"builtin": "math", "metric": "bleu"},
                    "b": {"builtin": "code", "metric": "exact_match"},
                    "c": {"builtin": "translation", "metric": "chrf"}},
        "holdout": {"builtin": "general", "eval": "x.jsonl"}})
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    msg = str(ei.value)
    assert "data.long_examples: 'chop' is not of type 'split' | 'truncate'" in msg
    assert "data.domains.a.metric: 'bleu' is not of type 'exact_match' | 'chrf' | 'token_accuracy'" in msg
    data["data"].update(long_examples="split")
    data["data"]["domains"]["a"].pop("metric")
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    msg = str(ei.value)
    assert "data.max_record_bytes: 10 must be >= 1024" in msg
    assert ("data.domains.b.metric: exact_match compares generated answers with reference answers, which the "
            "built-in corpus 'code' does not have") in msg
    assert "data.domains.c" not in msg
    assert "data.holdout.eval: not used by the holdout" in msg


def test_generation_metric_on_text_records_is_refused(tmp_path, write_yaml):
    (tmp_path / "t.jsonl").write_text('{"text": "t"}\n')
    data = tiny_config_dict(tmp_path, data={"domains": {"t": {"train": "t.jsonl", "metric": "exact_match"}}})
    with pytest.raises(ConfigError, match="data.domains.t.metric: exact_match compares .* which format text"):
        load_config(write_yaml(data))


def test_metric_names_agree_with_desmoe_metrics():
    import typing

    from desmoe.config import DomainSection
    from desmoe.data.builtin import BUILTIN_DOMAINS, TASK_METRICS
    from desmoe.constants import METRICS

    literal = typing.get_args(typing.get_type_hints(DomainSection)["metric"])[0]
    assert set(typing.get_args(literal)) == set(METRICS)
    assert set(TASK_METRICS) == set(BUILTIN_DOMAINS)
    assert all(m in METRICS for ms in TASK_METRICS.values() for m in ms)
