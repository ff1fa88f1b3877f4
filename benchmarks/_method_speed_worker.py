"""Worker of benchmarks/method_speed.py (run under torchrun)."""

import json
import os
import statistics
import sys

from desmoe import dist

dist.setup_env()

from desmoe.launch import quiet_libraries  # noqa: E402

from benchmarks._common import run_recipe  # noqa: E402


def one_run(out_dir, config, steps, overrides, mode, tag):
    _, rows = run_recipe(os.path.join(out_dir, tag), config,
                         [f"train.max_steps={steps}", f"method.mode={mode}", *overrides])
    by_step = {r["step"]: r for r in rows}
    return [(s, by_step[s]["phase"], by_step[s]["step_time_s"]) for s in sorted(by_step)]


def main():
    out_dir, config, steps, repeats, method_mode, *overrides = sys.argv[1:]
    steps, repeats = int(steps), int(repeats)
    quiet_libraries()
    times = {"fft": {}, "desmoe": {}}
    phase_of = {}
    for rep in range(repeats):
        order = ["fft", "desmoe"] if rep % 2 == 0 else ["desmoe", "fft"]
        for mode in order:
            run_mode = "fft" if mode == "fft" else method_mode
            for s, phase, t in one_run(out_dir, config, steps, overrides, run_mode, f"{mode}{rep}"):
                times[mode].setdefault(s, []).append(t)
                if mode == "desmoe":
                    phase_of[s] = phase
    if dist.get_world_size_and_rank()[1] == 0:
        res = {"steps": steps, "repeats": repeats, "mode": method_mode, "phases": {}}
        for phase in ("warmup", "stabilization", "consolidation", "esft"):
            # the first steps of a phase pay one-time costs (first affinity update, graph changes)
            ss = [s for s in sorted(phase_of) if phase_of[s] == phase][2:]
            if not ss:
                continue
            d = statistics.median(t for s in ss for t in times["desmoe"][s]) * 1000
            f = statistics.median(t for s in ss for t in times["fft"][s]) * 1000
            res["phases"][phase] = {"steps": [ss[0], ss[-1]], "desmoe_ms": d, "fft_ms": f, "ratio": d / f}
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump(res, fh)
    dist.destroy()


if __name__ == "__main__":
    main()
