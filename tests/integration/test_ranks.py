"""Ranks that disagree or stop answering: a clear error on every rank, or a bounded failure, never a hang."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS
from tests.integration.launch import ROOT, run_env, torchrun
from tests.integration.test_resume import _pids_with_env

pytestmark = pytest.mark.integration


def test_ranks_with_different_configs_are_refused_on_every_rank(tmp_path):
    torchrun("config_hash_worker.py", str(tmp_path), os.path.join(CONFIGS, "demo.yaml"))
    for r in (0, 1):
        msg = json.load(open(tmp_path / f"hash_rank{r}.json"))
        assert "rank(s) [1] resolved a different configuration than rank 0" in msg


def test_a_stuck_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    """SIGSTOP one rank (alive, silent): the other's next collective gives up after parallel.timeout_s."""
    tag = f"desmoe-stuck-{os.getpid()}-{time.time_ns()}"
    env = run_env()
    env["DESMOE_TEST_JOB"] = tag
    args = ["train", "--nproc", "2", "--config", os.path.join(CONFIGS, "demo.yaml"), "--output-dir",
            str(tmp_path / "run"), "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2",
            "model.tiny.head_dim=16", "model.tiny.moe_intermediate_size=64", "train.max_steps=100000",
            "train.log_every=1", "data.seq_len=64", "data.domains.code.max_examples=60",
            "data.domains.law.max_examples=200", "data.domains.math.max_examples=800", "parallel.timeout_s=15",
            "tracking.mlflow=false"]
    proc = subprocess.Popen([sys.executable, "-m", "desmoe.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        rank1 = [p for p in _pids_with_env("DESMOE_TEST_JOB", tag) if p in _pids_with_env("RANK", "1")]
        assert rank1
        stopped_at = time.monotonic()
        for pid in rank1:
            os.kill(pid, signal.SIGSTOP)
        out, _ = proc.communicate(timeout=240)
        took = time.monotonic() - stopped_at
        assert proc.returncode != 0
        assert took < 15 + 90, f"the job took {took:.0f} s to end"  # timeout + the launcher's shutdown
    finally:
        for pid in _pids_with_env("DESMOE_TEST_JOB", tag):  # the ranks may run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
