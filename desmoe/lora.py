"""``method.mode: lora``: low-rank adapters from peft on the linear modules that DeepSpeed AutoEP leaves in place.

What can take an adapter here (checked against DeepSpeed 0.19.8 and peft 0.21): AutoEP rebuilds every MoE
block from the raw router and expert tensors, so an adapter on a routed expert or on a router would be
dropped (and AutoEP would then find no MoE layer to replace). Every other linear module of a decoder layer
survives ``deepspeed.initialize`` with its adapter: the attention projections, the dense MLPs of dense
layers (DeepSeek's first layers) and the shared experts (Qwen2-MoE, DeepSeek), which AutoEP keeps as
modules. Those are the default targets. Routed experts and routers stay frozen (the router trains in full
with ``method.lora_train_router``).

The adapters are peft's ``lora.Linear`` layers put in place of their targets in the causal LM itself
(never a ``PeftModel`` wrapper, whose ``base_model.model.`` prefix would hide the layers from AutoEP's
patterns): module ``X`` becomes ``X.base_layer`` plus ``X.lora_A.default`` / ``X.lora_B.default``. ``merge_state_dict``
folds them back, ``W = W0 + (alpha / r) B A``, for an export that plain transformers loads.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from desmoe.config import ConfigError
from desmoe.models import Family, moe_layer_indices

ADAPTER = "default"
"""peft's adapter name; it appears in the parameter names (``X.lora_A.default.weight``)."""
_LORA_KEY = re.compile(rf"^(.+)\.lora_([AB])\.{ADAPTER}\.weight$")
_SHARED = re.compile(r"\.shared_experts?\.")
PEFT_PINS = "peft==0.21.2 accelerate==1.15.0"


def require_peft():
    """peft's module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError([f"method.mode: lora needs the peft library, which is not installed ({e}). Install "
                           f"the pinned versions: pip install {PEFT_PINS} (they are in requirements.txt), or "
                           "choose another method.mode."]) from e
    return peft


def adaptable_modules(model: nn.Module, family: Family) -> tuple[list[str], list[str]]:
    """(default targets, every module that can take an adapter): full names of the linear modules of the
    decoder layers that AutoEP keeps. Default: attention, dense MLPs and shared experts (a shared expert's
    one-output gate can take one too, but is not a default)."""
    moe = set(moe_layer_indices(model.config, family))
    layers = family.layers_path
    default, allowed = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(layers + "."):
            continue
        index, _, rest = name[len(layers) + 1:].partition(".")
        in_moe_block = int(index) in moe and rest.startswith(family.moe_block_attr + ".")
        shared = _SHARED.search("." + rest) is not None  # inside a shared expert
        if in_moe_block and not shared and "shared_expert" not in rest:
            continue  # a router or a routed expert (fused tensors in transformers 5, not nn.Linear anyway)
        allowed.append(name)
        if not in_moe_block or shared:
            default.append(name)
    return default, allowed


def resolve_targets(model: nn.Module, family: Family, targets: list[str] | None) -> list[str]:
    """Full module names that get adapters: ``targets`` matched by name or dotted-path suffix, else the
    default. ConfigError naming the modules that can take one when a target matches none of them."""
    default, allowed = adaptable_modules(model, family)
    if targets is None:
        if not default:
            raise ConfigError([f"method.mode: lora found no linear module to adapt in this {family.model_type} model. "
                               "Set method.lora_target_modules, or choose another method.mode."])
        return default
    chosen, missing = [], []
    for t in targets:
        hits = [n for n in allowed if n == t or n.endswith("." + t)]
        if not hits:
            missing.append(t)
        chosen += [n for n in hits if n not in chosen]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in allowed})
        raise ConfigError([f"method.lora_target_modules: {', '.join(repr(t) for t in missing)} matches no linear "
                           f"module that can take an adapter in this {family.model_type} model. Modules that can: "
                           f"{', '.join(short)} (by name, or a dotted path such as {allowed[0]}). Routed experts and "
                           "routers cannot (AutoEP rebuilds them from their raw weights); "
                           "method.lora_train_router trains the routers in full."])
    return [n for n in allowed if n in chosen]


def inject(model: nn.Module, family: Family, method_cfg, *, seed: int) -> list[str]:
    """Add the adapters to ``model`` in place (before ``deepspeed.initialize``); returns the adapted module
    names. Every parameter but the adapters is frozen (requires_grad False). The adapters' initialisation
    is seeded (the same on every rank, and in a resumed or evaluated rebuild).

    NOTE: each target becomes peft's own ``lora.Linear`` around it, placed by desmoe rather than by
    ``LoraModel``: for MoE model types that changed from transformers 4 to 5 (DeepSeek, Mixtral, ...)
    LoraModel rewrites targets named like v4 experts (``gate_proj``, ``w1``, ...) into adapters on the
    fused expert tensors, which would also catch dense MLPs and shared experts (and AutoEP drops them).
    """
    peft = require_peft()
    targets = resolve_targets(model, family, method_cfg.lora_target_modules)
    config = peft.LoraConfig(r=method_cfg.lora_rank, lora_alpha=method_cfg.lora_alpha,
                             lora_dropout=method_cfg.lora_dropout, target_modules=targets, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = peft.tuners.lora.Linear(getattr(parent, attr), ADAPTER, config=config, r=config.r,
                                            lora_alpha=config.lora_alpha)
            setattr(parent, attr, layer)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return targets


def is_adapter(name: str) -> bool:
    return _LORA_KEY.match(name) is not None


def scale(method_cfg) -> float:
    """peft's LoRA scaling alpha / r (no rsLoRA)."""
    return method_cfg.lora_alpha / method_cfg.lora_rank


def merge_state_dict(state: dict[str, torch.Tensor], scaling: float) -> tuple[dict[str, torch.Tensor], dict]:
    """(stock state dict, adapters) from a state dict with peft's LoRA layers: every adapted ``X``'s
    ``X.base_layer.weight`` becomes ``X.weight = W0 + scaling * B @ A`` (computed in float32, stored in
    W0's dtype), ``X.base_layer.bias`` becomes ``X.bias``; the adapters come back as
    {X: {"A": tensor, "B": tensor}}. ValueError on half an adapter or an adapter without its base layer."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in state.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            out[key] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise ValueError(f"{module}: the state has lora_{have} but not lora_{lack}.")
        base = out.pop(f"{module}.base_layer.weight", None)
        if base is None:
            raise ValueError(f"{module}: the state has LoRA adapters but no {module}.base_layer.weight.")
        delta = ab["B"].float() @ ab["A"].float()
        out[f"{module}.weight"] = (base.float() + scaling * delta).to(base.dtype)
        bias = out.pop(f"{module}.base_layer.bias", None)
        if bias is not None:
            out[f"{module}.bias"] = bias
    stray = sorted(k for k in out if ".base_layer." in k)
    if stray:
        raise ValueError(f"{stray[0]}: a peft base layer without adapters.")
    return out, pairs
