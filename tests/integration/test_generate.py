"""Evaluation's KV-cached greedy generation on 2 ranks (gloo, AutoEP ep_size 2, the real DeepSpeed
engine), ranks holding different numbers of prompts: both ranks finish, every rank runs the same
number of forwards, and the tokens equal the forward-only path and a single-process reference."""

import json

import pytest
import torch

from desmoe.metrics import greedy_generate
from desmoe.models import build_tiny_model
from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration


def single_process_reference(model_type, r, eos_id):
    """The plain HF model (same seed, no AutoEP, no adaptive routers) in this process."""
    model = build_tiny_model({"model_type": model_type}, seed=r["seed"]).float().eval()

    def forward(ids, mask, positions):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    with torch.no_grad():
        return greedy_generate(forward, r["prompts"], max_new_tokens=r["new"], eos_id=eos_id, pad_id=0,
                               batch_size=r["batch"])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe"])
def test_cached_generation_on_two_ranks_equals_the_reference(tmp_path, model_type):
    torchrun("generate_worker.py", str(tmp_path), model_type)
    ranks = [json.loads((tmp_path / f"generate_rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["prompts"]) for r in ranks] == [5, 1] and ranks[0]["num_batches"] == 3
    eos = ranks[0]["eos"]
    assert ranks[1]["eos"] == eos
    for r in ranks:
        # the engine's forward-only path and the cached one give the same tokens
        for suffix in ("", "_eos", "_alr"):
            assert r["cached" + suffix]["tokens"] == r["reference" + suffix]["tokens"], (r["rank"], suffix)
        assert r["reference"]["forwards"] == 3 * r["new"]  # 3 batches (dummies included) x NEW
        assert r["cached"]["forwards"] <= 3 * r["new"]
        # and equal the plain HF model in one process (AutoEP and the zero ALR residual change nothing)
        assert r["cached"]["tokens"] == single_process_reference(model_type, r, 2)
        assert r["cached_eos"]["tokens"] == single_process_reference(model_type, r, eos)
    # the eos stopped rank 1's only row early, not rank 0's first batch: the ranks' batches stopped at
    # different steps, yet every rank ran the same number of forwards (synced_gpus)
    assert len(ranks[1]["cached_eos"]["tokens"][0]) <= 1
    assert any(len(row) == ranks[0]["new"] for row in ranks[0]["cached_eos"]["tokens"][:2])
    for name in ("cached", "cached_eos", "cached_alr"):
        assert ranks[0][name]["forwards"] == ranks[1][name]["forwards"], name
    # the adaptive-router residual reaches generation
    assert ranks[0]["cached_alr"]["tokens"] != ranks[0]["cached_eos"]["tokens"]
