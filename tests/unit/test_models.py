import json
import re

import pytest
import torch

from desmoe.models import (FAMILIES, ModelError, build_tiny_model, load_pretrained_model, moe_layer_indices,
                           num_routed_experts, tiny_config_kwargs)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_builds_a_tiny_moe_model_deterministically(model_type):
    a = build_tiny_model({"model_type": model_type}, seed=3)
    b = build_tiny_model({"model_type": model_type}, seed=3)
    assert a.config.model_type == model_type
    assert num_routed_experts(a.config) == 8
    assert moe_layer_indices(a.config)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    out = a(input_ids=torch.tensor([[1, 5, 9, 2]]))
    assert out.logits.shape == (1, 4, a.config.vocab_size)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_paths_find_layers_moe_blocks_and_routers(model_type):
    family = FAMILIES[model_type]
    model = build_tiny_model({"model_type": model_type}, seed=0)
    layers = family.decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == model.config.num_hidden_layers
    assert layers is model.model.layers
    modules = dict(model.named_modules())
    for i in moe_layer_indices(model.config, family):
        block = family.moe_block(layers[i])
        assert modules[family.moe_block_path(i)] is block  # the name AutoEP gives the layer it replaces
        weight = family.router_weight(block)
        assert weight.shape == (num_routed_experts(model.config, family), model.config.hidden_size)
        assert weight is dict(model.named_parameters())[f"{family.moe_block_path(i)}.gate.weight"]
        assert hasattr(block, "experts")
    dense = [i for i in range(len(layers)) if i not in moe_layer_indices(model.config, family)]
    assert all(not hasattr(family.moe_block(layers[i]), "experts") for i in dense)
    assert family.moe_block_path(7) == "model.layers.7.mlp"


def test_autoep_patterns_of_olmoe_name_the_family_paths():
    family = FAMILIES["olmoe"]
    model = build_tiny_model({"model_type": "olmoe"}, seed=0)
    section = family.autoep_section(model.config)
    assert section["moe_layer_pattern"] == r"model\.layers\.\d+\.mlp" and section["router_pattern"] == "gate"
    assert list(section)[:3] == ["moe_layer_pattern", "router_pattern", "expert_pattern"]
    assert re.fullmatch(section["moe_layer_pattern"], family.moe_block_path(12))
    assert not re.fullmatch(section["moe_layer_pattern"], "model.layers.1.self_attn")
    assert all(FAMILIES[t].autoep_section(model.config) == {"preset_model": FAMILIES[t].autoep_preset}
               for t in FAMILIES if t != "olmoe")


def test_deepseek_first_layers_are_dense():
    m = build_tiny_model({"model_type": "deepseek_v2", "first_k_dense_replace": 2, "num_hidden_layers": 3}, seed=0)
    assert moe_layer_indices(m.config) == [2]


def test_seed_changes_weights_but_not_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    build_tiny_model({"model_type": "mixtral"}, seed=5)
    assert torch.equal(torch.rand(1), before)


def test_user_keys_override_defaults_and_unknown_keys_are_named():
    fam, kwargs = tiny_config_kwargs({"model_type": "mixtral", "num_local_experts": 4})
    assert kwargs["num_local_experts"] == 4
    with pytest.raises(ModelError, match="num_expertz not accepted by transformers.MixtralConfig"):
        tiny_config_kwargs({"model_type": "mixtral", "num_expertz": 4})


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ModelError) as ei:
        build_tiny_model({"model_type": "gpt2"}, seed=0)
    assert "olmoe" in str(ei.value) and "qwen3_moe" in str(ei.value)


def test_model_without_moe_layers_is_refused():
    with pytest.raises(ModelError, match="has no MoE layers"):
        build_tiny_model({"model_type": "qwen3_moe", "mlp_only_layers": [0, 1]}, seed=0)


def test_load_pretrained_round_trip_and_errors(tmp_path):
    model = build_tiny_model({"model_type": "olmoe"}, seed=1)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained_model(str(tmp_path / "m"))
    ids = torch.tensor([[1, 7, 8, 9]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    with pytest.raises(ModelError, match="is not a directory"):
        load_pretrained_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_pretrained_model(str(tmp_path / "empty"))
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="'llama' is not supported"):
        load_pretrained_model(str(tmp_path / "dense"))
    (tmp_path / "noweights").mkdir()
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ModelError, match="could not load weights"):
        load_pretrained_model(str(tmp_path / "noweights"))


def test_remote_code_model_is_refused_without_opt_in(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig"}}))
    (d / "configuration_evil.py").write_text("raise SystemExit('executed remote code')\n")
    with pytest.raises(ModelError):
        load_pretrained_model(str(d))
