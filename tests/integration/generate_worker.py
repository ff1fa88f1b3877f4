"""Run under torchrun (2 ranks, gloo, AutoEP ep_size 2): evaluation's greedy generation through the
real DeepSpeed engine, KV-cached (``engine.module.generate``, synced) and forward-only (the
reference, through ``engine(...)``), with ranks holding different numbers of prompts. Rank 0 holds
5 prompts, rank 1 one: in batches of 2, rank 1 runs two dummy batches.

    generate_worker.py OUT MODEL_TYPE

Writes <OUT>/generate_rank<R>.json: this rank's prompts, the tokens of every pass, and how many
forwards each pass ran on this rank.
"""

import json
import os
import sys

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.config import config_from_dict  # noqa: E402
from desmoe.engine import build_ds_config, build_engine  # noqa: E402
from desmoe.launch import exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.method import DesMoE  # noqa: E402
from desmoe.metrics import cached_greedy_generate, greedy_generate  # noqa: E402
from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices  # noqa: E402

SEED = 5
NEW = 6
BATCH = 2
LENGTHS = (3, 9, 1, 6, 4, 7)


def prompts_of_every_rank() -> list[list[list[int]]]:
    """The prompts of rank 0 and rank 1 (5 and 1)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS]
    return [prompts[:5], prompts[5:]]


def main():
    out_dir, model_type = sys.argv[1], sys.argv[2]
    quiet_libraries()
    dist.init_distributed("gloo")
    world, rank = dist.get_world_size_and_rank()
    assert world == 2
    cfg = config_from_dict({"model": {"tiny": {"model_type": model_type}}, "parallel": {"ep_size": 2},
                            "train": {"micro_batch_size": BATCH, "max_steps": 10}, "method": {"mode": "desmoe"}})
    model = build_tiny_model(cfg.model.tiny, seed=SEED)
    method = DesMoE(cfg, model, moe_layer_indices(model.config), ["A", "B"])
    ds = build_ds_config(cfg, FAMILIES[model_type], model.config)
    engine = build_engine(model, ds, cfg.train, param_groups=method.param_groups(model),
                          lr_factor=lambda group, step: 0.0)
    method.attach(engine)  # the adaptive-router hooks: in eval they add the (here zero) residual
    engine.eval()
    module = engine.module
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    mine = prompts_of_every_rank()[rank]
    num_batches = -(-max(len(p) for p in prompts_of_every_rank()) // BATCH)

    def forward(ids, mask, positions):
        return engine(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    def run(name, eos_id, cached):
        calls[0] = 0
        kw = dict(max_new_tokens=NEW, eos_id=eos_id, pad_id=0, batch_size=BATCH, num_batches=num_batches)
        if cached:
            tokens = cached_greedy_generate(module, mine, synced=True, **kw)
        else:
            tokens = greedy_generate(forward, mine, **kw)
        result[name] = {"tokens": tokens, "forwards": calls[0]}
        return tokens

    result = {"rank": rank, "prompts": mine, "num_batches": num_batches, "seed": SEED, "new": NEW, "batch": BATCH}
    with torch.no_grad():
        free = run("reference", 2, cached=False)
        run("cached", 2, cached=True)
        # an eos the continuations produce: rank 1's only row stops after one token while rank 0's
        # rows run on, so rank 1 finishes its first batch first and has to keep running forwards
        eos = dist.all_gather_objects(free)[1][0][1]
        result["eos"] = eos
        run("reference_eos", eos, cached=False)
        run("cached_eos", eos, cached=True)
        # a non-zero adaptive-router residual: generation sees the hook (both paths alike)
        g = torch.Generator().manual_seed(3)
        for i in method.moe_layers:
            alr = FAMILIES[model_type].decoder_layers(module)[i].adaptive_router
            alr.w2.copy_(torch.randn(alr.w2.shape, generator=g) * 0.5)
            alr.b2.copy_(torch.randn(alr.b2.shape, generator=g) * 2.0)
        run("reference_alr", eos, cached=False)
        run("cached_alr", eos, cached=True)
    with open(os.path.join(out_dir, f"generate_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy()


if __name__ == "__main__":
    main()
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
