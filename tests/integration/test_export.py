"""desmoe export of real 2-rank runs (gloo, fp32 CPU): the exported model computes the engine's logits.

desmoe mode (AutoEP ep_size 2, ZeRO 2): desmoe.load_pretrained(out) == the engine with its adaptive
routers; AutoModelForCausalLM.from_pretrained(out) loads strictly and == the engine with the residual
MLPs silenced. fft mode (ep_size 1, ZeRO 1): AutoModelForCausalLM.from_pretrained(out) == the engine.
"""

import json
import os

import pytest
import torch

import desmoe
from desmoe.cli import main as desmoe_cli
from tests.conftest import CONFIGS
from tests.integration.launch import torchrun, zero_overrides

pytestmark = pytest.mark.integration

DEMO = os.path.join(CONFIGS, "desmoe_demo.yaml")
# 10 steps: warm-up 1..2 (router + backbone), stabilization 3..7 (router + selected experts),
# consolidation 8..10 (selected experts).
SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.max_steps=10", "train.warmup_steps=0",
         "train.log_every=10", "data.seq_len=64", "data.eval_sequences=2", "data.domains.code.max_examples=30",
         "data.domains.law.max_examples=60", "data.domains.math.max_examples=200", "data.holdout=null",
         "method.warmup_end=0.2", "method.affinity_update_every=5", "tracking.mlflow=false"]
TOL = 1e-5


def _train_and_export(tmp_path, *overrides):
    torchrun("export_worker.py", str(tmp_path), DEMO, *SMALL, *overrides)
    out = tmp_path / "export"
    assert desmoe_cli(["export", str(tmp_path / "run"), "--out", str(out)]) == 0  # in this process: no start-up
    return str(out), torch.load(tmp_path / "engine_logits.pt"), json.loads((out / "desmoe_export.json").read_text())


def _load_plain(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_desmoe_export_reproduces_the_engines_logits(tmp_path):
    out, ref, meta = _train_and_export(tmp_path, "method.mode=desmoe", "parallel.ep_size=2", "parallel.zero_stage=2")
    assert meta["mode"] == "desmoe" and meta["ep_size"] == 2 and meta["adaptive_routers"]["layers"] == [0, 1]
    assert meta["tokenizer"]["kind"] == "byte"
    assert ref["alr_w2_abs_max"] > 0  # the residual MLPs trained (they start at zero)
    ids = ref["input_ids"]

    model = desmoe.load_pretrained(out)
    assert (_logits(model, ids) - ref["logits"]).abs().max().item() <= TOL

    plain = _load_plain(out)
    plain_logits = _logits(plain, ids)
    assert (plain_logits - ref["logits_without_alr"]).abs().max().item() <= TOL
    assert (plain_logits - ref["logits"]).abs().max().item() > 1e-3  # the adaptive routers matter

    # experts trained after warm-up, on both EP ranks' halves: the export differs from the initial model
    from desmoe.config import load_config
    from desmoe.models import build_tiny_model

    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    initial = build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    for i in (0, 1):
        moved = (plain.model.layers[i].mlp.experts.gate_up_proj
                 != initial.model.layers[i].mlp.experts.gate_up_proj).flatten(1).any(1)
        assert moved[:4].any() and moved[4:].any(), (i, moved)


def test_zero3_export_and_eval_reproduce_the_engine(tmp_path):
    """ZeRO 3, every parameter partitioned: the checkpoint's weights live only in the ranks' optimizer shards;
    the export (through DeepSpeed's universal conversion) computes the engine's logits, and desmoe eval's loss
    equals the run's own final evaluation."""
    out, ref, meta = _train_and_export(tmp_path, "method.mode=desmoe", "parallel.ep_size=2", *zero_overrides(3))
    assert meta["zero_stage"] == 3 and ref["alr_w2_abs_max"] > 0
    tag_dir = tmp_path / "run" / "checkpoints" / "step10"
    assert (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step10.universal" / "zero").is_dir()  # kept for the next export
    ids = ref["input_ids"]
    assert (_logits(desmoe.load_pretrained(out), ids) - ref["logits"]).abs().max().item() <= TOL
    assert (_logits(_load_plain(out), ids) - ref["logits_without_alr"]).abs().max().item() <= TOL
    assert desmoe_cli(["eval", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    evaluated = json.loads((tmp_path / "run" / "eval_step10.json").read_text())["results"]
    assert set(evaluated) >= set(summary["eval_after"])
    for domain, row in summary["eval_after"].items():
        assert evaluated[domain]["loss"] == pytest.approx(row["loss"], abs=1e-5), domain


def test_fft_export_with_ep_size_1_loads_as_a_stock_model(tmp_path):
    out, ref, meta = _train_and_export(tmp_path, "method.mode=fft", "parallel.ep_size=1", "parallel.zero_stage=1",
                                       "train.max_steps=4")
    assert meta["adaptive_routers"] is None and meta["ep_size"] == 1
    assert sorted(os.listdir(out)) == ["config.json", "desmoe_export.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    plain = _load_plain(out)
    assert (_logits(plain, ref["input_ids"]) - ref["logits"]).abs().max().item() <= TOL
    assert torch.equal(_logits(desmoe.load_pretrained(out), ref["input_ids"]), _logits(plain, ref["input_ids"]))
