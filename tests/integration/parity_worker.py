"""Run under torchrun: for every family and ep_size in argv, the AutoEP engine's logits vs plain HF.

argv: OUT_DIR EP_SIZES [ZERO_STAGE [DS_CONFIG]] (ZeRO stage 1 by default).

Writes <out>/parity_rank<R>.json: [{"model_type", "ep_size", "max_abs_diff", "local_experts"}].
"""

import copy
import json
import os
import sys

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.engine import autoep_layers, build_ds_config, build_engine  # noqa: E402
from desmoe.config import config_from_dict  # noqa: E402
from desmoe.models import FAMILIES, build_tiny_model  # noqa: E402
from desmoe.launch import exit_without_finalization, quiet_libraries  # noqa: E402


def main():
    out_dir, ep_sizes = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    stage = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    ds_json = sys.argv[4] if len(sys.argv) > 4 else None
    quiet_libraries()
    dist.init_distributed("gloo")
    world, rank = dist.get_world_size_and_rank()
    results = []
    for ep in ep_sizes:
        for model_type in sorted(FAMILIES):
            model = build_tiny_model({"model_type": model_type}, seed=11)
            reference = copy.deepcopy(model).eval()
            cfg = config_from_dict({"model": {"tiny": {"model_type": model_type}},
                                    "parallel": {"ep_size": ep, "zero_stage": stage, "ds_config": ds_json},
                                    "train": {"micro_batch_size": 2}})
            engine = build_engine(model, build_ds_config(cfg, FAMILIES[model_type], model.config))
            engine.eval()
            # different tokens on each rank: under EP each rank's experts serve both ranks' tokens
            ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                got = engine(input_ids=ids).logits
                want = reference(input_ids=ids).logits
            layers = autoep_layers(engine.module)
            results.append({"model_type": model_type, "ep_size": ep, "rank": rank, "world_size": world, "zero_stage": stage,
                            "max_abs_diff": (got - want).abs().max().item(), "autoep_layers": len(layers),
                            "local_experts": [m.num_local_experts for _, m in layers],
                            "num_experts": [m.num_experts for _, m in layers]})
    with open(os.path.join(out_dir, f"parity_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy()


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
