"""Run under torchrun: the real recipe (setup + train), then inspect the engine on every rank.

argv: OUT_DIR CONFIG [overrides...]. Writes <OUT_DIR>/inspect_rank<R>.json with, per
parameter, its kind (expert or replicated), local shape, and a checksum before and after
training.
"""

import hashlib
import json
import os
import sys

from desmoe import dist

dist.setup_env()

from desmoe.engine import autoep_layers  # noqa: E402
from desmoe.launch import build_arg_parser, exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.train import cleanup, setup, train  # noqa: E402


def checksum(t) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def snapshot(engine):
    return {n: checksum(p) for n, p in engine.module.named_parameters()}


def main():
    out_dir, config, *overrides = sys.argv[1:]
    quiet_libraries()
    args = build_arg_parser().parse_args(["--config", config, "--output-dir", os.path.join(out_dir, "run"),
                                          *overrides])
    run = setup(args)
    before = snapshot(run.engine)
    summary = train(run)
    after = snapshot(run.engine)
    params = {}
    for name, p in run.engine.module.named_parameters():
        params[name] = {"expert": getattr(p, "allreduce", True) is False, "shape": list(p.shape),
                        "before": before[name], "after": after[name]}
    layers = [{"name": n, "ep_rank": m.ep_rank, "num_local_experts": m.num_local_experts,
               "num_experts": m.num_experts} for n, m in autoep_layers(run.engine.module)]
    with open(os.path.join(out_dir, f"inspect_rank{run.rank}.json"), "w") as f:
        json.dump({"params": params, "layers": layers, "summary": summary}, f)
    cleanup(run)


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
