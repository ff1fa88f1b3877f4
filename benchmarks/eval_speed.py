"""Evaluation's greedy generation: forward-only (one full forward per new token, the old path) against
KV-cached ``generate`` (desmoe.metrics.cached_greedy_generate), the same prompts, side by side in one run.

    python benchmarks/eval_speed.py [--model-type qwen3_moe] [--prompts 32] [--batch-size 4]
        [--max-new-tokens 32] [--min-len 16] [--max-len 160] [--repeats 3] [--nproc 2]

In one process on a tiny model (fp32, eval mode), then (``--nproc`` > 1) on that many ranks through the
real DeepSpeed engine with AutoEP (ep_size = nproc, gloo on the CPU), each rank holding its share
of the prompts as evaluation does (desmoe.evaluation._generate). The two paths alternate (old, new,
new, old, ...); each is timed by its median over ``--repeats``; the tokens must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from desmoe import dist  # noqa: E402

dist.setup_env()

import torch  # noqa: E402

from desmoe.metrics import cached_greedy_generate, greedy_generate  # noqa: E402
from desmoe.models import FAMILIES, build_tiny_model  # noqa: E402


def prompts_of(a) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.min_len, a.max_len + 1, (a.prompts,), generator=g).tolist()
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def compare(forward, model, prompts, a, *, num_batches=None, synced=False) -> dict:
    """Median seconds of both paths over a.repeats (alternating), and whether their tokens are equal."""
    kw = dict(max_new_tokens=a.max_new_tokens, eos_id=2, pad_id=0, batch_size=a.batch_size, num_batches=num_batches)
    paths = {"forward_only": lambda: greedy_generate(forward, prompts, **kw),
             "cached": lambda: cached_greedy_generate(model, prompts, synced=synced, **kw)}
    times, tokens = {k: [] for k in paths}, {}
    for rep in range(a.repeats):
        for name in (("forward_only", "cached") if rep % 2 == 0 else ("cached", "forward_only")):
            if synced:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                tokens[name] = paths[name]()
            times[name].append(time.perf_counter() - t0)
    old, new = statistics.median(times["forward_only"]), statistics.median(times["cached"])
    return {"forward_only_s": old, "cached_s": new, "speedup": old / new,
            "tokens_equal": tokens["forward_only"] == tokens["cached"],
            "new_tokens": sum(len(t) for t in tokens["cached"])}


def one_process(a) -> dict:
    model = build_tiny_model({"model_type": a.model_type}, seed=0).float().eval()

    def forward(ids, mask, positions):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    return compare(forward, model, prompts_of(a), a)


def ranks_worker(out_dir: str, a) -> None:
    """Under torchrun: the real engine (AutoEP ep_size = world), each rank its share of the prompts."""
    from desmoe.config import config_from_dict
    from desmoe.engine import build_ds_config, build_engine
    from desmoe.launch import quiet_libraries
    from desmoe.method import build_method

    quiet_libraries()
    dist.init_distributed("gloo")
    world, rank = dist.get_world_size_and_rank()
    cfg = config_from_dict({"model": {"tiny": {"model_type": a.model_type}}, "parallel": {"ep_size": world},
                            "train": {"micro_batch_size": a.batch_size, "max_steps": 10},
                            "method": {"mode": "desmoe"}})
    family = FAMILIES[a.model_type]
    model = build_tiny_model(cfg.model.tiny, seed=0)
    method = build_method(cfg, model, family, ["A", "B"])
    engine = build_engine(model, build_ds_config(cfg, family, model.config), cfg.train,
                          param_groups=method.param_groups(model), lr_factor=lambda group, step: 0.0)
    method.attach(engine)
    engine.eval()

    def forward(ids, mask, positions):
        return engine(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    prompts = prompts_of(a)
    num_batches = -(-(-(-len(prompts) // world)) // a.batch_size)  # as desmoe.evaluation._generate
    res = compare(forward, engine.module, prompts[rank::world], a, num_batches=num_batches, synced=True)
    every = dist.all_gather_objects(res)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"world": world, "ranks": every}, f)
    dist.destroy()


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="qwen3_moe", choices=sorted(FAMILIES))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the second measurement (1: skip it)")
    return p


def line(where: str, r: dict) -> str:
    return (f"{where:<22} forward-only {r['forward_only_s']:.3f} s, cached {r['cached_s']:.3f} s -> "
            f"{r['speedup']:.2f}x faster ({r['new_tokens']} new tokens, tokens equal: {r['tokens_equal']})")


def main() -> int:
    if "LOCAL_RANK" in os.environ:  # started by run_worker under torchrun: argv = [scratch dir, options]
        ranks_worker(sys.argv[1], arg_parser().parse_args(sys.argv[2:]))
        return 0
    a = arg_parser().parse_args()
    print(f"{a.model_type} tiny, fp32, {a.prompts} prompts of {a.min_len}..{a.max_len} tokens, batch {a.batch_size}, "
          f"{a.max_new_tokens} new tokens, median of {a.repeats}", flush=True)
    single = one_process(a)
    print(line("1 process", single), flush=True)
    ok = single["tokens_equal"]
    if a.nproc > 1:
        from benchmarks._common import run_worker

        opts = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k != "nproc"]
        res = run_worker("eval_speed.py", a.nproc, *opts)
        if isinstance(res, int):
            return res
        for r, part in enumerate(res["ranks"]):
            print(line(f"{res['world']} ranks (rank {r})", part), flush=True)
            ok = ok and part["tokens_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
