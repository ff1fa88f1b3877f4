"""method.mode lora through the real recipe (2 ranks over gloo, AutoEP ep_size 2): only the adapted modules
(and, with lora_train_router, the routers) move; resume is bit-exact; the export is a plain HF model
whose logits are the run's; a target module the model lacks is a clear error."""

import json
import os

import pytest
import torch
import transformers

from desmoe.models import build_tiny_model
from tests.integration.launch import desmoe, zero_overrides
from tests.integration.test_resume import _checkpoint_tensors, _metrics, _train

pytestmark = pytest.mark.integration

STEPS = 8


def _config(tmp, name, model_type="qwen2_moe", **method):
    import yaml

    cfg = {
        "run": {"name": name, "output_dir": str(tmp / name)},
        "model": {"tiny": {"model_type": model_type}},
        "parallel": {"ep_size": 2, "zero_stage": 2},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 3e-3, "log_every": 2, "weight_decay": 0.1,
                  "lr_schedule": "cosine", "warmup_steps": 2},
        "data": {"seq_len": 32, "eval_sequences": 2,
                 "domains": {"math": {"builtin": "math", "max_examples": 60},
                             "code": {"builtin": "code", "max_examples": 30}}},
        "method": {"mode": "lora", "lora_dropout": 0.1, **method},
        "checkpoint": {"every": 4, "keep": 3},
        "eval": {"max_pairs": 2, "max_new_tokens": 4},
        "tracking": {"mlflow": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), str(tmp / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg, straight = _config(tmp, "straight")
    _train("--config", cfg)
    cfg_split, split = _config(tmp, "split")
    _train("--config", cfg_split, "--stop-at-step", "4")
    _train("--resume", split)
    return tmp, straight, split


def test_lora_resume_is_bit_exact(runs):
    _, straight, split = runs
    a = _checkpoint_tensors(os.path.join(straight, "checkpoints", f"step{STEPS}"))
    b = _checkpoint_tensors(os.path.join(split, "checkpoints", f"step{STEPS}"))
    assert set(a) == set(b) and any("lora_A" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert _metrics(straight) == _metrics(split)


def test_lora_export_moves_only_the_adapted_modules_and_loads_in_plain_transformers(runs):
    tmp, straight, _ = runs
    out = str(tmp / "export")
    proc = desmoe("export", straight, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.load(open(os.path.join(out, "desmoe_export.json")))
    assert meta["mode"] == "lora" and meta["lora"]["merged"] and meta["lora"]["scaling"] == 2.0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    base = build_tiny_model({"model_type": "qwen2_moe"}, seed=1234).state_dict()
    changed = sorted({k.split(".", 3)[3] for k, v in model.state_dict().items() if not torch.equal(v, base[k])})
    assert changed == ["mlp.shared_expert.down_proj.weight", "mlp.shared_expert.gate_proj.weight",
                       "mlp.shared_expert.up_proj.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                       "self_attn.q_proj.weight", "self_attn.v_proj.weight"]
    assert sorted(meta["lora"]["modules"]) == meta["lora"]["modules"] and len(meta["lora"]["modules"]) == 14
    # the run's own final evaluation (engine, adapters unmerged) equals the merged model's loss
    proc = desmoe("eval", straight)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evaluated = json.load(open(os.path.join(straight, f"eval_step{STEPS}.json")))["results"]
    summary = json.load(open(os.path.join(straight, "summary.json")))
    for domain in ("math", "code"):
        assert evaluated[domain]["loss"] == pytest.approx(summary["eval_after"][domain]["loss"], abs=1e-5)


def test_lora_train_router_moves_the_routers_of_deepseek_not_its_experts(tmp_path):
    cfg, run = _config(tmp_path, "router", model_type="deepseek_v2", lora_train_router=True)
    _train("--config", cfg, "parallel.zero_stage=1", "train.max_steps=3", "checkpoint.every=0")
    out = str(tmp_path / "export")
    assert desmoe("export", run, "--out", out).returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = build_tiny_model({"model_type": "deepseek_v2"}, seed=1234).state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert "model.layers.1.mlp.gate.weight" in changed and "model.layers.0.mlp.gate_proj.weight" in changed
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in changed
    assert not [k for k in changed if ".mlp.experts." in k or "norm" in k or "embed" in k or "lm_head" in k]


def test_unknown_lora_target_is_a_config_error(tmp_path):
    cfg, _ = _config(tmp_path, "bad", lora_target_modules=["q_proj", "w1"])
    proc = desmoe("train", "--config", cfg, "--nproc", "2")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = proc.stderr
    assert "method.lora_target_modules: 'w1' matches no linear module" in err and "q_proj" in err
    assert "Traceback" not in err


def test_lora_under_zero3_resumes_bit_exact_and_exports_only_the_adapted_modules(tmp_path):
    """ZeRO 3 (every parameter partitioned): the experts keep computing gradients there (DeepSpeed cannot
    checkpoint frozen AutoEP experts under ZeRO 3) but sit in the LR-0 group, so they still never move."""
    z3 = zero_overrides(3)
    cfg, straight = _config(tmp_path, "straight")
    _train("--config", cfg, *z3)
    cfg_split, split = _config(tmp_path, "split")
    _train("--config", cfg_split, "--stop-at-step", "4", *z3)
    _train("--resume", split)
    a = _checkpoint_tensors(os.path.join(straight, "checkpoints", f"step{STEPS}"))
    b = _checkpoint_tensors(os.path.join(split, "checkpoints", f"step{STEPS}"))
    assert set(a) == set(b) and any(k.startswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in a)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    out = str(tmp_path / "export")
    assert desmoe("export", straight, "--out", out).returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = build_tiny_model({"model_type": "qwen2_moe"}, seed=1234).state_dict()
    changed = sorted({k.split(".", 3)[3] for k, v in model.state_dict().items() if not torch.equal(v, base[k])})
    assert changed == ["mlp.shared_expert.down_proj.weight", "mlp.shared_expert.gate_proj.weight",
                       "mlp.shared_expert.up_proj.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                       "self_attn.q_proj.weight", "self_attn.v_proj.weight"]
