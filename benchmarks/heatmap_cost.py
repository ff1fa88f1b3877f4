"""What drawing the affinity heatmaps costs the training loop: seconds per figure drawn synchronously (as
``rundir.write_affinity`` without a writer does) vs what the loop waits when the figure goes to
``rundir.FigureWriter``'s child process (what training does), and how much a stand-in training step slows
down while figures are drawn in a thread of the same process (it shares the interpreter lock) or in that
child process (it needs a spare core).

    python benchmarks/heatmap_cost.py [--repeats 5]

Sizes: 4 MoE layers x 3 domains x 8 experts (the demo) and 4 x 32 x 64. Also the end-of-run evolution
figure (plot_evolution) over 40 updates of the large size.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from desmoe import rundir  # noqa: E402
from desmoe.affinity_report import plot_evolution, save_affinity_heatmaps  # noqa: E402

SIZES = ((4, 3, 8), (4, 32, 64))


def record(n_layers: int, n_domains: int, n_experts: int, step: int = 20, seed: int = 0) -> dict:
    r = random.Random(seed)
    aff = [[[r.random() * 0.5 for _ in range(n_experts)] for _ in range(n_domains)] for _ in range(n_layers)]
    return {"step": step, "domains": [f"domain{d}" for d in range(n_domains)], "layers": list(range(n_layers)),
            "affinity": aff, "masks": [[[int(a > 0.3) for a in row] for row in layer] for layer in aff]}


def stand_in_step() -> float:
    """Seconds of a CPU stand-in for a launch-bound training step: many small tensor ops, Python between them."""
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    t = time.perf_counter()
    for _ in range(500):
        a = torch.tanh(a @ b) * 0.5 + 0.01
    return time.perf_counter() - t


def step_while(draw, tmp: str, n: int = 200) -> list[float]:
    """Stand-in step times while another thread calls ``draw(path)`` over and over."""
    stop = threading.Event()

    def keep_busy():
        i = 0
        while not stop.is_set():
            draw(os.path.join(tmp, f"busy{i % 2}.png"))
            i += 1

    feeder = threading.Thread(target=keep_busy, daemon=True)
    feeder.start()
    time.sleep(1.0)  # the child process has imported matplotlib
    times = [stand_in_step() for _ in range(n)]
    stop.set()
    feeder.join()
    return times


def cost_per_figure(tmp: str, size: tuple[int, int, int], repeats: int) -> str:
    """Synchronous drawing vs write_affinity with a FigureWriter, for one size."""
    rec = record(*size)
    sync = []
    for i in range(repeats):
        t = time.perf_counter()
        save_affinity_heatmaps(rec, os.path.join(tmp, f"sync{i}.png"))
        sync.append(time.perf_counter() - t)
    figures = rundir.FigureWriter()
    out = os.path.join(tmp, f"run_{'x'.join(map(str, size))}")
    waited = []
    t_all = time.perf_counter()
    for i in range(repeats):
        t = time.perf_counter()
        rundir.write_affinity(out, dict(rec, step=i + 1), figures)
        waited.append(time.perf_counter() - t)
    t = time.perf_counter()
    figures.close()
    close_s, total_s = time.perf_counter() - t, time.perf_counter() - t_all
    return (f"{size[0]} layers x {size[1]} domains x {size[2]} experts: synchronous {statistics.median(sync):.3f} "
            f"s/figure (median of {repeats}); with FigureWriter (training) write_affinity returns in "
            f"{statistics.median(waited) * 1000:.2f} ms/update (writes the JSON, queues the PNG), close() then "
            f"waited {close_s:.3f} s for the {repeats} figures ({total_s / repeats:.3f} s/figure in the child "
            "process, its start included)")


def interference(tmp: str, size: tuple[int, int, int]) -> list[str]:
    """The stand-in step alone, and while figures are drawn in a thread or in FigureWriter's child."""
    rec = record(*size)
    rundir.write_json(tmp, "big.json", rec, indent=None)
    figures = rundir.FigureWriter()

    def in_the_child(path):
        figures.submit(os.path.join(tmp, "big.json"), path)
        figures.join()

    alone = statistics.median(stand_in_step() for _ in range(200))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"stand-in launch-bound training step (2000 small CPU ops, 1 thread, {cores} core(s) for this "
             f"process): {alone * 1000:.1f} ms alone; while {'x'.join(map(str, size))} figures are drawn without "
             "pause:"]
    for name, draw in (("in a thread of the training process", lambda path: save_affinity_heatmaps(rec, path)),
                       ("in FigureWriter's child process (what training does)", in_the_child)):
        busy = statistics.median(step_while(draw, tmp))
        lines.append(f"  {name}: {busy * 1000:.1f} ms ({(busy / alone - 1) * 100:+.0f}%)")
    figures.close()
    return lines


def evolution_cost(tmp: str, size: tuple[int, int, int], updates: int = 40) -> str:
    folder = os.path.join(tmp, "evolution_run", rundir.AFFINITY_DIR)
    os.makedirs(folder)
    for s in range(updates):
        step = 5 * (s + 1)
        rundir.write_json(folder, f"step{step:06d}.json", record(*size, step=step, seed=s), indent=None)
    t = time.perf_counter()
    plot_evolution(os.path.dirname(folder))
    return (f"plot_evolution over {updates} updates of {'x'.join(map(str, size))}: {time.perf_counter() - t:.3f} s "
            "(once, at the end of a run)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_affinity_heatmaps(record(*SIZES[0]), os.path.join(tmp, "first.png"))
        print(f"first figure of the process (imports matplotlib): {time.perf_counter() - t:.3f} s")
        for size in SIZES:
            print(cost_per_figure(tmp, size, args.repeats))
        print("\n".join(interference(tmp, SIZES[1])))
        print(evolution_cost(tmp, SIZES[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
