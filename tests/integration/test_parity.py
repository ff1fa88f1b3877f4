"""Parity: for every supported family, the AutoEP model's logits equal the plain HF model's.

2 ranks over gloo, fp32, at ep_size 1 (every rank holds every expert) and ep_size 2
(experts split, tokens exchanged by all-to-all), under ZeRO 1 and under ZeRO 3 with every
parameter partitioned.
"""

import json

import pytest

from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices
from tests.integration.launch import ZERO3_PARTITIONED, torchrun

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage", [1, 3], ids=["zero1", "zero3"])
def test_autoep_logits_equal_hf_for_every_family(tmp_path, stage):
    torchrun("parity_worker.py", str(tmp_path), "1,2", str(stage), *([ZERO3_PARTITIONED] if stage == 3 else []))
    rows = []
    for rank in (0, 1):
        rows += json.loads((tmp_path / f"parity_rank{rank}.json").read_text())
    assert len(rows) == 2 * 2 * len(FAMILIES)
    for r in rows:
        n_moe = len(moe_layer_indices(build_tiny_model({"model_type": r["model_type"]}, seed=0).config))
        where = f"{r['model_type']} ep_size={r['ep_size']} rank={r['rank']} zero={r['zero_stage']}"
        assert r["max_abs_diff"] <= 1e-5, where
        assert r["autoep_layers"] == n_moe, where  # every MoE block was replaced
        assert r["local_experts"] == [8 // r["ep_size"]] * n_moe, where
