"""ZeRO 3 step time after an evaluation that comes before the engine's first training step.

    torchrun --nproc_per_node 2 benchmarks/zero3_eval_order.py OUT_DIR CONFIG [overrides ...]
    (e.g. configs/demo.yaml parallel.zero_stage=3 parallel.ds_config=tests/integration/zero3_partitioned.json
     tracking.mlflow=false)

Found while measuring the recipe against the bare loop under ZeRO 3 with every parameter partitioned
(benchmarks/results/zero3/): the recipe's engine was slower in the very same loop. Here, in one process
per rank and on the same batches: seconds per step of a fresh engine that trains at once, of one that
is evaluated (desmoe.train.evaluate: losses and greedy generation) before its first training step, and
of such an engine after DeepSpeed's empty_partition_cache or its parameter coordinator's reset_step.
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from desmoe import dist  # noqa: E402

dist.setup_env()

from desmoe import train as recipe  # noqa: E402
from desmoe.data import DomainSampler  # noqa: E402
from desmoe.engine import build_engine  # noqa: E402
from desmoe.launch import build_arg_parser, quiet_libraries  # noqa: E402


def main():
    out, config, *overrides = sys.argv[1:]
    quiet_libraries()
    args = build_arg_parser().parse_args(["--config", config, "--output-dir", out, "run.overwrite=true",
                                          "checkpoint.save_final=false", "train.warmup_steps=0", *overrides])
    run = recipe.setup(args)
    sampler = DomainSampler(run.domains, micro_batch_size=run.cfg.train.micro_batch_size, seed=run.cfg.run.seed,
                            rank=run.rank, world_size=run.world_size)
    batches = [sampler.next_batch()[1:] for _ in range(40)]

    def seconds_per_step(engine) -> float:
        dev = recipe.device_of(engine)
        engine.train()
        for i, (ids, labels) in enumerate(batches):
            if i == 8:
                dist.barrier()
                t0 = time.perf_counter()
            out = engine(input_ids=ids.to(dev), labels=labels.to(dev))
            engine.backward(out.loss)
            engine.step()
        dist.barrier()
        return (time.perf_counter() - t0) / (len(batches) - 8)

    def fresh():
        return build_engine(recipe.build_model(run.cfg), run.ds_config, run.cfg.train)

    def evaluated(after=None):
        engine = fresh()
        recipe.evaluate(dataclasses.replace(run, engine=engine))
        if after == "empty_partition_cache":
            engine.empty_partition_cache()
        elif after == "reset_step":
            engine.optimizer.parameter_offload.get_param_coordinator().reset_step()
        return engine

    rows = [("trains at once", seconds_per_step(fresh())),
            ("evaluated before its first step", seconds_per_step(evaluated())),
            ("evaluated, then empty_partition_cache()", seconds_per_step(evaluated("empty_partition_cache"))),
            ("evaluated, then the coordinator's reset_step()", seconds_per_step(evaluated("reset_step"))),
            ("trains at once (again)", seconds_per_step(fresh()))]
    if run.master:
        stage = run.cfg.parallel.zero_stage
        print(f"ZeRO {stage}, {run.world_size} ranks, ds_config {run.cfg.parallel.ds_config}, 32 timed steps:")
        for name, s in rows:
            print(f"  {name:48s} {s:.4f} s/step ({s / rows[0][1]:.2f} x)")
    dist.destroy()


if __name__ == "__main__":
    main()
