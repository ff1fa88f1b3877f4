"""Model families desmoe supports, and how to build or load them.

A *family* is an HF ``model_type`` plus what DeepSpeed AutoEP needs to find its MoE
blocks: either the name of a built-in AutoEP preset, or AutoEP's pattern keys for
models without a preset (OLMoE). Nothing here hard-codes expert counts: they come from
the model's own config.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import operator
import os
import re
from typing import Any

import torch
from torch import nn


class ModelError(ValueError):
    """A user-facing problem with the model section of the config."""


@dataclasses.dataclass(frozen=True)
class Family:
    """How desmoe and AutoEP handle one HF ``model_type``."""

    model_type: str
    config_class: str
    """Name of the transformers config class (``transformers.<name>``)."""
    num_experts_attr: str
    """Attribute of the HF config that holds the number of routed experts."""
    tiny_defaults: dict[str, Any]
    """Config kwargs for a tiny random model (``model.tiny``); user keys override these."""
    autoep_preset: str | None = None
    """Built-in AutoEP preset; None means AutoEP is told the pattern keys below."""
    autoep_patterns: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers_path: str = "model.layers"
    """Dotted attribute path from the causal LM to its decoder layers (an ``nn.ModuleList``)."""
    moe_block_attr: str = "mlp"
    """Attribute of a decoder layer that holds its MLP: the MoE block in sparse layers, which AutoEP replaces."""
    router_attr: str = "gate"
    """Attribute of the HF MoE block that holds the router; the router's ``weight`` is [E, H]."""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM of this family (also of the DeepSpeed engine's module)."""
        return operator.attrgetter(self.layers_path)(model)

    def moe_block(self, layer: nn.Module) -> nn.Module:
        """The MoE block of a sparse decoder layer (after ``deepspeed.initialize``: AutoEP's layer)."""
        return getattr(layer, self.moe_block_attr)

    def router_weight(self, moe_block: nn.Module) -> torch.Tensor:
        """The pretrained router weight [E, H] of an HF MoE block."""
        return getattr(moe_block, self.router_attr).weight

    def moe_block_path(self, layer_index: int | str) -> str:
        """The module name of layer ``layer_index``'s MoE block in the model (AutoEP's name for its layer)."""
        return f"{self.layers_path}.{layer_index}.{self.moe_block_attr}"

    def autoep_section(self, model_config) -> dict[str, Any]:
        """The family-specific keys of DeepSpeed's ``expert_parallel`` section."""
        if self.autoep_preset is not None:
            return {"preset_model": self.autoep_preset}
        # the MoE blocks and their routers where desmoe finds them too (the module paths above)
        section = {"moe_layer_pattern": rf"{re.escape(self.layers_path)}\.\d+\.{re.escape(self.moe_block_attr)}",
                   "router_pattern": self.router_attr, **self.autoep_patterns}
        # NOTE: AutoEP's custom preset defaults to renormalising the top-k weights; OLMoE
        # decides that per checkpoint with norm_topk_prob, so read it from the config.
        section["route_norm"] = bool(getattr(model_config, "norm_topk_prob", False))
        return section


_COMMON_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family(
            model_type="qwen3_moe",
            config_class="Qwen3MoeConfig",
            num_experts_attr="num_experts",
            tiny_defaults=dict(_COMMON_TINY, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                               num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
            autoep_preset="qwen3_moe",
        ),
        Family(
            model_type="qwen2_moe",
            config_class="Qwen2MoeConfig",
            num_experts_attr="num_experts",
            tiny_defaults=dict(_COMMON_TINY, intermediate_size=128, moe_intermediate_size=64,
                               shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                               norm_topk_prob=False),
            # NOTE: DeepSpeed 0.19.8's qwen3_moe preset also covers Qwen2-MoE (shared expert + sigmoid gate).
            autoep_preset="qwen3_moe",
        ),
        Family(
            model_type="mixtral",
            config_class="MixtralConfig",
            num_experts_attr="num_local_experts",
            tiny_defaults=dict(_COMMON_TINY, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                               head_dim=16),
            autoep_preset="mixtral",
        ),
        Family(
            model_type="deepseek_v2",
            config_class="DeepseekV2Config",
            num_experts_attr="n_routed_experts",
            tiny_defaults=dict(_COMMON_TINY, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                               n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, head_dim=8, n_group=1, topk_group=1,
                               topk_method="greedy", num_key_value_heads=4),
            autoep_preset="deepseek_v2",
        ),
        Family(
            model_type="deepseek_v3",
            config_class="DeepseekV3Config",
            num_experts_attr="n_routed_experts",
            tiny_defaults=dict(_COMMON_TINY, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                               num_key_value_heads=4),
            autoep_preset="deepseek_v3",
        ),
        Family(
            model_type="olmoe",
            config_class="OlmoeConfig",
            num_experts_attr="num_experts",
            tiny_defaults=dict(_COMMON_TINY, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                               norm_topk_prob=False),
            autoep_patterns=dict(
                expert_pattern="experts",
                expert_w1="gate_up_proj",
                expert_w2="down_proj",
                expert_w3=None,
                num_experts_attr="num_experts",
                top_k_attr="num_experts_per_tok",
                score_func="softmax",
            ),
        ),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_type: str | None, *, where: str = "model") -> Family:
    """The family of ``model_type``; a ModelError listing the supported ones otherwise."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported. desmoe supports the MoE families "
            f"{', '.join(supported_model_types())}. Use one of them (model.tiny.model_type, or a model.path "
            "whose config.json has one of these model_type values).")
    return family


def tiny_config_kwargs(tiny: dict[str, Any]) -> tuple[Family, dict[str, Any]]:
    """Resolve ``model.tiny`` into (family, HF config kwargs), checking every key.

    Raises ModelError naming unknown keys (keys the family's HF config class does not take).
    """
    if not isinstance(tiny, dict):
        raise ModelError(f"model.tiny must be a mapping with at least model_type, got {type(tiny).__name__}.")
    tiny = dict(tiny)
    family = get_family(tiny.pop("model_type", None), where="model.tiny.model_type")
    import transformers

    config_cls = getattr(transformers, family.config_class)
    accepted = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(k for k in tiny if k not in accepted and not _modeling_reads(family.model_type, k))
    if unknown:
        raise ModelError(
            f"model.tiny: {', '.join(unknown)} not accepted by transformers.{family.config_class} "
            f"(model_type {family.model_type}). Remove them or use the HF config's own key names, "
            f"e.g. {', '.join(sorted(family.tiny_defaults)[:6])}.")
    kwargs = dict(family.tiny_defaults)
    kwargs.update(tiny)
    return family, kwargs


def _modeling_reads(model_type: str, key: str) -> bool:
    """Whether the family's modeling code mentions ``key``.

    NOTE: some v5 config classes do not declare keys their model reads through
    ``getattr(config, key, default)`` (Qwen3-MoE's head_dim); those are legitimate.
    """
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        return re.search(rf"\b{re.escape(key)}\b", inspect.getsource(module)) is not None
    except (ImportError, OSError, TypeError):
        return False


def build_tiny_model(tiny: dict[str, Any], *, seed: int) -> nn.Module:
    """A random-initialised causal LM (fp32) from ``model.tiny``; identical on every rank for one seed."""
    import transformers

    family, kwargs = tiny_config_kwargs(tiny)
    config = getattr(transformers, family.config_class)(**kwargs)
    _check_moe(config, family, where="model.tiny")
    with _seeded(seed):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load_pretrained_config(path: str, *, trust_remote_code: bool = False):
    """The HF config of a local model directory, checked to be a supported MoE; ModelError otherwise."""
    import transformers

    if not os.path.isdir(path):
        raise ModelError(f"model.path: {path!r} is not a directory. Point model.path at a local Hugging Face "
                         "model directory (config.json + weights), or use model.tiny for a random model.")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelError(f"model.path: {path!r} has no config.json, so it is not a Hugging Face model directory. "
                         "Save the model with save_pretrained() or point model.path at the right folder.")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path: cannot read {cfg_file}: {e}. Fix or re-save the model's config.json.") from e
    if not isinstance(raw, dict):
        raise ModelError(f"model.path: {cfg_file} must hold a JSON object. Re-save the model's config.")
    family = get_family(raw.get("model_type"), where=f"model.path ({cfg_file})")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
    except ValueError as e:
        raise ModelError(f"model.path: transformers could not read the config in {path!r}: {e}. If the model "
                         "needs its own code, set model.trust_remote_code: true (only for code you trust).") from e
    _check_moe(config, family, where=f"model.path ({path})")
    return config


def load_pretrained_model(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """Load a local HF model directory; ModelError on anything a user can fix."""
    import transformers

    config = load_pretrained_config(path, trust_remote_code=trust_remote_code)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError as e:
        raise ModelError(f"model.path: could not load weights from {path!r}: {e}. The directory needs "
                         "model.safetensors (or pytorch_model.bin) written by save_pretrained().") from e
    return model


def num_routed_experts(config, family: Family | None = None) -> int:
    family = family or get_family(getattr(config, "model_type", None))
    return int(getattr(config, family.num_experts_attr, 0) or 0)


def _check_moe(config, family: Family, *, where: str) -> None:
    n = num_routed_experts(config, family)
    layers = moe_layer_indices(config, family)
    if n < 1 or not layers:
        raise ModelError(
            f"{where}: this {family.model_type} config has no MoE layers ({family.num_experts_attr}={n}, "
            f"{len(layers)} of {config.num_hidden_layers} layers sparse). desmoe fine-tunes Mixture-of-Experts "
            f"models only: set {family.num_experts_attr} >= 2 and keep at least one sparse layer "
            f"(supported families: {', '.join(supported_model_types())}).")


def moe_layer_indices(config, family: Family | None = None) -> list[int]:
    """Indices of decoder layers whose MLP is a routed MoE block, from the HF config alone."""
    family = family or get_family(getattr(config, "model_type", None))
    n_layers = int(config.num_hidden_layers)
    if num_routed_experts(config, family) < 1:
        return []
    if family.model_type in ("deepseek_v2", "deepseek_v3"):
        first_dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
        return list(range(first_dense, n_layers))
    if family.model_type in ("qwen3_moe", "qwen2_moe"):
        mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return [i for i in range(n_layers) if i not in mlp_only and step > 0 and (i + 1) % step == 0]
    return list(range(n_layers))


class _seeded:
    """Context manager: fork the torch RNG, seed it, restore it afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self._state)
        return False
