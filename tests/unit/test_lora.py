"""desmoe.lora and method.LoRA: which modules take adapters, injection, merging, optimizer groups."""

import sys

import peft
import pytest
import torch

from desmoe import lora
from desmoe.config import ConfigError, load_config
from desmoe.method import LoRA, build_method
from desmoe.models import FAMILIES, build_tiny_model
from tests.conftest import tiny_config_dict


def _cfg(tmp_path, write_yaml, model_type="qwen2_moe", **method):
    data = tiny_config_dict(tmp_path, model={"tiny": {"model_type": model_type}}, method={"mode": "lora", **method})
    return load_config(write_yaml(data))


def _short(names):
    return sorted({n.split(".", 3)[3] for n in names})


def test_default_targets_are_attention_dense_mlps_and_shared_experts():
    m = build_tiny_model({"model_type": "deepseek_v2"}, seed=0)  # layer 0 dense, layers 1-2 MoE with shared experts
    default, allowed = lora.adaptable_modules(m, FAMILIES["deepseek_v2"])
    assert "model.layers.0.mlp.gate_proj" in default and "model.layers.0.self_attn.kv_b_proj" in default
    assert "model.layers.1.mlp.shared_experts.down_proj" in default
    assert not any(".mlp.gate." in n or n.endswith(".mlp.gate") or ".experts." in n.replace("shared_experts", "")
                   for n in default)
    q = build_tiny_model({"model_type": "qwen2_moe"}, seed=0)
    default, allowed = lora.adaptable_modules(q, FAMILIES["qwen2_moe"])
    assert _short(default) == ["mlp.shared_expert.down_proj", "mlp.shared_expert.gate_proj",
                               "mlp.shared_expert.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                               "self_attn.q_proj", "self_attn.v_proj"]
    assert set(allowed) - set(default) == {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}


def test_targets_by_name_or_path_and_unknown_names_list_the_modules():
    m = build_tiny_model({"model_type": "qwen3_moe"}, seed=0)
    fam = FAMILIES["qwen3_moe"]
    assert lora.resolve_targets(m, fam, ["q_proj", "model.layers.1.self_attn.v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ConfigError) as ei:
        lora.resolve_targets(m, fam, ["q_proj", "gate", "experts"])
    msg = str(ei.value)
    assert "'gate', 'experts' matches no linear module" in msg
    assert "k_proj, o_proj, q_proj, v_proj" in msg and "Routed experts and routers cannot" in msg


def test_injection_trains_only_adapters_starts_at_the_base_model_and_is_seeded(tmp_path, write_yaml):
    cfg = _cfg(tmp_path, write_yaml)
    base = build_tiny_model(cfg.model.tiny, seed=cfg.run.seed).eval()
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    models = []
    for _ in range(2):
        m = build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
        names = lora.inject(m, FAMILIES["qwen2_moe"], cfg.method, seed=cfg.run.seed)
        models.append(m.eval())
    assert len(names) == 14
    trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter(n) for n in trainable) and len(trainable) == 2 * len(names)
    with torch.no_grad():
        assert torch.equal(models[0](input_ids=ids).logits, ref)  # B = 0: the adapters add nothing yet
    a0, a1 = (dict(m.named_parameters()) for m in models)
    assert all(torch.equal(a0[n], a1[n]) for n in trainable)  # same seed, same adapters (every rank)
    other = build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    lora.inject(other, FAMILIES["qwen2_moe"], cfg.method, seed=cfg.run.seed + 1)
    assert not torch.equal(dict(other.named_parameters())[trainable[0]], a0[trainable[0]])


def test_merge_equals_peft_merge_and_unload(tmp_path, write_yaml):
    cfg = _cfg(tmp_path, write_yaml, lora_rank=4, lora_alpha=12.0)
    m = build_tiny_model(cfg.model.tiny, seed=0)
    lora.inject(m, FAMILIES["qwen2_moe"], cfg.method, seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    merged, adapters = lora.merge_state_dict(m.state_dict(), lora.scale(cfg.method))
    assert len(adapters) == 14 and not any("lora_" in k or "base_layer" in k for k in merged)
    for module in m.modules():  # peft's own merge of the very same layers
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
    ref = {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k}
    assert set(ref) == set(merged)
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=0, atol=1e-6)
    plain = build_tiny_model(cfg.model.tiny, seed=0)
    plain.load_state_dict(merged, strict=True)


def test_merge_rejects_half_an_adapter():
    state = {"a.base_layer.weight": torch.zeros(2, 2), "a.lora_A.default.weight": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="a: the state has lora_A but not lora_B"):
        lora.merge_state_dict(state, 2.0)
    with pytest.raises(ValueError, match="no b.base_layer.weight"):
        lora.merge_state_dict({"b.lora_A.default.weight": torch.zeros(1, 2),
                               "b.lora_B.default.weight": torch.zeros(2, 1)}, 2.0)


@pytest.mark.parametrize("train_router", [False, True])
def test_lora_groups_and_lr_factors(tmp_path, write_yaml, train_router):
    cfg = _cfg(tmp_path, write_yaml, lora_train_router=train_router)
    m = build_tiny_model(cfg.model.tiny, seed=0)
    method = build_method(cfg, m, FAMILIES["qwen2_moe"], ["math"])
    assert isinstance(method, LoRA)
    groups = {g["name"]: g["params"] for g in method.param_groups(m)}
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(lora.is_adapter(names[id(p)]) for p in groups["lora"])
    experts = _short(names[id(p)] for p in groups["frozen_experts"])
    assert experts == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert ("router" in groups) == train_router
    if train_router:
        assert _short(names[id(p)] for p in groups["router"]) == ["mlp.gate.weight"]
    in_groups = {id(p) for ps in groups.values() for p in ps}
    assert all(p.requires_grad == (id(p) in in_groups) for p in m.parameters())
    assert method.lr_factor({"name": "lora"}, 1) == 1.0 and method.lr_factor({"name": "x", "moe": True}, 5) == 0.0
    assert method.lr_factor({"name": "frozen_experts"}, 1) == 0.0
    assert method.metrics() == {"phase": "lora", "lambda": 0.0} and method.state_dict() is None


def test_missing_peft_is_a_config_error_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    with pytest.raises(ConfigError, match=r"needs the peft library.*pip install peft==0.21.2 accelerate==1.15.0"):
        lora.require_peft()


def test_lora_knobs_are_checked(tmp_path, write_yaml):
    with pytest.raises(ConfigError) as ei:
        _cfg(tmp_path, write_yaml, lora_rank=0, lora_alpha=0, lora_dropout=1.0, lora_target_modules=[])
    msg = str(ei.value)
    for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"):
        assert f"method.{key}" in msg
