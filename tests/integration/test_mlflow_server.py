"""Tracking against a real `mlflow server`: a run logged over HTTP reads back, and a server that
dies mid-run costs one warning and a few seconds, never the training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from desmoe.tracking import Tracker

pytestmark = pytest.mark.integration

CFG = {"run": {"name": "srv"}, "train": {"lr": 1e-3, "max_steps": 4}, "method": {"mode": "fft"}}
DS = {"zero_optimization": {"stage": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log_path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server did not answer /health within {timeout_s:.0f} s:\n{open(log_path).read()[-3000:]}")


def kill_group(proc: subprocess.Popen) -> None:
    """The server and its uvicorn / job-runner children: one process group (start_new_session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    # NOTE: `python -m mlflow` rather than .venv/bin/mlflow: a venv that was moved keeps a stale
    # interpreter path in its scripts' shebang lines.
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, log_path)
        yield url, proc
    finally:
        kill_group(proc)


def wait_for_metric(client, run_id: str, key: str, steps: list[int], timeout_s: float = 20.0) -> None:
    """The tracker sends from a background thread: poll until the steps are stored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if [m.step for m in client.get_metric_history(run_id, key)] == steps:
            return
        time.sleep(0.1)
    pytest.fail(f"{key} steps {steps} never reached the server")


def test_server_run_reads_back_then_a_dead_server_is_one_warning(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url, proc = mlflow_server
    run_dir = tmp_path / "runs" / "srv"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  lr: 0.001\n")
    warnings = []

    t = Tracker.start(CFG, DS, output_dir=str(run_dir), run_name="srv", uri=url, experiment="desmoe-test",
                      warn=warnings.append)
    assert t.enabled and t.uri == url, warnings
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {
        "run_id": t.run_id, "experiment_id": t._client.get_run(t.run_id).info.experiment_id, "tracking_uri": url}
    t.log_many([(1, {"loss/math": 2.0}), (2, {"loss/math": 1.5, "phase": "full"})])
    client = MlflowClient(tracking_uri=url)
    wait_for_metric(client, t.run_id, "loss/math", [1, 2])
    run = client.get_run(t.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "srv"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["ds.zero_optimization.stage"] == "1"
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["config.yaml"]  # uploaded through the server

    kill_group(proc)  # the server dies mid-run
    t0 = time.perf_counter()
    t.log_many([(3, {"loss/math": 1.2})])
    deadline = time.monotonic() + 30
    while t.enabled and time.monotonic() < deadline:
        time.sleep(0.05)
    failed_after = time.perf_counter() - t0
    assert not t.enabled and len(warnings) == 1
    assert url in warnings[0] and "metrics.jsonl still has every metric" in warnings[0]
    assert failed_after < 10, f"the dead server cost {failed_after:.1f} s"

    t0 = time.perf_counter()
    for step in range(4, 100):
        t.log_many([(step, {"loss/math": 1.0})])
    t.log_artifact(str(run_dir / "config.yaml"))
    t.finish("FINISHED")
    assert time.perf_counter() - t0 < 1.0
    assert len(warnings) == 1
