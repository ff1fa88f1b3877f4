"""Tokens/s of desmoe's training recipe vs a bare ``deepspeed.initialize`` loop, side by side.

    python benchmarks/step_time.py [--nproc 2] [--steps 60] [--config configs/demo.yaml] [overrides ...]

Both loops run in the same processes, on the same tiny model, batches and ranks, alternating
(bare, recipe, bare, recipe) so machine noise hits both alike. The recipe's time covers
everything between optimizer steps (sampling, loss all-reduce, metrics.jsonl, progress);
the bare loop is forward -> backward -> step on pre-sampled batches. Prints the ratio
recipe/bare tokens per second (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               os.path.join(ROOT, "benchmarks", "_step_time_worker.py"), tmp, a.config, str(a.steps), str(a.warmup),
               str(a.repeats), *a.overrides]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
        with open(os.path.join(tmp, "result.json")) as f:
            res = json.load(f)
    print(json.dumps(res, indent=2))
    print(f"\nrecipe {res['recipe_tokens_per_s']:,.0f} tok/s vs bare deepspeed loop "
          f"{res['bare_tokens_per_s']:,.0f} tok/s -> ratio {res['ratio']:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
