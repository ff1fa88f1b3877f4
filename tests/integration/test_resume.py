"""Exact resume (2 ranks over gloo, AutoEP ep_size 2, fp32 CPU): 20 steps straight equal 10 steps,
a stop, and 10 resumed steps, bit for bit; checkpoints are complete or absent and pruned to checkpoint.keep."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from desmoe import checkpoint
from tests.conftest import CONFIGS
from tests.integration.launch import ROOT, desmoe, run_env, zero_overrides

pytestmark = pytest.mark.integration

DEMO = os.path.join(CONFIGS, "desmoe_demo.yaml")
# 20 steps: warm-up 1..4, stabilization 5..14, consolidation 15..20. Affinity every 3 steps, so the
# window open at step 10 (steps 10..12) straddles the stop; log_every 3 leaves steps unlogged at 10.
SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.max_steps=20", "train.warmup_steps=2",
         "train.lr_schedule=cosine", "train.log_every=3", "train.weight_decay=0.1", "data.seq_len=64",
         "data.domains.code.max_examples=60", "data.domains.law.max_examples=200",
         "data.domains.math.max_examples=800", "method.affinity_update_every=3", "method.phi=0.8",
         "checkpoint.every=5", "checkpoint.keep=2"]
TIMING = ("tokens_per_s", "step_time_s", "elapsed_s")


def _train(*args):
    proc = desmoe("train", "--nproc", "2", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _tensors(obj, prefix=""):
    """Every tensor in a (nested) checkpoint object, by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _checkpoint_tensors(ckpt_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "*.pt"))):
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if os.path.basename(path).startswith("desmoe_state"):
            obj.pop("elapsed_s")
        for name, t in _tensors(obj):
            out[os.path.basename(path) + name] = t
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    straight, split = str(tmp / "straight"), str(tmp / "split")
    _train("--config", DEMO, "--output-dir", straight, *SMALL)
    first = _train("--config", DEMO, "--output-dir", split, "--stop-at-step", "10", *SMALL)
    stopped = {"tags": checkpoint.complete_tags(os.path.join(split, "checkpoints")), "stdout": first.stdout,
               "metrics": _metrics(split)}
    second = _train("--resume", split)
    return straight, split, stopped, second.stdout


def test_resume_gives_bit_identical_weights_optimizer_and_metrics(runs):
    straight, split, stopped, resumed_out = runs
    assert "stopped at step 10" in stopped["stdout"] and f"--resume {split}" in stopped["stdout"]
    assert stopped["tags"] == ["step5", "step10"]
    assert [r["step"] for r in stopped["metrics"]][-1] == 10
    assert "resumed from" in resumed_out and "at step 10" in resumed_out

    a = _checkpoint_tensors(os.path.join(straight, "checkpoints", "step20"))
    b = _checkpoint_tensors(os.path.join(split, "checkpoints", "step20"))
    assert a.keys() == b.keys()
    assert any("expp_rank_1" in k or "expert" in k for k in a), "expert shards are compared too"
    assert any("desmoe_state_rank1.pt/method/affinity" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the straight and the resumed run"

    assert _metrics(straight) == _metrics(split)
    s1 = json.load(open(os.path.join(straight, "summary.json")))
    s2 = json.load(open(os.path.join(split, "summary.json")))
    assert s1["eval_loss_before"] == s2["eval_loss_before"] and s1["eval_loss_after"] == s2["eval_loss_after"]
    for step in (3, 6, 9, 12, 15, 18):  # affinity updates on both sides of the stop agree
        name = f"affinity/step{step:06d}.json"
        assert json.load(open(os.path.join(straight, name))) == json.load(open(os.path.join(split, name)))


def test_checkpoints_are_complete_pruned_and_latest_is_atomic(runs):
    straight, split, _, _ = runs
    root = os.path.join(straight, "checkpoints")
    assert checkpoint.complete_tags(root) == ["step15", "step20"]  # checkpoint.keep=2
    assert open(os.path.join(root, "latest")).read() == "step20"
    assert not [f for f in os.listdir(root) if f.endswith(checkpoint.PARTIAL) or f.endswith(".tmp")]
    for r in (0, 1):
        state = checkpoint.load_state(os.path.join(root, "step20"), r)
        assert state["step"] == 20 and state["world_size"] == 2 and state["method"]["phase"] == "consolidation"


def test_resume_errors(runs, tmp_path):
    straight, split, _, _ = runs
    proc = desmoe("train", "--resume", str(tmp_path), "--nproc", "2")
    assert proc.returncode == 2 and "config.yaml not found" in proc.stderr, proc.stderr
    proc = desmoe("train", "--resume", straight, "--nproc", "2")
    assert proc.returncode == 2 and "nothing left to train" in proc.stderr, proc.stderr
    # another world size resumes (tests/integration/test_reshard.py), with an ep_size that divides it
    proc = desmoe("train", "--resume", split, "--nproc", "1", "train.max_steps=40")
    assert proc.returncode == 2 and "parallel.ep_size: 2 does not divide the world size 1" in proc.stderr, proc.stderr
    proc = desmoe("train", "--resume", split, "--config", DEMO, "--nproc", "2")
    assert proc.returncode == 2 and "Drop --config" in proc.stderr, proc.stderr


# ---- faults (each ends in a job that resumes to the straight run's result) ---------------------------


def _popen_train(*args, env_extra=None):
    env = run_env()
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "desmoe.cli", "train", "--nproc", "2", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)


