"""Run under torchrun (2 ranks, gloo): rank 1 resolves a different config; check_same_config must
refuse it on every rank. argv: OUT_DIR CONFIG."""

import json
import os
import sys

from desmoe import dist

dist.setup_env()

from desmoe.config import ConfigError, load_config  # noqa: E402
from desmoe.launch import check_same_config, exit_without_finalization  # noqa: E402


def main():
    out_dir, config = sys.argv[1:]
    dist.init_distributed("gloo", 60)
    world, rank = dist.get_world_size_and_rank()
    cfg = load_config(config, ["train.lr=0.5"] if rank == 1 else [])
    same = load_config(config)
    check_same_config(same, rank, world)  # identical configs pass
    try:
        check_same_config(cfg, rank, world)
        result = "passed"
    except ConfigError as e:
        result = str(e)
    with open(os.path.join(out_dir, f"hash_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # both ranks are done with the group before either tears it down
    dist.destroy()


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
