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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, run_worker  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    res = run_worker("_step_time_worker.py", a.nproc, a.config, str(a.steps), str(a.warmup), str(a.repeats),
                     *a.overrides)
    if isinstance(res, int):
        return res
    print(json.dumps(res, indent=2))
    print(f"\nrecipe {res['recipe_tokens_per_s']:,.0f} tok/s vs bare deepspeed loop "
          f"{res['bare_tokens_per_s']:,.0f} tok/s -> ratio {res['ratio']:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
