"""desmoe's GPU check: bf16 + NCCL training, isolation in bf16, recipe vs bare speed, and MFU, in minutes.

    python benchmarks/gpu_check.py --out runs/gpu_check [--budget-s 540] [--cpu] [--only train_1,mfu]
    python benchmarks/gpu_check.py --report runs/gpu_check/gpu_check.json     # the table again; its exit code

Normally started by scripts/gpu_check.sh (which installs the CUDA stack first). Each check runs in its own
processes (torchrun, ``desmoe train``), with its log in OUT/<check>.log, under a time limit taken from the
budget; OUT/gpu_check.json is rewritten after every check, so a run cut short still says how far it got.

Checks (ds_configs/gpu_bf16.json, NCCL; with ``--cpu``, a dry run: ds_configs/cpu_fp32.json, gloo, tiny sizes):

- ``train_1``: ``desmoe train --nproc 1``, a tiny DeepSeek-V2 (3 layers, first dense, 2 shared experts),
  method.mode desmoe, 40 steps: passes if the loss falls (mean of the first 5 steps' losses in
  metrics.jsonl against the last 5, see :func:`judge_loss_falls`).
- ``train_all``: the same on every GPU with parallel.ep_size = number of GPUs (skipped with one GPU; the
  dry run uses 2 CPU ranks).
- ``isolation``: a desmoe run on every GPU (ep_size = GPUs), weight decay on, phi 0.8: every expert row
  masked for a step is bit-identical after it while unmasked rows move, replicated weights equal on every
  rank (the test suite's own assertions), and the expert weights really are bf16.
- ``step_time``: tokens/s and peak GPU memory (torch.cuda.max_memory_allocated) of the recipe (fft and
  desmoe modes) against a bare forward -> backward -> step DeepSpeed loop on the same batches, one GPU.
- ``mfu``: a DeepSeek-V2-Lite-shaped stack (hidden 2048, 64 routed experts of width 1408, top-6, 2 shared,
  16 heads, MLA with kv_lora_rank 512, q_lora_rank None; 4 layers, the first dense; vocabulary 102400),
  random-initialised, forward + backward + step through desmoe's engine in bf16 (fft: every weight trains):
  model FLOPs utilisation = achieved model FLOPs/s / the GPU's peak dense bf16 FLOPs/s.

MFU's FLOPs (:func:`compute_training_flops_per_token`): per token, 6 x the weights of the matmuls that token
passes through (attention projections, dense MLPs, the router, its top-k routed and the shared experts, the
LM head; not the embedding lookup, not norms), plus attention scores and values, 6 x layers x heads x
(qk_head_dim + v_head_dim) x seq_len, counted over the full seq_len x seq_len matrix as PaLM and Megatron count
it (causal masking halves the work done, so this overstates the attention term by up to 2x). The peak comes
from :data:`PEAK_BF16_TFLOPS` by the GPU's name, or from ``GPU_PEAK_TFLOPS``.

Exit code: 0 when every check passed (or was skipped as not applicable), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the isolation judgement is the test suite's (tests/integration/test_method.py)
CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
SUMMARY_FILE = "gpu_check.json"
CHECKS = ("train_1", "train_all", "isolation", "step_time", "mfu")
PASS, FAIL, SKIP, NOT_RUN = "pass", "fail", "skip", "not run"
OK_STATUSES = (PASS, SKIP)

PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h200 nvl", 835.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("h800", 989.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
)
"""(part of ``torch.cuda.get_device_name()``, lower case; dense bf16 tensor-core TFLOPS from the vendor's data
sheet, without sparsity), first match wins: H100/H200 SXM 989, H100 PCIe 756, A100 312, ..."""

V2_LITE_STACK = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                     moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                     num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
                     n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
                     routed_scaling_factor=1.0, max_position_embeddings=4096, num_hidden_layers=4)
"""DeepSeek-V2-Lite's shape (its config.json) with 4 layers instead of 27, so it fits one GPU with room for Adam."""

