"""DES-MoE through the real recipe on 2 ranks (gloo, AutoEP ep_size 2): routing unchanged at step 0,
affinity and masks identical on every rank and equal to a single-process computation, masked
expert rows bit-identical, and each phase changing exactly what its row of the phase table says
(the paper's table by default: the backbone never moves; the old schedule through method knobs)."""

import json
import os

import pytest
import torch

from desmoe.routing.affinity import AffinityCounts, compute_window_affinity, ema_update, select_relative
from tests.conftest import CONFIGS
from tests.integration.launch import desmoe, torchrun, zero_overrides

pytestmark = pytest.mark.integration

SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.lr=3e-3", "train.max_steps=30", "train.warmup_steps=0",
         "train.log_every=10", "data.seq_len=64", "data.domains.code.max_examples=60",
         "data.domains.law.max_examples=200", "data.domains.math.max_examples=800", "method.mode=desmoe",
         "method.affinity_update_every=5", "method.phi=0.8", "train.weight_decay=0.1", "data.long_examples=truncate"]
# truncate: examples never cross rows, so rows end in padding (which the affinity must not count)
# weight decay on: masked rows must still not move (decoupled decay would shrink them)
# 30 steps: warm-up 1..6, stabilization 7..21, consolidation 22..30


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["zero1", "zero2", "zero3"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"method_zero{request.param}")
    torchrun("method_worker.py", str(out), os.path.join(CONFIGS, "demo.yaml"), *zero_overrides(request.param),
             *SMALL)
    ranks = [json.loads((out / f"method_rank{r}.json").read_text()) for r in (0, 1)]
    ranks[0]["_run_dir"] = str(out / "run")
    return ranks


