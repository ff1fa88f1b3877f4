"""Run under torchrun: resume a run (the real setup), compare what the engine holds right after the load with
the checkpoint's universal conversion, then train on.

argv: OUT_DIR RUN_DIR [overrides...]. Writes <OUT_DIR>/loaded_rank<R>.json: per parameter the max abs
difference of its fp32 weight, exp_avg and exp_avg_sq (this rank's experts: their rows of the universal
[E_global, ...] tensor) from the universal files, the Adam steps, DeepSpeed's step counters, the desmoe
state the rank resumed with, and the training summary.
"""

import json
import math
import os
import sys

import torch

from desmoe import dist

dist.setup_env()

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from desmoe import checkpoint, reshard  # noqa: E402
from desmoe.engine import autoep_layers  # noqa: E402
from desmoe.launch import build_arg_parser, exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.train import cleanup, setup, train  # noqa: E402


def universal(udir, name, key):
    path = os.path.join(udir, "zero", name, f"{key}.pt")
    if not os.path.isfile(path):
        return None
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj["param"] if isinstance(obj, dict) else obj  # (the ZeRO-3 conversion saves some as plain tensors)


def full_weight(p):
    """(trainable, full fp32 weight) of a parameter: ZeRO's master copy, or the module's own (frozen)."""
    hp = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") or hasattr(p, "_z3_optimizer") else None
    if hp is not None:
        return True, hp
    if hasattr(p, "ds_id"):  # ZeRO 3, not in the optimizer: gather the partitions
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([p]):
            return False, p.detach().clone()
    return False, p


def diff(a, b):
    if a is None or b is None:
        return None if a is None and b is None else "missing " + ("engine" if a is None else "universal")
    a, b = a.detach().float().cpu(), b.float()
    if a.shape != b.shape and a.numel() == b.numel():
        a, b = a.reshape(-1), b.reshape(-1)  # (the ZeRO-3 conversion stores some weights flat)
    if a.shape != b.shape:
        return f"shape {list(a.shape)} != {list(b.shape)}"
    return (a - b).abs().max().item() if a.numel() else 0.0


def compare(run, udir):
    """Every parameter of the engine against the universal files (every rank calls the gathers in order)."""
    opt = run.engine.optimizer
    stateless = {id(p) for g in reshard.read_source(udir)["stateless_groups"] for p in opt.bit16_groups[g]}
    experts = {}
    for path, moe in autoep_layers(run.engine.module):
        for w in ("w1", "w2", "w3"):
            start = moe.ep_rank * moe.num_local_experts
            experts[f"{path}.experts.{w}"] = (start, start + moe.num_local_experts)
    out = {}
    for name, p in run.engine.module.named_parameters():
        rows = experts.get(name)

        def ref(key):
            t = universal(udir, name, key)
            return t if t is None or rows is None else t[rows[0]:rows[1]]

        trainable, weight = full_weight(p)
        entry = {"trainable": trainable, "fp32": diff(weight, ref("fp32"))}
        if trainable:
            for key in ("exp_avg", "exp_avg_sq"):
                if id(p) in stateless:  # a group without optimizer state (frozen so far), as in the checkpoint
                    mapping = getattr(p, "_hp_mapping", None)
                    held = mapping is not None and key in mapping.optim_fragment
                    saved = ref(key)
                    entry[key] = ("held" if held else "no state") + (
                        "" if saved is None or not saved.any() else ", saved non-zero")
                else:
                    entry[key] = diff(safe_get_full_optimizer_state(p, key), ref(key))
        out[name] = entry
    return out


def optimizer_groups(engine, udir):
    """Per optimizer group: this job's name, settings and Adam step(s) right after the load, and the saved
    group's settings and steps in the universal files."""
    opt = engine.optimizer
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    saved = torch.load(os.path.join(udir, "zero", "optimizer_state.pt"), weights_only=False)
    if zero3:
        saved_groups, saved_states = saved["optimizer_state_dict"]["param_groups"], saved["optimizer_state_dict"]["state"]
    else:
        saved_groups = saved["param_groups"]
    out = []
    for i, g in enumerate(opt.optimizer.param_groups):
        if zero3:
            flats = [f for sub, f in enumerate(opt.fp32_partitioned_groups_flat) if opt.sub_group_to_group_id[sub] == i]
            saved_steps = [float(saved_states[k]["step"]) for k in saved_groups[i]["params"]]
        else:
            flats = g["params"]
            saved_steps = [float(torch.load(os.path.join(udir, "zero", opt.param_names[lp], "step.pt"), weights_only=False))
                           for lp in opt.bit16_groups[i]]
        state = opt.optimizer.state
        out.append({"name": g.get("name"), "moe": bool(g.get("moe")), "lr": g["lr"], "weight_decay": g["weight_decay"],
                    "steps": sorted({float(state[f]["step"]) for f in flats if "step" in state[f]}),
                    "saved_name": saved_groups[i].get("name"), "saved_lr": saved_groups[i]["lr"],
                    "saved_weight_decay": saved_groups[i]["weight_decay"], "saved_steps": sorted(set(saved_steps))})
    return out


def plain(x):
    if torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items() if k != "rng"}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def main():
    out_dir, run_dir, *overrides = sys.argv[1:]
    quiet_libraries()
    run = setup(build_arg_parser().parse_args(["--resume", run_dir, *overrides]))
    root, tag = checkpoint.find_resumable(run_dir)
    udir = reshard.universal_dir(root, tag)
    params = compare(run, udir)
    loaded = {"params": params, "groups": optimizer_groups(run.engine, udir),
              "stateless_groups": reshard.read_source(udir)["stateless_groups"],
              "global_steps": run.engine.global_steps, "skipped_steps": run.engine.skipped_steps,
              "lr_scheduler": plain(run.engine.lr_scheduler.state_dict()), "start_step": run.start_step,
              "state": plain(run.resumed), "rng_torch_head": run.resumed["rng"]["torch"][:16].tolist(),
              "method": plain(run.method.state_dict()), "sampler": run.sampler.state_dict()}
    summary = train(run)
    loaded["summary"] = {"steps": summary["steps"], "world_size": summary.get("world_size"),
                         "finite": all(math.isfinite(v) for v in summary["eval_loss_after"].values())}
    with open(os.path.join(out_dir, f"loaded_rank{run.rank}.json"), "w") as f:
        json.dump(loaded, f)
    cleanup(run)


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