DRY_RUN_STACK = dict(V2_LITE_STACK, vocab_size=1024, hidden_size=128, intermediate_size=256,
                     moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                     num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=16, max_position_embeddings=512, num_hidden_layers=2)
"""The same architecture, shrunk for the CPU dry run."""


# ---- pure parts: FLOPs, MFU, judgements, the summary ------------------------------------------


def _get(config, key):
    return config[key] if isinstance(config, dict) else getattr(config, key)


def compute_active_matmul_params(config) -> dict[str, int]:
    """Weights of the matmuls one token passes through in a DeepSeek-V2/V3 (MLA) decoder, by part.

    ``config``: the HF config (or a dict of its keys). Parts: ``attention`` (q or q_a/q_b, kv_a_proj_with_mqa,
    kv_b_proj, o_proj), ``dense_mlp`` (the first ``first_k_dense_replace`` layers), ``moe`` (router, the top-k
    routed experts, the shared experts), ``lm_head``; ``total`` sums them. Embedding lookups and norms are
    not matmuls and are left out."""
    h, heads, layers = _get(config, "hidden_size"), _get(config, "num_attention_heads"), _get(config, "num_hidden_layers")
    nope, rope, v = _get(config, "qk_nope_head_dim"), _get(config, "qk_rope_head_dim"), _get(config, "v_head_dim")
    q_lora, kv_lora = _get(config, "q_lora_rank"), _get(config, "kv_lora_rank")
    q = h * heads * (nope + rope) if q_lora is None else h * q_lora + q_lora * heads * (nope + rope)
    kv = h * (kv_lora + rope) + kv_lora * heads * (nope + v)
    attention = q + kv + heads * v * h
    dense = min(_get(config, "first_k_dense_replace") or 0, layers)
    width = _get(config, "moe_intermediate_size")
    moe = (_get(config, "n_routed_experts") * h  # router
           + _get(config, "num_experts_per_tok") * 3 * h * width  # gate, up, down of each selected expert
           + (_get(config, "n_shared_experts") or 0) * 3 * h * width)  # the shared experts, one MLP of n x width
    parts = {"attention": layers * attention, "dense_mlp": dense * 3 * h * _get(config, "intermediate_size"),
             "moe": (layers - dense) * moe, "lm_head": _get(config, "vocab_size") * h}
    parts["total"] = sum(parts.values())
    return parts


def compute_training_flops_per_token(config, seq_len: int) -> dict[str, int]:
    """Model FLOPs of one trained token (forward + backward = 3 x forward): ``matmul`` = 6 x the active matmul
    weights, ``attention`` = 6 x layers x heads x (qk_head_dim + v_head_dim) x seq_len (scores and weighted
    values over the full seq_len x seq_len matrix, PaLM's convention), ``total``."""
    heads, layers = _get(config, "num_attention_heads"), _get(config, "num_hidden_layers")
    qk = _get(config, "qk_nope_head_dim") + _get(config, "qk_rope_head_dim")
    matmul = 6 * compute_active_matmul_params(config)["total"]
    attention = 6 * layers * heads * (qk + _get(config, "v_head_dim")) * seq_len
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def peak_bf16_tflops(device_name: str, env: dict | None = None) -> float | None:
    """Peak dense bf16 TFLOPS of a GPU by its name; ``GPU_PEAK_TFLOPS`` in ``env`` overrides; None if unknown."""
    env = os.environ if env is None else env
    if env.get("GPU_PEAK_TFLOPS"):
        return float(env["GPU_PEAK_TFLOPS"])
    name = device_name.lower()
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def compute_mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation (0..1): achieved model FLOPs/s over the peak; None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def per_step_losses(rows: list[dict]) -> list[tuple[int, float | None]]:
    """metrics.jsonl rows (one per step and domain trained) -> [(step, mean loss of its domains)], by step;
    a step with a non-finite loss (written as null) gives None."""
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(r["loss"])
    out = []
    for step in sorted(by_step):
        vals = by_step[step]
        out.append((step, None if any(v is None or not math.isfinite(v) for v in vals) else statistics.fmean(vals)))
    return out