def test_affinity_files_heatmaps_and_report(ranks):
    run_dir = ranks[0]["_run_dir"]
    for step in (5, 10, 15, 20, 25, 30):
        record = json.loads(open(os.path.join(run_dir, "affinity", f"step{step:06d}.json")).read())
        assert record["masks"] == ranks[0]["history"][[5, 10, 15, 20, 25, 30].index(step)]["masks"]
        with open(os.path.join(run_dir, "affinity", f"step{step:06d}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    proc = desmoe("affinity", run_dir)
    assert proc.returncode == 0, proc.stderr
    last = ranks[0]["history"][-1]
    for d, name in enumerate(last["domains"]):
        chosen = [e for e, on in enumerate(last["masks"][0][d]) if on]
        assert f"  {name:<14} experts {chosen}" in proc.stdout
    assert "overlap math / code" in proc.stdout
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert all({"phase", "lambda", "kd_loss"} <= r.keys() for r in rows)
    assert rows[0]["lambda"] == 1.0 and rows[0]["kd_loss"] >= 0 and rows[-1]["lambda"] == 0.0
    assert any(r["kd_loss"] > 0 for r in rows if r["phase"] == "stabilization")


def test_affinity_evolution_figure_at_the_end_of_training_and_on_demand(ranks, tmp_path):
    run_dir = ranks[0]["_run_dir"]
    with open(os.path.join(run_dir, "affinity", "evolution.png"), "rb") as f:  # drawn by the recipe's finish
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "evo.png"
    proc = desmoe("affinity", run_dir, "--plot", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"written: {out}" in proc.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_affinity_report_on_a_run_without_affinity(tmp_path):
    proc = desmoe("affinity", str(tmp_path))
    assert proc.returncode == 2 and "no affinity/step*.json" in proc.stderr


def test_routing_unchanged_at_step_zero(ranks):
    for r in ranks:
        assert r["step0_max_abs_diff"] <= 1e-5


def test_affinity_masks_identical_on_ranks_and_equal_single_process_reference(ranks):
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert [x["step"] for x in h0] == [5, 10, 15, 20, 25, 30]
    assert h0 == h1  # same affinity and masks on every rank
    obs = ranks[0]["observations"] + ranks[1]["observations"]
    n_layers, n_domains = len(ranks[0]["moe_layers"]), len(ranks[0]["domains"])
    ema, prev = None, 0
    for record in h0:
        counts = AffinityCounts(n_layers, n_domains, 8)
        for o in obs:
            if prev < o["step"] <= record["step"]:
                real = torch.tensor(o["real"], dtype=torch.bool)  # padding is not counted
                sel = torch.tensor(o["selected"])[real]
                counts.add(o["layer"], sel, torch.full((sel.shape[0],), o["domain"]))
        ema = ema_update(ema, compute_window_affinity(counts.hits, counts.tokens), 0.9)
        masks = select_relative(ema, 0.8)
        assert torch.allclose(torch.nan_to_num(ema, nan=-1.0), torch.tensor(record["affinity"], dtype=torch.float64))
        assert masks.int().tolist() == record["masks"]
        prev = record["step"]
    assert any(not all(row) for layer in h0[-1]["masks"] for row in layer), "phi=0.8 should deselect some experts"
    assert any(not all(o["real"]) for o in obs), "the packed rows should hold some padding"


def _changed(before, after, name):
    return before["params"][name] != after["params"][name]


def test_replicated_weights_stay_identical_across_ranks(ranks):
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        for name, kind in ranks[0]["kinds"].items():
            if kind != "expert":
                assert s0["params"][name] == s1["params"][name], (s0["step"], name)


def test_masked_expert_rows_are_bit_identical(ranks, frozen_phases=(), expect_frozen=True):
    """Rows masked for a step (``frozen``), and every row in ``frozen_phases``, do not move."""
    for r in ranks:
        layer_of = r["expert_param_layer"]
        moe_index = {l: i for i, l in enumerate(r["moe_layers"])}
        frozen_checked = moved = 0
        for before, after in zip(r["steps"], r["steps"][1:]):
            for name, kind in r["kinds"].items():
                if kind != "expert":
                    continue
                li = moe_index[layer_of[name]]
                rows = after["frozen"].get(str(li))
                for row, (a, b) in enumerate(zip(before["params"][name], after["params"][name])):
                    if (rows is not None and rows[row]) or after["phase"] in frozen_phases:
                        assert a == b, f"rank {r['ep_rank']} step {after['step']} {name}[{row}] moved while masked"
                        frozen_checked += 1
                    else:
                        moved += a != b
        assert (frozen_checked > 0 or not expect_frozen) and moved > 0


def test_a_rank_with_every_local_expert_frozen_keeps_step(ranks):
    """No hangs: steps where a rank's local experts were all frozen for its domain ran to the end
    (the same all-to-alls on both ranks)."""
    all_frozen = [s["step"] for r in ranks for s in r["steps"][1:]
                  if s["phase"] != "warmup" and any(all(rows) for rows in s["frozen"].values())]
    assert all_frozen, "phi=0.8 should leave some rank with no trainable local expert in some layer and step"
    assert ranks[0]["steps"][-1]["step"] == ranks[1]["steps"][-1]["step"] == 30


PAPER_TABLE = {"warmup": {"router", "expert"}, "stabilization": {"router", "expert"}, "consolidation": {"expert"}}
PHASES_30 = ["warmup"] * 6 + ["stabilization"] * 15 + ["consolidation"] * 9


def check_phases_change_exactly(ranks, table, *, kinds=("backbone", "router", "expert")):
    """Every step changes parameters of the kinds its phase trains (``table``), and none of the others."""
    for r in ranks:
        moved_in = {k: set() for k in kinds}
        for before, after in zip(r["steps"], r["steps"][1:]):
            phase = after["phase"]
            for k in kinds:
                changed = [n for n, kind in r["kinds"].items() if kind == k and _changed(before, after, n)]
                if k not in table[phase]:
                    assert changed == [], (after["step"], phase, k, changed)
                elif changed:
                    moved_in[k].add(phase)
        for k in kinds:
            # a step's domain may select no expert held by this rank, so experts move in some steps only
            assert moved_in[k] == {ph for ph, parts in table.items() if k in parts}, (k, moved_in[k])
        assert [s["phase"] for s in r["steps"][1:]] == PHASES_30


def test_each_phase_changes_exactly_its_parameters(ranks):
    check_phases_change_exactly(ranks, PAPER_TABLE)


def test_backbone_is_bit_identical_after_all_three_phases(ranks):
    for r in ranks:
        first, last = r["steps"][0]["params"], r["steps"][-1]["params"]
        backbone = [n for n, kind in r["kinds"].items() if kind == "backbone"]
        assert any("embed_tokens" in n for n in backbone) and any("self_attn" in n for n in backbone)
        assert any("norm" in n for n in backbone) and any("lm_head" in n for n in backbone)
        assert [n for n in backbone if first[n] != last[n]] == []


def _received(ranks, step):
    """Global ids of the experts (per MoE layer index) that some rank's real token was routed to at ``step``."""
    out = {}
    for r in ranks:
        for o in r["observations"]:
            if o["step"] == step:
                hit = out.setdefault(o["layer"], set())
                for sel, real in zip(o["selected"], o["real"]):
                    if real:
                        hit.update(sel)
    return out


def test_warmup_moves_every_routed_expert_that_received_tokens(ranks):
    checked = 0
    for step in range(1, 7):  # warm-up
        received = _received(ranks, step)
        for r in ranks:
            before, after = r["steps"][step - 1], r["steps"][step]
            assert after["phase"] == "warmup"
            moe_index = {l: i for i, l in enumerate(r["moe_layers"])}
            for name, layer in r["expert_param_layer"].items():
                li = moe_index[layer]
                for row, (a, b) in enumerate(zip(before["params"][name], after["params"][name])):
                    if r["ep_rank"] * r["num_local"] + row in received[li]:
                        assert a != b, f"step {step} {name}[{row}] received tokens but did not move"
                        checked += 1
    assert checked > 0


def test_old_schedule_through_knobs(tmp_path):
    """desmoe's schedule before the METHOD.md correction: warm-up trains router + backbone, experts frozen."""
    torchrun("method_worker.py", str(tmp_path), os.path.join(CONFIGS, "demo.yaml"), "parallel.zero_stage=2", *SMALL,
             "method.phase_trainable={warmup: [router, backbone]}", "method.kd_alpha_end=0.7",
             "method.kd_layer_reduction=mean")
    ranks = [json.loads((tmp_path / f"method_rank{r}.json").read_text()) for r in (0, 1)]
    check_phases_change_exactly(ranks, {"warmup": {"router", "backbone"}, "stabilization": {"router", "expert"},
                                        "consolidation": {"expert"}})
    test_masked_expert_rows_are_bit_identical(ranks, frozen_phases=("warmup", ))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    lam = {r["step"]: r["lambda"] for r in rows}
    assert lam[1] == 1.0 and lam[20] == pytest.approx(1 - (19 / 30) / 0.7) and lam[21] > 0 and lam[22] == 0.0


DEEPSEEK = ["model.tiny={model_type: deepseek_v2, hidden_size: 64, num_hidden_layers: 3, n_routed_experts: 8, "
            "n_shared_experts: 1, first_k_dense_replace: 1}"]


@pytest.mark.parametrize("shared", ["warmup", "always"])
def test_shared_experts_and_dense_layers_under_the_phase_table(tmp_path, shared):
    """DeepSeek-V2 (dense first layer, a shared expert): the dense MLP is backbone and never moves; shared
    experts train in the phases method.shared_experts names."""
    torchrun("method_worker.py", str(tmp_path), os.path.join(CONFIGS, "demo.yaml"), "parallel.zero_stage=1", *SMALL,
             *DEEPSEEK, f"method.shared_experts={shared}")
    ranks = [json.loads((tmp_path / f"method_rank{r}.json").read_text()) for r in (0, 1)]
    names = ranks[0]["kinds"]
    assert any(k == "shared" for k in names.values()) and "model.layers.0.mlp.gate_proj.weight" in names
    assert names["model.layers.0.mlp.gate_proj.weight"] == "backbone"
    table = {ph: set(parts) | ({"shared"} if shared == "always" or ph == "warmup" else set())
             for ph, parts in PAPER_TABLE.items()}
    check_phases_change_exactly(ranks, table, kinds=("backbone", "router", "expert", "shared"))
    test_masked_expert_rows_are_bit_identical(ranks)
    test_replicated_weights_stay_identical_across_ranks(ranks)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def esft_ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"esft_zero{request.param}")
    torchrun("method_worker.py", str(out), os.path.join(CONFIGS, "demo.yaml"), *zero_overrides(request.param),
             *[o for o in SMALL if not o.startswith("method.")], "method.mode=esft_token", "train.max_steps=8",
             "method.esft_profile_tokens=4096", "method.esft_p=0.3")
    return out, [json.loads((out / f"method_rank{r}.json").read_text()) for r in (0, 1)]


def test_esft_trains_only_the_union_of_selected_experts(esft_ranks):
    out, ranks = esft_ranks
    selection = json.loads((out / "run" / "esft_selection.json").read_text())
    assert selection["score"] == "token_ratio" and selection["p"] == 0.3
    for li, union in enumerate(selection["trained_union"]):
        per_domain = set().union(*(set(sel[li]) for sel in selection["selected"].values()))
        assert set(union) == per_domain and 0 < len(union) < 8
        for d, scores in enumerate(selection["scores"][li]):
            assert sum(scores) == pytest.approx(1.0)  # token ratios of one domain sum to 1
    assert ranks[0]["masks"] == ranks[1]["masks"]
    moved = 0
    for r in ranks:
        layer_of, moe_index = r["expert_param_layer"], {l: i for i, l in enumerate(r["moe_layers"])}
        for before, after in zip(r["steps"], r["steps"][1:]):
            for name, kind in r["kinds"].items():
                if kind != "expert":
                    assert not _changed(before, after, name), (name, after["step"])  # all else frozen
                    continue
                li = moe_index[layer_of[name]]
                for row, (a, b) in enumerate(zip(before["params"][name], after["params"][name])):
                    global_id = r["ep_rank"] * r["num_local"] + row
                    if global_id not in selection["trained_union"][li]:
                        assert a == b, (name, row, after["step"])
                    else:
                        moved += a != b
    assert moved > 0


def test_per_token_isolation_matches_reference_with_different_domains_per_rank(tmp_path):
    """ep_size 2, rank 0 on domain A and rank 1 on domain B (each expert computes both ranks' tokens):
    expert gradients equal the sum of each domain's own contribution where that domain selects the
    expert; every other gradient is unchanged by the masking."""
    torchrun("token_worker.py", str(tmp_path))
    for r in (0, 1):
        res = json.loads((tmp_path / f"token_rank{r}.json").read_text())
        assert res["sum_check"] < 1e-6  # the two single-rank passes add up to the full gradient
        assert res["other_max_diff"] < 1e-6  # hidden-state gradients are exact
        rows = [row for rows in res["expert"].values() for row in rows]
        assert len(rows) == 6 * 4
        for row in rows:
            assert row["diff"] <= 1e-6 * max(1.0, row["norm"]), row
        assert any(row["norm"] > 0 for row in rows)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_token_isolation_runs_with_different_domains_per_rank_and_keeps_frozen_rows(tmp_path, stage):
    torchrun("method_worker.py", str(tmp_path), os.path.join(CONFIGS, "demo.yaml"), *zero_overrides(stage),
             *SMALL, "method.isolation=token", "data.sync_domains=false")
    ranks = [json.loads((tmp_path / f"method_rank{r}.json").read_text()) for r in (0, 1)]
    test_masked_expert_rows_are_bit_identical(ranks)
    test_replicated_weights_stay_identical_across_ranks(ranks)
    # the ranks really trained on different domains at the same micro-steps
    per_step = [{o["step"]: o["domain"] for o in r["observations"]} for r in ranks]
    assert sum(per_step[0][s] != per_step[1][s] for s in per_step[0]) >= 5


@pytest.mark.parametrize("variant", ["desmoe_no_alr", "desmoe_no_dges", "cumulative_gate"])
def test_ablations_and_selection_modes(tmp_path, variant):
    extra = [f"method.mode={variant}"] if variant.startswith("desmoe") else [
        "method.selection=cumulative_gate", "method.selection_p=0.3"]
    torchrun("method_worker.py", str(tmp_path), os.path.join(CONFIGS, "demo.yaml"), *SMALL, *extra)
    ranks = [json.loads((tmp_path / f"method_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]
    test_masked_expert_rows_are_bit_identical(ranks, expect_frozen=variant != "desmoe_no_dges")
    test_replicated_weights_stay_identical_across_ranks(ranks)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    if variant == "desmoe_no_alr":
        assert not any("adaptive_router" in n for n in ranks[0]["kinds"])
        assert all(r["kd_loss"] == 0.0 and r["lambda"] == 0.0 for r in rows)
    elif variant == "desmoe_no_dges":
        for r in ranks:  # every routed expert trains on every domain in every phase
            assert all(not any(rows_) for s in r["steps"][1:] for rows_ in s["frozen"].values())
    else:
        masks = torch.tensor(ranks[0]["history"][-1]["masks"])
        assert 0 < int(masks.sum()) < masks.numel()
