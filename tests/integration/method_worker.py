"""Run under torchrun: a desmoe-mode run through the real recipe, recording what each step changed.

argv: OUT_DIR CONFIG [overrides...]. Writes <OUT_DIR>/method_rank<R>.json with: step-0 logit
difference against the plain HF model, every routing observation (layer, step, domain,
selected experts) for the affinity reference, the affinity history, and after every
optimizer step the phase, the rows frozen for that step, and checksums of every
parameter (per row for fused expert tensors).
"""

import hashlib
import json
import os
import sys

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.engine import autoep_layers  # noqa: E402
from desmoe.launch import build_arg_parser, exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.train import build_model, cleanup, setup, train  # noqa: E402


def digest(t) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def snapshot(engine, method):
    import deepspeed

    expert_ids = {id(ep.param) for ep in method.expert_params}
    out = {}
    params = list(engine.module.named_parameters())
    # ZeRO 3: every rank gathers the full parameters (a collective: all ranks snapshot at the same steps)
    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero3):
        for name, p in params:
            out[name] = [digest(r) for r in p] if id(p) in expert_ids else digest(p)
    return out


def main():
    out_dir, config, *overrides = sys.argv[1:]
    quiet_libraries()
    args = build_arg_parser().parse_args(["--config", config, "--output-dir", os.path.join(out_dir, "run"),
                                          *overrides])
    run = setup(args)
    engine, method = run.engine, run.method

    # step 0: the adaptive router must not change routing (or logits) before training
    reference = build_model(run.cfg).eval()
    ids = run.domains[next(iter(run.domains))].eval_ids[:2]
    engine.eval()
    with torch.no_grad():
        diff = (engine(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    engine.train()
    del reference

    observations = []

    def observe(li):
        def hook(router, inputs, output):
            if method.training_forward:
                real = method.real_tokens
                observations.append({"layer": li, "step": method.step, "domain": method.domain_index,
                                     "selected": output[1].tolist(),
                                     "real": real.tolist() if real is not None else [True] * output[1].shape[0]})
        return hook

    layers = dict(autoep_layers(engine.module))
    for li, i in enumerate(method.moe_layers):
        layers[method.family.moe_block_path(i)].router.register_forward_hook(observe(li))

    steps = [{"step": 0, "params": snapshot(engine, method)}]
    end_step = method.end_step

    def recording_end_step(step):
        frozen = {str(k): v.int().tolist() for k, v in (method._frozen or {}).items()}
        steps.append({"step": step, "phase": method.phase, "lambda": method.lam, "frozen": frozen,
                      "params": snapshot(engine, method)})
        return end_step(step)

    method.end_step = recording_end_step
    train(run)
    expert_names = sorted({n for n, p in engine.module.named_parameters()
                           if id(p) in {id(ep.param) for ep in method.expert_params}})
    kinds = {}
    for name, _ in engine.module.named_parameters():
        kinds[name] = ("expert" if name in expert_names else "router" if (".router." in name or "adaptive_router" in name)
                       else "shared" if ".shared_expert" in name else "backbone")
    with open(os.path.join(out_dir, f"method_rank{run.rank}.json"), "w") as f:
        json.dump({"step0_max_abs_diff": diff, "observations": observations, "history": method.history,
                   "steps": steps, "kinds": kinds, "domains": list(run.domains),
                   "expert_layer": {ep.name: ep.layer for ep in method.expert_params},
                   "expert_param_layer": {n: int(n.split(".")[2]) for n in expert_names},
                   "moe_layers": method.moe_layers, "ep_rank": method.expert_params[0].ep_rank,
                   "num_local": method.expert_params[0].num_local,
                   "masks": method.masks.int().tolist() if method.masks is not None else None}, f)
    cleanup(run)


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
