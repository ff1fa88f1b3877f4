"""launch/ wrappers: each prints the exact command; its arguments reach desmoe.train's parser intact."""

import os
import shlex
import subprocess

import pytest

from desmoe.launch import build_arg_parser
from tests.conftest import ROOT
from tests.integration.launch import run_env

pytestmark = pytest.mark.integration

ARGS = ["--config", "configs/demo.yaml", "--output-dir", "runs/x y", "train.max_steps=3"]


def _run(script, *args, dry=True, timeout=60):
    env = run_env()
    if dry:
        env["DRY_RUN"] = "1"
    return subprocess.run([os.path.join(ROOT, "launch", script), *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _printed(proc):
    line = next(l for l in proc.stdout.splitlines() if l.startswith("+ "))
    return shlex.split(line[2:])


@pytest.mark.parametrize("script,lead,expect", [
    ("single_node.sh", ["4"], ["--num_gpus", "4", "--module", "desmoe.train"]),
    ("cpu.sh", ["2"], ["--standalone", "--nproc_per_node", "2", "-m", "desmoe.train"]),
    ("slurm.sbatch", [], ["--rdzv_backend", "c10d", "-m", "desmoe.train"]),
])
def test_dry_run_prints_a_command_whose_args_parse(script, lead, expect):
    proc = _run(script, *lead, *ARGS)
    assert proc.returncode == 0, proc.stderr
    cmd = _printed(proc)
    for tok in expect:
        assert tok in cmd, (tok, cmd)
    module_at = cmd.index("desmoe.train")
    args = build_arg_parser().parse_args(cmd[module_at + 1:])
    assert args.config == "configs/demo.yaml" and args.output_dir == "runs/x y"
    assert args.overrides == ["train.max_steps=3"]


def test_multi_node_reads_master_from_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode-a slots=8\nnode-b slots=8\n")
    cmd = _printed(_run("multi_node.sh", str(hostfile), *ARGS))
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--master_addr") + 1] == "node-a"
    proc = _run("multi_node.sh", str(tmp_path / "missing"), *ARGS)
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.parametrize("script", ["single_node.sh", "cpu.sh", "multi_node.sh"])
def test_missing_config_argument_is_a_usage_error(script, tmp_path):
    first = "2"
    if script == "multi_node.sh":
        first = str(tmp_path / "hosts")
        (tmp_path / "hosts").write_text("node-a slots=1\n")
    proc = _run(script, first, "train.max_steps=3")
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_single_node_deepspeed_launcher_runs_on_cpu(tmp_path):
    """The real deepspeed launcher, 2 CPU ranks, 3 steps."""
    out = tmp_path / "run"
    proc = _run("single_node.sh", "2", "--config", "configs/demo.yaml", "--output-dir", str(out),
                "train.max_steps=3", "train.warmup_steps=0", "data.seq_len=64", "model.tiny.num_hidden_layers=2",
                dry=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "metrics.jsonl").read_text().count('"step": 3') == 1