def judge_loss_falls(rows: list[dict], *, k: int = 5, min_drop: float = 0.02) -> tuple[bool, dict, str]:
    """Whether training lowered the loss: every step's loss finite, and the mean of the last ``k`` steps at least
    ``min_drop`` (relative) below the mean of the first ``k``. Returns (passed, figures, message)."""
    steps = per_step_losses(rows)
    if len(steps) < 2 * k:
        return False, {"steps": len(steps)}, f"only {len(steps)} step(s) in metrics.jsonl, need >= {2 * k}"
    bad = [s for s, v in steps if v is None]
    if bad:
        return False, {"steps": len(steps)}, f"non-finite loss at step(s) {bad[:5]}"
    first = statistics.fmean(v for _, v in steps[:k])
    last = statistics.fmean(v for _, v in steps[-k:])
    figures = {"steps": len(steps), "loss_first": round(first, 4), "loss_last": round(last, 4)}
    if last <= first * (1 - min_drop):
        return True, figures, f"loss fell {first:.4f} -> {last:.4f}"
    return False, figures, f"loss did not fall by {min_drop:.0%}: {first:.4f} -> {last:.4f}"


def exit_code(results: list[dict], expected: tuple[str, ...] = CHECKS) -> int:
    """0 if every expected check is present and passed or was skipped as not applicable, else 1."""
    status = {r["name"]: r["status"] for r in results}
    return 0 if all(status.get(name) in OK_STATUSES for name in expected) else 1


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_summary(results: list[dict], expected: tuple[str, ...] = CHECKS) -> str:
    """The final table: one row per check (status, seconds, figures, message), then the verdict."""
    by_name = {r["name"]: r for r in results}
    rows = [by_name.get(name, {"name": name, "status": NOT_RUN, "message": "did not start"}) for name in expected]
    rows += [r for r in results if r["name"] not in expected]
    lines = ["| check | status | s | figures | note |", "|---|---|---|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.get("figures", {}).items())
        secs = f"{r['seconds']:.0f}" if r.get("seconds") is not None else ""
        lines.append(f"| {r['name']} | {r['status'].upper()} | {secs} | {figures} | {r.get('message', '')} |")
    failed = [r["name"] for r in rows if r["status"] not in OK_STATUSES]
    lines.append("")
    lines.append("gpu_check: all checks passed" if not failed else f"gpu_check: FAILED: {', '.join(failed)}")
    return "\n".join(lines)


# ---- the checks ------------------------------------------------------------------------------


class Budget:
    """Seconds left of the whole check; each check gets at most its own cap of them."""

    def __init__(self, seconds: float, reserve: float = 10.0):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.end - time.monotonic() - self.reserve


_child: subprocess.Popen | None = None


def _stop_child(*_) -> None:
    """SIGTERM (the shell script's ``timeout``): end the running check's whole process group, then exit."""
    if _child is not None and _child.poll() is None:
        _kill_group(_child)
    sys.exit(124)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log_path: str, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` (its own process group, output to ``log_path``); (exit code or None on timeout, seconds)."""
    global _child
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        _child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  start_new_session=True)
        try:
            rc = _child.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_group(_child)
            rc = None
        finally:
            _child = None
    return rc, time.monotonic() - t0


def tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])[-300:]


class Checker:
    """Runs the checks in order, one result each, rewriting OUT/gpu_check.json after every one."""

    def __init__(self, out: str, *, cpu: bool, budget: Budget, world: int, environment: dict,
                 expected: tuple[str, ...] = CHECKS):
        self.out, self.cpu, self.budget, self.world = out, cpu, budget, world
        self.expected = expected
        self.results: list[dict] = []
        self.environment = environment
        self.ds_config = os.path.join(ROOT, "ds_configs", "cpu_fp32.json" if cpu else "gpu_bf16.json")
        self.backend = "gloo" if cpu else "nccl"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.env.setdefault("OMP_NUM_THREADS", "1")
        if cpu:  # the dry run stays on the CPU even on a machine with GPUs
            self.env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")

    # -- bookkeeping

    def record(self, name: str, status: str, *, seconds: float | None = None, figures: dict | None = None,
               message: str = "") -> dict:
        r = {"name": name, "status": status, "seconds": seconds, "figures": figures or {}, "message": message,
             "log": os.path.join(self.out, f"{name}.log")}
        self.results.append(r)
        self.save()
        line = f"gpu_check: {name}: {status.upper()}" + (f" ({seconds:.0f} s)" if seconds is not None else "")
        print(line + (f": {message}" if message else ""), flush=True)
        return r

    def save(self) -> None:
        data = {"mode": "cpu dry run" if self.cpu else "gpu", "environment": self.environment,
                "expected": list(self.expected), "checks": self.results,
                "exit_code": exit_code(self.results, self.expected)}
        tmp = os.path.join(self.out, SUMMARY_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, os.path.join(self.out, SUMMARY_FILE))

    def launch(self, name: str, cmd: list[str], cap_s: float, env: dict | None = None, hint: str = ""):
        """Run one check's command under min(cap, budget left); (rc, seconds), or None when it did not run or
        failed (recorded, with ``hint`` and the log's last lines)."""
        left = self.budget.left()
        if left < 20:
            self.record(name, NOT_RUN, message=f"time budget spent ({max(0, left):.0f} s left)")
            return None
        print(f"gpu_check: {name}: running (limit {min(cap_s, left):.0f} s, log {name}.log)", flush=True)
        rc, secs = run_logged(cmd, os.path.join(self.out, f"{name}.log"), min(cap_s, left), env or self.env)
        if rc != 0:
            why = f"timed out after {secs:.0f} s" if rc is None else f"exit code {rc}"
            self.record(name, FAIL, seconds=secs,
                        message=f"{why}; {hint}{tail(os.path.join(self.out, f'{name}.log'))}")
            return None
        return rc, secs

    def check_dir(self, name: str) -> str:
        path = os.path.join(self.out, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    # -- the configs

    def tiny_overrides(self, world: int, steps: int) -> list[str]:
        """The tiny DeepSeek-V2 desmoe run of the training checks, on ``world`` ranks with ep_size = world."""
        experts = world * -(-8 // world)  # >= 8, divisible by the EP size
        tiny = ("{model_type: deepseek_v2, hidden_size: 64, num_hidden_layers: 3, first_k_dense_replace: 1, "
                f"n_routed_experts: {experts}, n_shared_experts: 2, moe_intermediate_size: 32, num_experts_per_tok: 2}}")
        return [f"model.tiny={tiny}", f"parallel.ep_size={world}", f"parallel.ds_config={self.ds_config}",
                f"parallel.backend={self.backend}", "parallel.timeout_s=120", f"train.max_steps={steps}",
                "train.lr=3e-3", "train.warmup_steps=0", "train.log_every=10", "data.seq_len=64",
                "method.mode=desmoe", "method.affinity_update_every=5", "method.phi=0.8", "tracking.mlflow=false",
                "checkpoint.save_final=false", "eval.max_pairs=4", "eval.max_new_tokens=8", "data.eval_sequences=4",
                "data.holdout_sequences=4", "run.overwrite=true"]

    # -- 1. loss falls

    def train(self, name: str, world: int) -> None:
        run_dir = self.check_dir(name)
        cmd = [sys.executable, "-m", "desmoe.cli", "train", "--config", CONFIG, "--nproc", str(world),
               "--output-dir", run_dir, *self.tiny_overrides(world, steps=40)]
        done = self.launch(name, cmd, cap_s=150 if world == 1 else 180)
        if done is None:
            return
        try:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            self.record(name, FAIL, seconds=done[1], message=f"metrics.jsonl unreadable: {e}")
            return
        ok, figures, message = judge_loss_falls(rows)
        speeds = [r["tokens_per_s"] for r in rows if r["step"] > 5]
        figures = {"world": world, "ep": world, **figures}
        if speeds:
            figures["tok/s"] = statistics.median(speeds)
        self.record(name, PASS if ok else FAIL, seconds=done[1], figures=figures, message=message)

    # -- 2. isolation

    def isolation(self, world: int) -> None:
        name = "isolation"
        out = self.check_dir(name)
        overrides = [*self.tiny_overrides(world, steps=30), "train.weight_decay=0.1", "data.long_examples=truncate"]
        # weight decay on: a masked row must not shrink either (decoupled decay would move it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.join(ROOT, "benchmarks", "_gpu_check_worker.py"), "isolation", out, CONFIG, *overrides]
        done = self.launch(name, cmd, cap_s=150)
        if done is None:
            return
        try:
            ranks = []
            for r in range(world):
                with open(os.path.join(out, f"isolation_rank{r}.json")) as f:
                    ranks.append(json.load(f))
        except (OSError, ValueError) as e:
            self.record(name, FAIL, seconds=done[1], message=f"worker output unreadable: {e}")
            return
        ok, figures, message = judge_isolation(ranks, want_dtype="float32" if self.cpu else "bfloat16")
        self.record(name, PASS if ok else FAIL, seconds=done[1], figures=figures, message=message)

    # -- 3. recipe vs bare loop

    def step_time(self) -> None:
        name = "step_time"
        out = self.check_dir(name)
        if self.cpu:
            steps, warmup, size = 20, 5, ["data.seq_len=64", "train.micro_batch_size=4"]
            tiny = self.tiny_overrides(1, steps)
        else:
            steps, warmup, size = 60, 10, ["data.seq_len=512", "train.micro_batch_size=8"]
            tiny = self.tiny_overrides(1, steps)
            tiny[0] = ("model.tiny={model_type: deepseek_v2, hidden_size: 256, num_hidden_layers: 4, "
                       "first_k_dense_replace: 1, n_routed_experts: 16, n_shared_experts: 2, "
                       "moe_intermediate_size: 256, intermediate_size: 1024, num_experts_per_tok: 4, "
                       "num_attention_heads: 8, num_key_value_heads: 8, kv_lora_rank: 64, qk_nope_head_dim: 32, "
                       "qk_rope_head_dim: 16, v_head_dim: 32, max_position_embeddings: 1024}")
        overrides = [o for o in tiny if not o.startswith(("method.mode=", "data.seq_len="))] + size
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(ROOT, "benchmarks", "_gpu_check_worker.py"), "step_time", out, CONFIG, str(steps),
               str(warmup), "fft,desmoe", *overrides]
        done = self.launch(name, cmd, cap_s=200)
        if done is None:
            return
        res = self.read_result(name, out, done)
        if res is None:
            return
        loops = res["loops"]
        bare = loops["bare"]["tokens_per_s"]
        figures = {"bf16": res["bf16"], "tokens/step": res["micro_batch_size"] * res["seq_len"]}
        for key in ("bare", "recipe_fft", "recipe_desmoe"):
            figures[f"{key} tok/s"] = loops[key]["tokens_per_s"]
            if loops[key]["peak_mib"] is not None:
                figures[f"{key} peak MiB"] = loops[key]["peak_mib"]
        figures["fft/bare"] = loops["recipe_fft"]["tokens_per_s"] / bare
        figures["desmoe/bare"] = loops["recipe_desmoe"]["tokens_per_s"] / bare
        ok = all(v["tokens_per_s"] > 0 for v in loops.values())
        self.record(name, PASS if ok else FAIL, seconds=done[1], figures=figures,
                    message="measured (a report: no speed target is enforced)" if ok else "a loop measured 0 tok/s")

    def read_result(self, name: str, out: str, done) -> dict | None:
        """The worker's OUT/result.json; None (and the check recorded as failed) if it cannot be read."""
        try:
            with open(os.path.join(out, "result.json")) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            self.record(name, FAIL, seconds=done[1], message=f"worker output unreadable: {e}")
            return None

    # -- 4. MFU

    def mfu(self) -> None:
        name = "mfu"
        out = self.check_dir(name)
        stack = DRY_RUN_STACK if self.cpu else dict(V2_LITE_STACK, num_hidden_layers=int(
            os.environ.get("GPU_CHECK_MFU_LAYERS", V2_LITE_STACK["num_hidden_layers"])))
        steps, warmup = (3, 1) if self.cpu else (10, 3)
        batch, seq = (2, 128) if self.cpu else (4, 2048)
        tiny = "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in stack.items()) + "}"
        overrides = [f"model.tiny={tiny}", "parallel.ep_size=1", f"parallel.ds_config={self.ds_config}",
                     f"parallel.backend={self.backend}", "method.mode=fft", f"train.micro_batch_size={batch}",
                     f"data.seq_len={seq}", "train.lr=1e-4", "train.warmup_steps=0", "train.lr_schedule=constant"]
        env = dict(self.env)
        if not self.cpu:  # one process, no launcher: let it initialise the large model on several cores
            env["OMP_NUM_THREADS"] = str(min(16, os.cpu_count() or 1))
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "_gpu_check_worker.py"), "mfu", out, CONFIG,
               str(steps), str(warmup), *overrides]
        done = self.launch(name, cmd, cap_s=240, env=env, hint="out of GPU memory? fewer layers: GPU_CHECK_MFU_LAYERS=2; ")
        if done is None:
            return
        res = self.read_result(name, out, done)
        if res is None:
            return
        flops = compute_training_flops_per_token(res["model_config"], res["seq_len"])
        peak = None if self.cpu else peak_bf16_tflops(res["device_name"])
        mfu = compute_mfu(res["tokens_per_s"], flops["total"], peak)
        figures = {"layers": res["model_config"]["num_hidden_layers"], "params": res["params_total"],
                   "active matmul params": compute_active_matmul_params(res["model_config"])["total"],
                   "GFLOP/token": flops["total"] / 1e9, "tokens/step": res["micro_batch_size"] * res["seq_len"],
                   "tok/s": res["tokens_per_s"], "TFLOP/s": res["tokens_per_s"] * flops["total"] / 1e12,
                   "peak TFLOP/s": peak if peak is not None else "n/a",
                   "MFU": f"{mfu:.1%}" if mfu is not None else "n/a", "dtype": res["param_dtype"]}
        if res["peak_mib"] is not None:
            figures["peak MiB"] = res["peak_mib"]
        finite = math.isfinite(res["loss_first"]) and math.isfinite(res["loss_last"])
        note = "" if self.cpu or peak is not None else (
            f"unknown peak for {res['device_name']!r}: set GPU_PEAK_TFLOPS (dense bf16) for MFU; ")
        self.record(name, PASS if finite else FAIL, seconds=done[1], figures=figures,
                    message=note + (f"device {res['device_name']}" if finite else "non-finite loss"))

    def run(self) -> int:
        many = self.world > 1
        plan = {
            "train_1": lambda: self.train("train_1", 1),
            "train_all": (lambda: self.train("train_all", self.world)) if many else None,
            "isolation": lambda: self.isolation(self.world),
            "step_time": self.step_time,
            "mfu": self.mfu,
        }
        for name in self.expected:
            if plan[name] is None:
                self.record(name, SKIP, message="one GPU: nothing more to run on all GPUs")
                continue
            try:
                plan[name]()
            except (KeyError, TypeError, ValueError, ImportError) as e:  # e.g. a worker's result without a key
                self.record(name, FAIL, message=f"{type(e).__name__}: {e}")
        print("\n" + format_summary(self.results, self.expected), flush=True)
        return exit_code(self.results, self.expected)


def judge_isolation(ranks: list[dict], *, want_dtype: str) -> tuple[bool, dict, str]:
    """The test suite's judgement of recorded steps (tests/integration/test_method.py): masked expert rows
    bit-identical, unmasked ones moved, replicated weights equal on every rank; plus the experts' dtype."""
    from tests.integration.test_method import (test_masked_expert_rows_are_bit_identical,
                                               test_replicated_weights_stay_identical_across_ranks)

    frozen = moved = 0
    for r in ranks:
        moe_index = {layer: i for i, layer in enumerate(r["moe_layers"])}
        for before, after in zip(r["steps"], r["steps"][1:]):
            for name, layer in r["expert_param_layer"].items():
                rows = after["frozen"].get(str(moe_index[layer]))
                for row, (a, b) in enumerate(zip(before["params"][name], after["params"][name])):
                    if rows is not None and rows[row]:
                        frozen += 1
                    else:
                        moved += a != b
    dtypes = sorted({r["expert_dtype"] for r in ranks})
    figures = {"world": ranks[0]["world_size"], "ep": ranks[0]["ep_size"], "dtype": "/".join(dtypes),
               "steps": len(ranks[0]["steps"]) - 1, "masked row-steps": frozen, "moved row-steps": moved}
    if dtypes != [want_dtype]:
        return False, figures, f"expert weights are {'/'.join(dtypes)}, expected {want_dtype}"
    try:
        test_masked_expert_rows_are_bit_identical(ranks)
    except AssertionError as e:
        if not frozen or not moved:
            return False, figures, f"{frozen} masked and {moved} moved row-steps: the check needs both"
        return False, figures, f"isolation broken: {_first_line(e)}"
    if len(ranks) > 1:  # (it compares rank 0 with rank 1)
        try:
            test_replicated_weights_stay_identical_across_ranks(ranks)
        except AssertionError as e:
            return False, figures, f"replicated weights differ between ranks 0 and 1 at (step, name) {_first_line(e)}"
    return True, figures, "masked rows bit-identical, unmasked rows moved"


def _first_line(e: AssertionError) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


def describe_environment(cpu: bool) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpus": []}
    try:
        import deepspeed
        import transformers

        env.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError as e:
        env["import_error"] = str(e)
    if torch.cuda.is_available() and not cpu:
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="where logs and gpu_check.json go")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds the whole check may take")
    p.add_argument("--cpu", action="store_true", help="dry run on CPU: gloo, fp32, tiny sizes, MFU n/a")
    p.add_argument("--cpu-ranks", type=int, default=2, help="dry run: ranks of the 'all GPUs' checks")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--report", metavar="JSON", help="print the summary of an earlier gpu_check.json; its exit code")
    a = p.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            data = json.load(f)
        expected = tuple(data.get("expected", CHECKS))
        print(format_summary(data["checks"], expected))
        return exit_code(data["checks"], expected)
    only = tuple(c for c in CHECKS if c in a.only.split(","))
    unknown = set(a.only.split(",")) - set(CHECKS)
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    if a.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed's import (its version) probes no GPU
    environment = describe_environment(a.cpu)
    if not a.cpu and not environment["cuda_available"]:
        print(f"gpu_check: error: torch {environment['torch']} sees no CUDA device (torch.version.cuda = "
              f"{environment['torch_cuda']}). Use a CUDA build of torch on a machine with GPUs, or --cpu for a dry "
              "run.", file=sys.stderr)
        return 2
    world = a.cpu_ranks if a.cpu else len(environment["gpus"])
    signal.signal(signal.SIGTERM, _stop_child)
    checker = Checker(out, cpu=a.cpu, budget=Budget(a.budget_s), world=world, environment=environment,
                      expected=only)
    checker.save()
    return checker.run()


if __name__ == "__main__":
    sys.exit(main())
