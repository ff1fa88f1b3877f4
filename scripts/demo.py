"""``make demo``: DES-MoE beside full fine-tuning, from a small pretrained base model, on 2 CPU ranks.

    python scripts/demo.py [--out runs/demo] [--nproc 2] [--recipe full|quick] [section.key=value ...]

1. The base model: benchmarks/pretrain_base.py's ``full`` recipe (Qwen3-MoE, 4 layers, 16 experts,
   2.3 M parameters), pretrained once (about 2 minutes on one core, deterministic) and cached in
   ``$DESMOE_CACHE/base_models`` (default ``.cache/desmoe/base_models``; ``full`` names the newest).
2. ``desmoe train --config configs/demo_fft.yaml --nproc 2``, then the same with
   ``configs/demo_desmoe.yaml`` (the same domains, steps and LR; method.mode desmoe), one after the other.
3. ``desmoe compare`` of the two runs: per-domain held-out loss before/after, the general holdout's
   loss and forgetting F (after - before), training time, and the comparison figures.

Overrides apply to both runs (e.g. ``train.max_steps=40`` for a shorter demo). ``--recipe quick`` takes
the smoke test's smaller, barely pretrained base model (seconds to make; tests/integration/test_demo.py).
Exit code: the first failing step's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.pretrain_base import RECIPES, ensure_base_model  # noqa: E402

HALVES = (("fft", "configs/demo_fft.yaml"), ("desmoe", "configs/demo_desmoe.yaml"))


def desmoe(*args: str) -> int:
    cmd = [sys.executable, "-m", "desmoe.cli", *args]
    print("\n$ desmoe " + " ".join(args), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="folder of the two runs (runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (2)")
    p.add_argument("--recipe", choices=("full", "quick"), default="full",
                   help="the base model (benchmarks/pretrain_base.py recipe): full (the demo's) or quick (smoke test)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for both runs")
    a = p.parse_intermixed_args(argv)
    out = os.path.abspath(a.out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    base, trained = ensure_base_model(RECIPES[a.recipe], log=lambda m: print(m, flush=True))
    if trained:
        print(f"pretrained the base model in {time.perf_counter() - t0:.0f} s (cached for the next demo)")
    seconds = {}
    for mode, config in HALVES:
        t = time.perf_counter()
        rc = desmoe("train", "--config", config, "--nproc", str(a.nproc), "--output-dir", os.path.join(out, mode),
                    "run.overwrite=true", f"model.path={base}", *a.overrides)
        if rc != 0:
            return rc
        seconds[mode] = time.perf_counter() - t
    rc = desmoe("compare", *(os.path.join(out, mode) for mode, _ in HALVES), "--out", os.path.join(out, "compare"))
    if rc != 0:
        return rc
    print(f"\ndemo: {time.perf_counter() - t0:.0f} s in all (" + ", ".join(
        f"{m} run {s:.0f} s" for m, s in seconds.items()) + ")")
    print("both runs in MLflow:\n"
          f"  {os.path.join(ROOT, '.venv', 'bin', 'mlflow')} ui --backend-store-uri sqlite:///{out}/mlflow.db"
          "    # then open http://127.0.0.1:5000, experiment desmoe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
