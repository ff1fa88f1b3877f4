import os

import pytest

from desmoe.config import ConfigError, apply_overrides, config_from_dict, load_config, validate
from tests.conftest import tiny_config_dict


def test_minimal_config_loads_with_defaults(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)))
    assert cfg.train.max_steps == 2
    assert cfg.train.lr == 1e-4
    assert cfg.parallel.ep_size == 1
    assert cfg.method.mode == "fft"
    assert cfg.data.domains["math"].builtin == "math"


def test_overrides_set_nested_keys_and_parse_yaml_values(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)),
                      ["train.max_steps=20", "train.lr=3e-4", "parallel.ep_size=2", "data.domains.math.weight=2"])
    assert cfg.train.max_steps == 20
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.parallel.ep_size == 2
    assert cfg.data.domains["math"].weight == 2.0


def test_all_problems_reported_at_once_with_key_value_and_fix(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path, train={"max_stepz": 3, "lr": "fast", "micro_batch_size": 0})
    data["bogus"] = {}
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    msg = str(ei.value)
    # unknown key with a suggestion, wrong type, unknown section: all in one error
    assert "train.max_stepz: unknown key. Did you mean train.max_steps?" in msg
    assert "train.lr: 'fast' is not of type float" in msg
    assert "bogus: unknown section" in msg
    assert len(ei.value.problems) == 3  # type errors stop before range checks of the same pass


def test_range_and_consistency_checks_collected(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path, train={"micro_batch_size": 0, "warmup_steps": 5},
                            parallel={"ep_size": 3})
    path = write_yaml(data)
    with pytest.raises(ConfigError) as ei:
        cfg = load_config(path)
    msgs = ei.value.problems
    assert any(m.startswith("train.micro_batch_size: 0 must be >= 1") for m in msgs)
    assert any(m.startswith("train.warmup_steps: 5 must be between 0 and train.max_steps (2)") for m in msgs)


def test_world_and_expert_divisibility(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ep_size": 3},
                                                  train={"global_batch_size": 7})))
    with pytest.raises(ConfigError) as ei:
        validate(cfg, world_size=4, num_experts=8)
    msg = str(ei.value)
    assert "parallel.ep_size: 3 does not divide the world size 4. Use one of [1, 2, 4]" in msg
    assert "does not divide the model's 8 routed experts. Use one of [1, 2, 4, 8]" in msg
    cfg.parallel.ep_size = 2
    with pytest.raises(ConfigError, match=r"global_batch_size: 7 != micro_batch_size \(2\) x grad_accum_steps "
                       r"\(1\) x world size \(4\) = 8"):
        validate(cfg, world_size=4, num_experts=8)
    cfg.train.global_batch_size = 8
    validate(cfg, world_size=4, num_experts=8)


def test_model_needs_exactly_one_source(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path)
    data["model"]["path"] = str(tmp_path)
    with pytest.raises(ConfigError, match="set exactly one of model.path"):
        load_config(write_yaml(data))


def test_unknown_model_type_lists_supported(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path)
    data["model"]["tiny"] = {"model_type": "llama"}
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    assert "'llama' is not supported" in str(ei.value)
    for fam in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe"):
        assert fam in str(ei.value)


def test_yaml_syntax_error_names_the_line(write_yaml):
    path = write_yaml("run:\n  name: x\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_config(path)


def test_yaml_python_tags_are_refused(write_yaml, tmp_path):
    marker = tmp_path / "pwned"
    path = write_yaml(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)
    assert not marker.exists()


def test_duplicate_keys_are_errors(write_yaml):
    path = write_yaml("train:\n  max_steps: 1\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'max_steps'"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_relative_paths_resolve_against_yaml_folder_and_overrides_against_cwd(tmp_path, write_yaml, monkeypatch):
    data = tiny_config_dict(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.jsonl").write_text('{"text": "x"}\n')
    data["data"]["domains"]["math"] = {"train": "d/m.jsonl"}
    cfg = load_config(write_yaml(data))
    assert cfg.data.domains["math"].train == str(tmp_path / "d" / "m.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(tmp_path / "cfg.yaml"), ["data.domains.math.train=x.jsonl"])
    assert cfg.data.domains["math"].train == str(elsewhere / "x.jsonl")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="is not section.key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="must name a section and a field"):
        apply_overrides({}, ["max_steps=3"])


def test_unknown_mode_lists_the_modes(tmp_path, write_yaml):
    with pytest.raises(ConfigError, match="'qlora' is not a training mode. Choose one of fft, desmoe, desmoe_no_alr, "
                       "desmoe_no_dges, esft_gate, esft_token, lora"):
        load_config(write_yaml(tiny_config_dict(tmp_path, method={"mode": "qlora"})))


def test_method_knobs_are_checked(tmp_path, write_yaml):
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(tiny_config_dict(tmp_path, method={"mode": "desmoe", "warmup_end": 0.8,
                                                                  "stabilization_end": 0.5, "phi": 0, "kd_tau": -1})))
    assert len(ei.value.problems) == 3


def test_phase_table_and_kd_knobs_are_checked(tmp_path, write_yaml):
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(tiny_config_dict(tmp_path, method={
            "mode": "desmoe", "phase_trainable": {"warmup": ["router", "attention"]}, "backbone_lr_scale": -1,
            "kd_alpha_end": 0, "kd_weight": -0.5})))
    text = str(ei.value)
    for needle in ("method.phase_trainable.warmup: unknown part(s) ['attention']", "method.backbone_lr_scale: -1",
                   "method.kd_alpha_end: 0", "method.kd_weight: -0.5"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="method.shared_experts: 'sometimes'.*'warmup' | 'never' | 'always'"):
        load_config(write_yaml(tiny_config_dict(tmp_path, method={"mode": "desmoe", "shared_experts": "sometimes"})))
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, method={
        "mode": "desmoe", "phase_trainable": {"warmup": ["router", "backbone"]}, "kd_alpha_end": 0.7,
        "kd_layer_reduction": "mean"})))
    assert cfg.method.phase_trainable == {"warmup": ["router", "backbone"]}


def test_domain_entries_are_checked(tmp_path, write_yaml):
    data = tiny_config_dict(tmp_path)
    data["data"]["domains"] = {"a": {"builtin": "poetry"}, "b": {}, "c": {"builtin": "math", "wieght": 2}}
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    msg = str(ei.value)
    assert "data.domains.c.wieght: unknown key. Did you mean data.domains.c.weight?" in msg
    data["data"]["domains"] = {"a": {"builtin": "poetry"}, "b": {}}
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(data))
    msg = str(ei.value)
    assert "data.domains.a.builtin: 'poetry' is not a built-in corpus" in msg
    assert "data.domains.b: no data" in msg


def test_to_dict_round_trips(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)))
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_warmup_longer_than_the_run_names_the_override_that_fixes_it(tmp_path, write_yaml):
    path = write_yaml(tiny_config_dict(tmp_path, train={"warmup_steps": 20}))
    with pytest.raises(ConfigError) as ei:
        load_config(path, ["train.max_steps=6"])
    assert ("train.warmup_steps: 20 must be between 0 and train.max_steps (6). Add the override "
            "train.warmup_steps=6 (or less), or raise train.max_steps.") in ei.value.problems
    cfg = load_config(path, ["train.max_steps=6", "train.warmup_steps=6"])  # the named fix works
    assert cfg.train.warmup_steps == 6
