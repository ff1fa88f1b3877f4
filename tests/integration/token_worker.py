"""Run under torchrun (2 ranks, ep_size 2): per-token isolation against a reference built from
single-rank contributions. Rank r trains on domain r. Writes <OUT>/token_rank<R>.json."""

import json
import os
import sys

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.config import config_from_dict  # noqa: E402
from desmoe.data import ByteTokenizer  # noqa: E402
from desmoe.engine import build_ds_config, build_engine  # noqa: E402
from desmoe.method import DesMoE  # noqa: E402
from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices  # noqa: E402
from desmoe.schedule import STABILIZATION  # noqa: E402
from desmoe.launch import exit_without_finalization, quiet_libraries  # noqa: E402


def main():
    out_dir = sys.argv[1]
    quiet_libraries()
    dist.init_distributed("gloo")
    world, rank = dist.get_world_size_and_rank()
    cfg = config_from_dict({"model": {"tiny": {"model_type": "qwen3_moe"}}, "parallel": {"ep_size": 2},
                            "train": {"micro_batch_size": 2, "max_steps": 10},
                            "method": {"mode": "desmoe", "isolation": "token"}})
    model = build_tiny_model(cfg.model.tiny, seed=5)
    method = DesMoE(cfg, model, moe_layer_indices(model.config), ["A", "B"])
    ds = build_ds_config(cfg, FAMILIES["qwen3_moe"], model.config)
    # every group's LR is 0: each pass is a real engine.backward + engine.step that moves nothing
    engine = build_engine(model, ds, cfg.train, param_groups=method.param_groups(model),
                          lr_factor=lambda group, step: 0.0)
    method.attach(engine)
    n_layers = len(method.moe_layers)
    masks = torch.zeros(n_layers, 2, 8, dtype=torch.bool)
    for e in range(8):
        masks[:, 0, e] = e % 2 == 0  # domain A: even experts
        masks[:, 1, e] = e % 3 == 0  # domain B: 0, 3, 6
    method.masks, method.phase, method.lam = masks, STABILIZATION, 0.0

    tok = ByteTokenizer()
    text = ["the quick brown fox jumps over the lazy dog " * 3, "def f(x):\n    return x * 2 + 1\n" * 4][rank]
    ids = torch.tensor([tok.encode(text)[:40], tok.encode(text)[5:45]])
    expert_ids = {id(ep.param) for ep in method.expert_params}

    from deepspeed.utils import safe_get_full_grad

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

    def grads(weight_mine: float, weight_other: float, isolate: bool):
        """The engine's reduced gradients of the weighted losses (any reduction scaling is the same in
        every pass, and the comparison below is linear, so it cancels)."""
        method.begin_micro_batch(["A", "B"][rank])
        for tm in method.token_maskers:
            tm.active = isolate
        loss = engine(input_ids=ids, labels=ids).loss
        method.training_forward = False
        engine.backward(loss * (weight_mine if rank == 0 else weight_other))
        out = {}
        for n, p in named:
            g = safe_get_full_grad(p)
            if g is not None:
                out[n] = g.detach().clone()
        engine.step()
        return out

    g0 = grads(1.0, 0.0, False)  # only rank 0's tokens (domain A)
    g1 = grads(0.0, 1.0, False)  # only rank 1's tokens (domain B)
    full = grads(1.0, 1.0, False)
    iso = grads(1.0, 1.0, True)
    ep = method.expert_params[0]
    result = {"expert": {}, "other_max_diff": 0.0, "sum_check": 0.0}
    for name, p in engine.module.named_parameters():
        if name not in iso:
            continue
        if id(p) in expert_ids:
            li = [e.layer for e in method.expert_params if e.param is p][0]
            rows = []
            for i in range(ep.num_local):
                g = ep.ep_rank * ep.num_local + i
                want = masks[li, 0, g] * g0[name][i] + masks[li, 1, g] * g1[name][i]
                rows.append({"global": g, "diff": (iso[name][i] - want).abs().max().item(),
                             "norm": want.abs().max().item()})
            result["expert"][name] = rows
            result["sum_check"] = max(result["sum_check"], (full[name] - g0[name] - g1[name]).abs().max().item())
        else:
            result["other_max_diff"] = max(result["other_max_diff"], (iso[name] - full[name]).abs().max().item())
    with open(os.path.join(out_dir, f"token_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy()


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
