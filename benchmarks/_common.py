"""Shared by the benchmarks: start a worker under torchrun, and run the real recipe inside one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(worker: str, nproc: int, *args: str) -> dict | int:
    """Run benchmarks/<worker> on ``nproc`` local ranks; returns its result.json, or the exit code on failure.

    The worker gets a scratch directory as its first argument and writes result.json there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "benchmarks", worker), tmp, *args]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def run_recipe(out_dir: str, config: str, overrides: list[str]):
    """setup() + train() of the real recipe; returns (run, metrics rows on rank 0 / [] elsewhere)."""
    from desmoe.launch import build_arg_parser
    from desmoe.train import setup, train

    args = build_arg_parser().parse_args(["--config", config, "--output-dir", out_dir,
                                          "checkpoint.save_final=false", *overrides])
    run = setup(args)
    train(run)
    run.log.close()  # metrics.jsonl complete
    rows = []
    if run.master:
        with open(os.path.join(run.output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return run, rows
