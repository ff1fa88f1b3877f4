"""benchmarks/gpu_check.py's pure parts (the FLOPs count and MFU, the loss and isolation judgements, the summary
and its exit code, the time budget) and scripts/gpu_check.sh's refusal to start without a GPU. No GPU needed."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check as gc
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

SMALL_MLA = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=48,
                 moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                 num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, num_hidden_layers=3, first_k_dense_replace=1, n_group=1,
                 topk_group=1, topk_method="greedy", q_lora_rank=None)


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_proj", "q_lora"])
def test_active_params_are_every_matmul_weight_when_every_expert_is_selected(q_lora_rank):
    """With top-k = all experts, a token passes through every weight but the embedding and the norms."""
    import torch
    import transformers

    kw = dict(SMALL_MLA, q_lora_rank=q_lora_rank, num_experts_per_tok=SMALL_MLA["n_routed_experts"])
    kw.pop("model_type")
    config = transformers.DeepseekV2Config(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    named = dict(model.named_parameters())
    matmul = sum(p.numel() for n, p in named.items() if "embed_tokens" not in n and "norm" not in n)
    parts = gc.compute_active_matmul_params(config)
    assert parts["total"] == matmul
    assert parts["lm_head"] == named["lm_head.weight"].numel()
    assert parts["dense_mlp"] == sum(p.numel() for n, p in named.items() if n.startswith("model.layers.0.mlp."))
    assert parts["attention"] == sum(p.numel() for n, p in named.items() if ".self_attn." in n and "norm" not in n)


def test_flops_per_token_of_the_v2_lite_shaped_stack():
    h, heads, layers, seq = 2048, 16, 4, 2048
    attention = h * heads * 192 + h * (512 + 64) + 512 * heads * (128 + 128) + heads * 128 * h
    dense = 3 * h * 10944
    moe = 64 * h + 6 * 3 * h * 1408 + 2 * 3 * h * 1408  # router, 6 routed experts, 2 shared
    lm_head = 102400 * h
    parts = gc.compute_active_matmul_params(gc.V2_LITE_STACK)
    assert parts == {"attention": layers * attention, "dense_mlp": dense, "moe": 3 * moe, "lm_head": lm_head,
                     "total": layers * attention + dense + 3 * moe + lm_head}
    assert parts["total"] == 540_016_640
    flops = gc.compute_training_flops_per_token(gc.V2_LITE_STACK, seq)
    assert flops["matmul"] == 6 * 540_016_640
    assert flops["attention"] == 6 * layers * heads * (192 + 128) * seq
    assert flops["total"] == flops["matmul"] + flops["attention"] == 3_491_758_080


def test_mfu_and_the_peak_of_a_gpu_by_name():
    assert gc.peak_bf16_tflops("NVIDIA H100 80GB HBM3", env={}) == 989.0
    assert gc.peak_bf16_tflops("NVIDIA H100 PCIe", env={}) == 756.0
    assert gc.peak_bf16_tflops("NVIDIA H200", env={}) == 989.0
    assert gc.peak_bf16_tflops("NVIDIA A100-SXM4-80GB", env={}) == 312.0
    assert gc.peak_bf16_tflops("NVIDIA GeForce RTX 3090", env={}) is None
    assert gc.peak_bf16_tflops("NVIDIA GeForce RTX 3090", env={"GPU_PEAK_TFLOPS": "71"}) == 71.0
    assert gc.peak_bf16_tflops("NVIDIA H100 80GB HBM3", env={"GPU_PEAK_TFLOPS": "500"}) == 500.0
    # 100k tokens/s of 3.49 GFLOP each on a 989 TFLOPS GPU
    assert gc.compute_mfu(1e5, 3_491_758_080, 989.0) == pytest.approx(1e5 * 3_491_758_080 / 989e12)
    assert gc.compute_mfu(1e5, 3_491_758_080, None) is None


def _rows(losses, per_step=1):
    return [{"step": s + 1, "domain": f"d{j}", "loss": v} for s, v in enumerate(losses) for j in range(per_step)]


def test_loss_falls_judgement():
    falling = [6.0 - 0.05 * s for s in range(20)]
    ok, figures, msg = gc.judge_loss_falls(_rows(falling))
    assert ok and figures["loss_first"] == pytest.approx(5.9) and figures["loss_last"] == pytest.approx(5.15)
    assert "6.0" not in msg and "5.9000 -> 5.1500" in msg
    assert gc.judge_loss_falls(_rows(falling, per_step=2))[0]  # grad accumulation: several rows of one step
    assert not gc.judge_loss_falls(_rows([6.0] * 20))[0]
    assert not gc.judge_loss_falls(_rows(falling[::-1]))[0]
    assert not gc.judge_loss_falls(_rows([6.0 - 0.001 * s for s in range(20)]))[0]  # under 2%: noise
    ok, _, msg = gc.judge_loss_falls(_rows(falling[:9]))
    assert not ok and "only 9 step(s)" in msg
    with_nan = falling[:10] + [None] + falling[11:]
    ok, _, msg = gc.judge_loss_falls(_rows(with_nan))
    assert not ok and "non-finite loss at step(s) [11]" in msg


def _isolation_ranks(w1_after, w2_after=("b0", "b1x"), dtype="bfloat16"):
    """One rank, one MoE layer (layer 1) with 2 local experts; row 0 masked at step 1."""
    w1, w2 = "model.layers.1.mlp.experts.w1", "model.layers.1.mlp.experts.w2"
    return [{"world_size": 1, "ep_size": 1, "ep_rank": 0, "num_local": 2, "expert_dtype": dtype,
             "moe_layers": [1], "expert_param_layer": {w1: 1, w2: 1},
             "kinds": {w1: "expert", w2: "expert", "model.embed_tokens.weight": "backbone"},
             "steps": [{"step": 0, "params": {w1: ["a0", "a1"], w2: ["b0", "b1"], "model.embed_tokens.weight": "e"}},
                       {"step": 1, "phase": "stabilization", "frozen": {"0": [1, 0]},
                        "params": {w1: list(w1_after), w2: list(w2_after), "model.embed_tokens.weight": "e"}}]}]


def test_isolation_judgement_is_the_test_suites():
    ok, figures, msg = gc.judge_isolation(_isolation_ranks(["a0", "a1x"]), want_dtype="bfloat16")
    assert ok, msg
    assert figures["masked row-steps"] == 2 and figures["moved row-steps"] == 2 and figures["dtype"] == "bfloat16"
    ok, _, msg = gc.judge_isolation(_isolation_ranks(["a0x", "a1x"]), want_dtype="bfloat16")
    assert not ok and "moved while masked" in msg
    ok, _, msg = gc.judge_isolation(_isolation_ranks(["a0", "a1"], ["b0", "b1"]), want_dtype="bfloat16")
    assert not ok and "2 masked and 0 moved row-steps: the check needs both" in msg  # nothing trained at all
    ok, _, msg = gc.judge_isolation(_isolation_ranks(["a0", "a1x"], dtype="float32"), want_dtype="bfloat16")
    assert not ok and "expert weights are float32, expected bfloat16" in msg
    two = _isolation_ranks(["a0", "a1x"]) + _isolation_ranks(["a0", "a1x"])
    two[1]["steps"][1]["params"]["model.embed_tokens.weight"] = "e2"
    ok, _, msg = gc.judge_isolation(two, want_dtype="bfloat16")
    assert not ok and "replicated weights differ" in msg and "model.embed_tokens.weight" in msg


def _result(name, status):
    return {"name": name, "status": status, "seconds": 1.0, "figures": {"tok/s": 12345.6}, "message": ""}


def test_summary_and_exit_code():
    passed = [_result(n, gc.PASS) for n in gc.CHECKS]
    assert gc.exit_code(passed) == 0
    table = gc.format_summary(passed)
    assert table.splitlines()[0] == "| check | status | s | figures | note |"
    assert "| train_1 | PASS | 1 | tok/s 12,346 |" in table and table.endswith("gpu_check: all checks passed")
    with_skip = [_result(n, gc.SKIP if n == "train_all" else gc.PASS) for n in gc.CHECKS]
    assert gc.exit_code(with_skip) == 0
    failed = [_result(n, gc.FAIL if n == "mfu" else gc.PASS) for n in gc.CHECKS]
    assert gc.exit_code(failed) == 1 and gc.format_summary(failed).endswith("gpu_check: FAILED: mfu")
    missing = passed[:2]  # cut short: the rest never started
    assert gc.exit_code(missing) == 1
    assert "| isolation | NOT RUN |  |  | did not start |" in gc.format_summary(missing)
    assert gc.exit_code(passed[:2], expected=("train_1", "train_all")) == 0  # --only


def test_report_reprints_a_saved_summary_with_its_exit_code(tmp_path, capsys):
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"expected": ["train_1", "mfu"], "checks": [_result("train_1", gc.PASS)]}))
    assert gc.main(["--report", str(path)]) == 1
    out = capsys.readouterr().out
    assert "| mfu | NOT RUN |" in out and "FAILED: mfu" in out


def test_a_check_is_not_started_without_time_left_and_a_slow_one_is_stopped(tmp_path):
    checker = gc.Checker(str(tmp_path), cpu=True, budget=gc.Budget(5), world=1, environment={})
    assert checker.launch("train_1", [sys.executable, "-c", "pass"], cap_s=100) is None
    saved = json.loads((tmp_path / gc.SUMMARY_FILE).read_text())
    assert saved["checks"][0]["status"] == gc.NOT_RUN and saved["exit_code"] == 1
    t0 = time.monotonic()
    rc, _ = gc.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "slow.log"), 1.0,
                          dict(os.environ))
    assert rc is None and time.monotonic() - t0 < 20


def _refusal(tmp_path, path_dirs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(PATH=os.pathsep.join(path_dirs), GPU_CHECK_OUT=str(tmp_path / "out"))
    return subprocess.run([shutil.which("bash"), SCRIPT], env=env, capture_output=True, text=True, timeout=30)


def test_script_refuses_to_start_without_a_gpu(tmp_path):
    assert subprocess.run([shutil.which("bash"), "-n", SCRIPT]).returncode == 0
    fake = tmp_path / "fake"  # an nvidia-smi that finds no GPU (driver not loaded)
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _refusal(tmp_path, [str(fake), os.environ["PATH"]])
    assert proc.returncode == 2, proc.stderr
    assert "no NVIDIA GPU: nvidia-smi lists none" in proc.stderr and "GPU_CHECK_ALLOW_CPU=1" in proc.stderr
    bare = tmp_path / "bare"  # no nvidia-smi at all: only what the script needs before its check
    bare.mkdir()
    os.symlink(shutil.which("dirname"), bare / "dirname")
    proc = _refusal(tmp_path, [str(bare)])
    assert proc.returncode == 2, proc.stderr
    assert "nvidia-smi is not on PATH" in proc.stderr and "GPU_CHECK_ALLOW_CPU=1" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written, nothing installed


def test_script_refuses_a_cpu_build_of_torch_on_a_gpu_machine(tmp_path):
    """A machine whose nvidia-smi lists a GPU, and a venv holding the CPU torch (e.g. the project's .venv)."""
    import torch

    from tests.integration.test_gpu_check_dry import _install_is_current

    if torch.version.cuda is not None or not _install_is_current(sys.prefix):
        pytest.skip("needs this test's venv to be a current scripts/setup_env.sh install of the CPU torch")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)"\n'
                                     "exit 0\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(PATH=os.pathsep.join([str(fake), os.environ["PATH"]]), GPU_CHECK_OUT=str(tmp_path / "out"),
               DESMOE_VENV=sys.prefix, DESMOE_TORCH_INDEX="https://download.pytorch.org/whl/cpu")
    proc = subprocess.run([shutil.which("bash"), SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not using DESMOE_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in proc.stdout
    assert f"in {sys.prefix} is a CPU build" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()  # no check started