def _pids_with_env(key, value):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"{key}={value}".encode() in env:
            pids.append(int(pid))
    return pids


def _assert_same_final(straight, other):
    a = _checkpoint_tensors(os.path.join(straight, "checkpoints", "step20"))
    b = _checkpoint_tensors(os.path.join(other, "checkpoints", "step20"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(straight) == _metrics(other)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(runs, tmp_path):
    straight = runs[0]
    run_dir = str(tmp_path / "killed_in_save")
    proc = _popen_train("--config", DEMO, "--output-dir", run_dir, *SMALL,
                        env_extra={"DESMOE_FAULT": "kill_in_save@10"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    root = os.path.join(run_dir, "checkpoints")
    assert os.path.isdir(os.path.join(root, "step10.partial"))  # every rank's files, never renamed
    assert checkpoint.latest_tag(root) == "step5" and open(os.path.join(root, "latest")).read() == "step5"
    resumed = _train("--resume", run_dir)
    assert "at step 5" in resumed.stdout
    assert not os.path.exists(os.path.join(root, "step10.partial"))  # the next save of step 10 cleared it
    _assert_same_final(straight, run_dir)


def test_killed_rank_ends_the_job_and_resume_continues(runs, tmp_path):
    straight = runs[0]
    run_dir = str(tmp_path / "rank_killed")
    tag = f"desmoe-test-{os.getpid()}-{time.time_ns()}"
    proc = _popen_train("--config", DEMO, "--output-dir", run_dir, *SMALL, env_extra={"DESMOE_TEST_JOB": tag})
    try:
        root = os.path.join(run_dir, "checkpoints")
        deadline = time.monotonic() + 300
        while checkpoint.latest_tag(root) != "step10":
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 10"
            time.sleep(0.05)
        rank1 = [p for p in _pids_with_env("DESMOE_TEST_JOB", tag) if p in _pids_with_env("RANK", "1")]
        assert rank1, "rank 1's process not found"
        killed_at = time.monotonic()
        for pid in rank1:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=120)  # the launcher notices the dead rank and ends the job
        assert proc.returncode != 0
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert checkpoint.latest_tag(root) in ("step10", "step15")
    _train("--resume", run_dir)
    _assert_same_final(straight, run_dir)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_without_running_its_code(runs, tmp_path):
    import shutil

    straight = runs[0]
    copy = str(tmp_path / "copy")
    shutil.copytree(straight, copy)
    marker = tmp_path / "pwned"
    path = os.path.join(copy, "checkpoints", "step20", "mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["evil"] = _Evil(marker)
    torch.save(state, path)
    proc = desmoe("train", "--resume", copy, "--nproc", "2", "train.max_steps=24")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "posix.system" in proc.stderr and "checkpoint.trust_pickle" in proc.stderr  # os.system, pickled
    assert not marker.exists()


def test_resume_under_zero3_is_bit_identical(tmp_path):
    """ZeRO 3 with every parameter partitioned: 10 steps straight equal 5 + 5 resumed, weights, optimizer
    shards of both ranks and desmoe's state included."""
    small = [o for o in SMALL if not o.startswith(("train.max_steps", "checkpoint.every"))]
    small += ["train.max_steps=10", "checkpoint.every=5", *zero_overrides(3)]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _train("--config", DEMO, "--output-dir", straight, *small)
    _train("--config", DEMO, "--output-dir", split, "--stop-at-step", "5", *small)
    assert "resumed from" in _train("--resume", split).stdout
    assert checkpoint.is_zero3(os.path.join(split, "checkpoints", "step10"))
    a = _checkpoint_tensors(os.path.join(straight, "checkpoints", "step10"))
    b = _checkpoint_tensors(os.path.join(split, "checkpoints", "step10"))
    assert a.keys() == b.keys()
    assert any(k.startswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the straight and the resumed run"
    assert _metrics(straight) == _metrics(split)
