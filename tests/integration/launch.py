"""Helpers to start real multi-process runs (torchrun, gloo) from tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZERO3_PARTITIONED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero3_partitioned.json")
"""ds_config for ZeRO 3 tests: every parameter partitioned (no persistence threshold). The tiny models'
parameters would otherwise stay whole on every rank, as DeepSpeed keeps small parameters."""


def zero_overrides(stage: int) -> list[str]:
    """Config overrides for ZeRO ``stage`` (3: with ZERO3_PARTITIONED)."""
    return [f"parallel.zero_stage={stage}"] + ([f"parallel.ds_config={ZERO3_PARTITIONED}"] if stage == 3 else [])


def run_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    return env


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local ranks; fails the test with the output if any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(os.path.dirname(__file__), script), *args]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def desmoe(*args: str, timeout: int = 600, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run the ``desmoe`` CLI as a user would (python -m desmoe.cli)."""
    return subprocess.run([sys.executable, "-m", "desmoe.cli", *args], env=run_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
