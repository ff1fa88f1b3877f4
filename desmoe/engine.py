"""DeepSpeed engine construction: the ds_config desmoe hands to ``deepspeed.initialize``.

The split of ownership is strict so nothing is silently overridden: the desmoe run config
owns batch sizes, optimizer, LR schedule, ZeRO stage and the expert-parallel size; the
DeepSpeed JSON (``parallel.ds_config``) owns precision, communication and bucket sizes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os

import torch

from desmoe.config import Config, ConfigError
from desmoe.models import Family
from desmoe.optim import MaskedAdamW

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keys of the DeepSpeed JSON that the desmoe config sets; the JSON must leave them out.
_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.weight_decay / train.betas",
    "scheduler": "train.warmup_steps / train.lr_schedule",
}


def default_ds_config_path() -> str:
    name = "gpu_bf16.json" if torch.cuda.is_available() else "cpu_fp32.json"
    return os.path.join(REPO_ROOT, "ds_configs", name)


def load_ds_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError([f"parallel.ds_config: cannot read {path!r}: {e.strerror}."]) from e
    except json.JSONDecodeError as e:
        raise ConfigError([f"parallel.ds_config: {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                           f"{e.msg}). Fix the file."]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"parallel.ds_config: {path} must hold a JSON object."])
    return data


def zero3_problems(zero: dict, ds: dict, path: str) -> list[str]:
    """What DeepSpeed 0.19.8 cannot do with AutoEP under ZeRO 3 (it would assert inside deepspeed.initialize or
    at the first checkpoint), as config errors that say what to use instead."""
    where = f"parallel.ds_config ({path})"
    out = []
    if zero.get("zero_quantized_gradients"):
        out.append(f"{where}: zero_optimization.zero_quantized_gradients is not supported by DeepSpeed AutoEP under "
                   "ZeRO 3. Remove it, or use parallel.zero_stage 2.")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        out.append(f"{where}: zero_optimization.zero_hpz_partition_size > 1 (hpZeRO) is not supported by DeepSpeed "
                   "AutoEP under ZeRO 3. Remove it.")
    if ((zero.get("offload_optimizer") or {}).get("device")) == "nvme":
        out.append(f"{where}: zero_optimization.offload_optimizer.device nvme: DeepSpeed AutoEP cannot checkpoint "
                   "ZeRO 3 runs whose optimizer state is swapped to NVMe. Offload to \"cpu\" or leave it out.")
    if int((ds.get("expert_parallel") or {}).get("expert_tensor_parallel_size", 1) or 1) != 1:
        out.append(f"{where}: expert_parallel.expert_tensor_parallel_size must be 1 under ZeRO 3 (DeepSpeed AutoEP).")
    if (ds.get("compile") or {}).get("autoep_non_moe"):
        out.append(f"{where}: compile.autoep_non_moe does not support ZeRO 3 yet (DeepSpeed). Remove it.")
    return out


def build_ds_config(cfg: Config, family: Family, model_config) -> dict:
    """The complete DeepSpeed config for this run (also written to <run>/ds_config.json)."""
    path = cfg.parallel.ds_config or default_ds_config_path()
    ds = copy.deepcopy(load_ds_json(path))
    problems = [f"parallel.ds_config ({path}): remove {k!r}; desmoe sets it from {src}."
                for k, src in _OWNED.items() if k in ds]
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != cfg.parallel.zero_stage:
        problems.append(f"parallel.ds_config ({path}): zero_optimization.stage is {zero['stage']} but "
                        f"parallel.zero_stage is {cfg.parallel.zero_stage}. Remove the stage from the JSON "
                        "and set parallel.zero_stage.")
    ep = ds.setdefault("expert_parallel", {})
    if "autoep_size" in ep and ep["autoep_size"] != cfg.parallel.ep_size:
        problems.append(f"parallel.ds_config ({path}): expert_parallel.autoep_size is {ep['autoep_size']} but "
                        f"parallel.ep_size is {cfg.parallel.ep_size}. Remove it from the JSON.")
    if cfg.parallel.zero_stage == 3:
        problems += zero3_problems(zero, ds, path)
    if problems:
        raise ConfigError(problems)
    zero["stage"] = cfg.parallel.zero_stage
    ep.update(enabled=True, autoep_size=cfg.parallel.ep_size)
    for k, v in family.autoep_section(model_config).items():
        ep.setdefault(k, v)
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["gradient_clipping"] = t.grad_clip
    # NOTE: torch_adam avoids JIT-compiling FusedAdam (slow on CPU, needs nvcc on GPU); torch's
    # own AdamW is foreach/fused where the device allows.
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                   "weight_decay": t.weight_decay, "torch_adam": True}}
    return ds


def lr_lambda(train_cfg):
    """Multiplier of the peak LR at optimizer step ``s`` (0-based): linear warm-up, then the schedule."""
    total, warm, floor = train_cfg.max_steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio
    kind = train_cfg.lr_schedule

    def fn(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if kind == "constant" or total <= warm:
            return 1.0
        frac = min(1.0, (s - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - (1.0 - floor) * frac
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


def masked_adamw_factory(ds_config: dict):
    """A client-optimizer callable for ``deepspeed.initialize``: desmoe's MaskedAdamW with exactly the
    settings of the ds_config's optimizer section (which desmoe wrote), over AutoEP's MoE groups."""
    from deepspeed.moe.utils import configure_moe_param_groups

    p = ds_config["optimizer"]["params"]

    def build(params):
        return MaskedAdamW(configure_moe_param_groups(list(params)), lr=p["lr"], betas=tuple(p["betas"]),
                           eps=p["eps"], weight_decay=p["weight_decay"])

    return build


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _without_log_message(logger_name: str, text: str):
    """Drop log records of ``logger_name`` that contain ``text`` inside the block (nothing else)."""
    f = _DropMessage(text)
    logger = logging.getLogger(logger_name)
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def build_engine(model: torch.nn.Module, ds_config: dict, train_cfg=None, *, param_groups=None, lr_factor=None):
    """``deepspeed.initialize`` with AutoEP; returns the engine (MoE blocks replaced by AutoEPMoELayer).

    ``param_groups``: optimizer groups (dicts with "name"); AutoEP re-points them at the
    replacement parameters and splits the experts into their own MoE groups.
    ``lr_factor(group, step)``: per-group multiplier of the LR at optimizer step ``step``
    (1-based); 0 freezes that group for that step (the phase schedule edits groups this way).
    With ``lr_factor`` (the method modes) the optimizer is desmoe's MaskedAdamW (the same AdamW
    settings; frozen groups and masked expert rows skipped), passed as DeepSpeed's client optimizer.
    """
    import deepspeed

    scheduler = None
    if train_cfg is not None:
        base = lr_lambda(train_cfg)

        def make_scheduler(opt):
            if lr_factor is None:
                return torch.optim.lr_scheduler.LambdaLR(opt, base)
            fns = [(lambda s, g=g: base(s) * lr_factor(g, s + 1)) for g in opt.param_groups]
            return torch.optim.lr_scheduler.LambdaLR(opt, fns)

        scheduler = make_scheduler
    params = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if lr_factor is not None and ds_config.get("optimizer", {}).get("type") == "AdamW":
        optimizer = masked_adamw_factory(ds_config)
        # NOTE: DeepSpeed vets ZeRO optimizers by exact type; MaskedAdamW is torch's AdamW (a subclass)
        # with the same state and groups, so it is allowed explicitly. The settings live in the optimizer.
        ds_config = {**{k: v for k, v in ds_config.items() if k != "optimizer"}, "zero_allow_untested_optimizer": True}
    # NOTE: DeepSpeed warns about an "untested optimizer" for any client optimizer that is not exactly
    # one of its classes; MaskedAdamW is torch's AdamW (tested here under ZeRO 1 and 2), so that one
    # warning would only alarm users. "DeepSpeed" is deepspeed.utils.logger's name.
    quiet = _without_log_message("DeepSpeed", "untested optimizer") if optimizer else contextlib.nullcontext()
    with quiet:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                               optimizer=optimizer, lr_scheduler=scheduler)
    inner = getattr(engine.optimizer, "optimizer", None)
    if isinstance(inner, MaskedAdamW) and ds_config.get("zero_optimization", {}).get("stage") == 3:
        inner.state_for_frozen_groups = True  # ZeRO 3 hands it each sub-group's partition only while stepping
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # NOTE: ZeRO checks gradients for inf/NaN (and skips the step on every rank) only for fp16 and
        # bf16 by default; desmoe wants the same guard in fp32 (train.max_bad_steps).
        engine.optimizer.check_grad_overflow = True
    return engine


def autocast(engine):
    """The engine's ``torch_autocast`` context, the one ``engine.forward`` enters, for calls that bypass
    forward (evaluation's ``engine.module.generate``); a no-op unless the ds_config enables torch_autocast."""
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    return autocast_if_enabled(engine)


def autoep_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every AutoEPMoELayer in ``module``, in model order."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, AutoEPMoELayer)]
