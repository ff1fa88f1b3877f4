"""scripts/gpu_check.sh end to end in its CPU dry run (GPU_CHECK_ALLOW_CPU=1: gloo, fp32, tiny sizes), in this
test's own venv: the checks run, pass, and leave their summary. (About a minute and a half on 2 cores; train_1
is left out, it is train_all's path on one rank, and step_time, whose worker test_gpu_check's unit tests
parse.)"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.integration.launch import run_env

pytestmark = pytest.mark.integration

CHECKS = ["train_all", "isolation", "mfu"]


def _install_is_current(venv: str) -> bool:
    """What scripts/setup_env.sh checks before it skips the install."""
    want = hashlib.sha256(b"".join(open(os.path.join(ROOT, f), "rb").read()
                                   for f in ("requirements.txt", "constraints.txt", "pyproject.toml"))).hexdigest()
    stamp = os.path.join(venv, ".desmoe-install-stamp")
    return (os.path.isfile(stamp) and open(stamp).read().strip() == want
            and os.access(os.path.join(venv, "bin", "desmoe"), os.X_OK))


def test_dry_run_of_the_gpu_check(tmp_path):
    venv = sys.prefix
    if not _install_is_current(venv):
        pytest.skip(f"{venv} was not installed by scripts/setup_env.sh (or is not current): the script would install")
    out = tmp_path / "gpu_check"
    env = dict(run_env(), GPU_CHECK_ALLOW_CPU="1", DESMOE_VENV=venv, GPU_CHECK_OUT=str(out),
               GPU_CHECK_ONLY=",".join(CHECKS))
    proc = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu dry run" and summary["exit_code"] == 0
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == CHECKS and all(c["status"] == "pass" for c in checks.values())
    assert checks["train_all"]["figures"]["world"] == 2
    assert checks["train_all"]["figures"]["loss_last"] < checks["train_all"]["figures"]["loss_first"]
    assert checks["isolation"]["figures"]["dtype"] == "float32" and checks["isolation"]["figures"]["masked row-steps"]
    assert checks["mfu"]["figures"]["MFU"] == "n/a" and checks["mfu"]["figures"]["tok/s"] > 0
    assert "gpu_check: all checks passed" in proc.stdout
    assert (out / "gpu_check.log").read_text().count("PASS") >= len(CHECKS)
    for name in CHECKS:
        assert (out / f"{name}.log").is_file()
