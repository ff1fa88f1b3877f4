"""Step time of the desmoe mode against fft on the same model, data and ranks, per phase, in one run.

    python benchmarks/method_speed.py [--nproc 2] [--steps 100] [--repeats 2] [--config configs/demo.yaml]
        [--mode desmoe] [overrides]

fft and desmoe runs alternate in the same processes (fft, desmoe, desmoe, fft, ...) with the
same seed, so both see the same batches. For each desmoe phase (warm-up, stabilization,
consolidation) it compares the median step time of those steps with fft's median over the
same step numbers. Goals (issue 11, under the paper's phases: the frozen backbone skips its weight
gradients in every phase): warm-up <= 1.0x fft; stabilization and consolidation <= 0.7x.
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
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--mode", default="desmoe", help="the method mode timed against fft (desmoe, an ablation, esft_*)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    res = run_worker("_method_speed_worker.py", a.nproc, a.config, str(a.steps), str(a.repeats), a.mode,
                     *a.overrides)
    if isinstance(res, int):
        return res
    print(json.dumps(res, indent=2))
    print()
    for phase, r in res["phases"].items():
        print(f"{phase:<14} {a.mode} {r['desmoe_ms']:.1f} ms/step vs fft {r['fft_ms']:.1f} ms/step -> "
              f"ratio {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
