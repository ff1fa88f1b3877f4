"""Worker of benchmarks/step_time.py (run under torchrun)."""

import json
import os
import statistics
import sys
import time

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.data import DomainSampler  # noqa: E402
from desmoe.engine import build_engine  # noqa: E402
from desmoe.launch import quiet_libraries  # noqa: E402
from desmoe.train import build_model, device_of  # noqa: E402

from benchmarks._common import run_recipe  # noqa: E402


def bare_loop(cfg, ds_config, batches, warmup):
    """forward -> backward -> step with nothing else; returns tokens/s after warm-up."""
    engine = build_engine(build_model(cfg), ds_config, cfg.train)
    device = device_of(engine)
    tokens = 0
    for i, (ids, labels) in enumerate(batches):
        if i == warmup:
            dist.barrier()
            t0, tokens = time.perf_counter(), 0
        out = engine(input_ids=ids.to(device), labels=labels.to(device))
        engine.backward(out.loss)
        engine.step()
        tokens += int((labels != -100).sum())
    dist.barrier()
    total = torch.tensor([float(tokens)])
    dist.all_reduce_sum(total)
    return float(total) / (time.perf_counter() - t0)


def recipe_loop(out_dir, config, steps, overrides, warmup, rep):
    run, rows = run_recipe(os.path.join(out_dir, f"r{rep}"), config, [f"train.max_steps={steps}", *overrides])
    # elapsed_s is read at the end of each step, so consecutive differences include logging.
    by_step = {}
    for r in rows:
        by_step[r["step"]] = (r["elapsed_s"], r["tokens"])
    tps = 0.0
    if rows:
        t = by_step[steps][0] - by_step[warmup][0]
        toks = sum(by_step[s][1] for s in range(warmup + 1, steps + 1))
        tps = toks / t
    return run, dist.broadcast_object(tps)


def main():
    out_dir, config, steps, warmup, repeats, *overrides = sys.argv[1:]
    steps, warmup, repeats = int(steps), int(warmup), int(repeats)
    quiet_libraries()
    bare, recipe = [], []
    run = None
    for rep in range(repeats):
        # alternate which loop goes first, so warm caches and clock drift favour neither
        if rep % 2 == 1:
            bare.append(bare_loop(run.cfg, run.ds_config, batches, warmup * run.cfg.train.grad_accum_steps))
        run, tps = recipe_loop(out_dir, config, steps, overrides, warmup, rep)
        recipe.append(tps)
        # the same batches the recipe drew on this rank, replayed by the bare loop
        sampler = DomainSampler(run.domains, micro_batch_size=run.cfg.train.micro_batch_size,
                                seed=run.cfg.run.seed, rank=run.rank, world_size=run.world_size)
        n = steps * run.cfg.train.grad_accum_steps
        batches = [sampler.next_batch()[1:] for _ in range(n)]
        if rep % 2 == 0:
            bare.append(bare_loop(run.cfg, run.ds_config, batches, warmup * run.cfg.train.grad_accum_steps))
    if run.master:
        res = {"world_size": run.world_size, "ep_size": run.cfg.parallel.ep_size, "steps_timed": steps - warmup,
               "micro_batch_size": run.cfg.train.micro_batch_size, "seq_len": run.cfg.data.seq_len,
               "recipe_runs_tokens_per_s": recipe, "bare_runs_tokens_per_s": bare,
               "recipe_tokens_per_s": statistics.median(recipe), "bare_tokens_per_s": statistics.median(bare)}
        res["ratio"] = res["recipe_tokens_per_s"] / res["bare_tokens_per_s"]
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f)
    dist.destroy()


if __name__ == "__main__":
    main()
