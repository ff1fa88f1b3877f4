import json

import pytest

from desmoe.config import ConfigError, load_config
from desmoe.engine import build_ds_config, lr_lambda
from desmoe.models import FAMILIES, build_tiny_model
from tests.conftest import tiny_config_dict


def test_ds_config_takes_desmoe_owned_keys_from_the_run_config(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ep_size": 2, "zero_stage": 2},
                                                  train={"micro_batch_size": 3, "grad_accum_steps": 2,
                                                         "lr": 5e-4, "grad_clip": 0.5})))
    model = build_tiny_model({"model_type": "olmoe"}, seed=0)
    ds = build_ds_config(cfg, FAMILIES["olmoe"], model.config)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 5e-4 and ds["optimizer"]["params"]["torch_adam"] is True
    ep = ds["expert_parallel"]
    assert ep["enabled"] and ep["autoep_size"] == 2
    assert ep["moe_layer_pattern"] and ep["route_norm"] is False  # OLMoE through pattern keys
    ds_q = build_ds_config(cfg, FAMILIES["qwen2_moe"], build_tiny_model({"model_type": "qwen2_moe"}, seed=0).config)
    assert ds_q["expert_parallel"]["preset_model"] == "qwen3_moe"


def test_ds_json_may_not_set_what_desmoe_owns(tmp_path, write_yaml):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
                               "expert_parallel": {"autoep_size": 4}}))
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ds_config": str(bad)})))
    with pytest.raises(ConfigError) as ei:
        build_ds_config(cfg, FAMILIES["qwen3_moe"], build_tiny_model({"model_type": "qwen3_moe"}, seed=0).config)
    assert len(ei.value.problems) == 3
    assert "train.micro_batch_size" in str(ei.value)


def test_zero3_settings_deepspeed_autoep_cannot_run_are_config_errors(tmp_path, write_yaml):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"zero_quantized_gradients": True, "zero_hpz_partition_size": 2,
                                                     "offload_optimizer": {"device": "nvme"}},
                               "expert_parallel": {"expert_tensor_parallel_size": 2}}))
    model = build_tiny_model({"model_type": "qwen3_moe"}, seed=0)
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ds_config": str(bad), "zero_stage": 3})))
    with pytest.raises(ConfigError) as ei:
        build_ds_config(cfg, FAMILIES["qwen3_moe"], model.config)
    text = str(ei.value)
    assert len(ei.value.problems) == 4 and "zero_quantized_gradients" in text and "parallel.zero_stage 2" in text
    assert "hpZeRO" in text and "NVMe" in text and "expert_tensor_parallel_size" in text
    # the same JSON under ZeRO 2 is DeepSpeed's business; a plain ZeRO 3 config is fine
    cfg2 = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ds_config": str(bad), "zero_stage": 2}),
                                  "z2.yaml"))
    assert build_ds_config(cfg2, FAMILIES["qwen3_moe"], model.config)["zero_optimization"]["stage"] == 2
    cfg3 = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"zero_stage": 3}), "z3.yaml"))
    assert build_ds_config(cfg3, FAMILIES["qwen3_moe"], model.config)["zero_optimization"]["stage"] == 3


def test_broken_ds_json_names_the_line(tmp_path, write_yaml):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "bf16": {"enabled": true},\n}\n')
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, parallel={"ds_config": str(bad)})))
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 3"):
        build_ds_config(cfg, FAMILIES["qwen3_moe"], build_tiny_model({"model_type": "qwen3_moe"}, seed=0).config)


@pytest.mark.parametrize("schedule,expect_last", [("constant", 1.0), ("cosine", 0.1), ("linear", 0.1)])
def test_lr_schedules(tmp_path, write_yaml, schedule, expect_last):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path, train={"max_steps": 100, "warmup_steps": 10,
                                                                   "lr_schedule": schedule})))
    fn = lr_lambda(cfg.train)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0)
    assert fn(100) == pytest.approx(expect_last)
    values = [fn(s) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
