"""Run under torchrun: the real recipe (setup + train, which saves the final checkpoint), then the
engine's logits on a fixed batch, in eval mode, on every rank (expert parallelism needs both).

argv: OUT_DIR CONFIG [overrides...]. Rank 0 writes <OUT_DIR>/engine_logits.pt with input_ids,
logits (adaptive routers in place, as the engine evaluates) and, in ALR modes,
logits_without_alr (every residual MLP's output layer zeroed: the engine's own router weight alone).
"""

import os
import sys

from desmoe import dist

dist.setup_env()

import deepspeed  # noqa: E402
import torch  # noqa: E402

from desmoe.launch import build_arg_parser, exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.train import cleanup, device_of, setup, train  # noqa: E402


def main():
    out_dir, config, *overrides = sys.argv[1:]
    quiet_libraries()
    args = build_arg_parser().parse_args(["--config", config, "--output-dir", os.path.join(out_dir, "run"),
                                          *overrides])
    run = setup(args)
    train(run)
    engine, method = run.engine, run.method
    ids = next(iter(run.domains.values())).eval_ids[:2]
    engine.eval()
    record = {"input_ids": ids}
    with torch.no_grad():
        record["logits"] = engine(input_ids=ids.to(device_of(engine))).logits.float().cpu()
        if getattr(method, "use_alr", False):  # DesMoE in an ALR mode (full fine-tuning has no ALR)
            routers = [method.family.decoder_layers(engine.module)[i].adaptive_router for i in method.moe_layers]
            params = [q for r in routers for q in (r.w2, r.b2)]
            # ZeRO 3: every rank gathers the partitioned weights; changes made inside are kept (modifier_rank)
            zero3 = any(hasattr(q, "ds_id") for q in params)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3):
                record["alr_w2_abs_max"] = max(r.w2.abs().max().item() for r in routers)
                saved = [(r.w2.clone(), r.b2.clone()) for r in routers]
                for r in routers:
                    r.w2.zero_()
                    r.b2.zero_()
            record["logits_without_alr"] = engine(input_ids=ids.to(device_of(engine))).logits.float().cpu()
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3):
                for r, (w2, b2) in zip(routers, saved):
                    r.w2.copy_(w2)
                    r.b2.copy_(b2)
    if run.rank == 0:
        torch.save(record, os.path.join(out_dir, "engine_logits.pt"))
    cleanup(run)


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
