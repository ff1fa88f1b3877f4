"""Resume on another world size / EP size (gloo, AutoEP, fp32 CPU, DES-MoE mode): 2 ranks (ep 2) for 4 steps,
resumed on 1 rank (ep 1) to step 8, resumed again on 2 ranks (ep 2) to step 12; and 2 -> 1 under ZeRO-3.
Right after each load the engine holds the checkpoint's weights, Adam moments and steps exactly (compared with
DeepSpeed's universal conversion, itself compared with the checkpoint's files), desmoe's state carries over as
docs/resume.md says, and the run trains on."""

import json
import os

import pytest
import torch

from desmoe import checkpoint, reshard
from tests.conftest import CONFIGS
from tests.integration.launch import desmoe, torchrun

pytestmark = pytest.mark.integration

DEMO = os.path.join(CONFIGS, "desmoe_demo.yaml")
# 8 steps: warm-up 1, stabilization 2..5, consolidation 6..8; affinity every 3 steps, so the window open at
# the step-4 checkpoint holds routing counts of step 4 that the next update (step 6) sums over the ranks.
SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.head_dim=16",
         "model.tiny.moe_intermediate_size=64", "train.max_steps=8", "train.warmup_steps=2", "data.seq_len=64",
         "data.domains.code.max_examples=60", "data.domains.law.max_examples=200",
         "data.domains.math.max_examples=200", "method.affinity_update_every=3", "checkpoint.every=4",
         "checkpoint.keep=3", "tracking.mlflow=false"]


def _same(listed, tensor):
    """A tensor read back from JSON equals ``tensor`` exactly (NaN rows: domains without evidence)."""
    return torch.equal(torch.tensor(listed, dtype=torch.float64).nan_to_num(-1.0), tensor.double().nan_to_num(-1.0))


def _rank_states(tag_dir):
    return [checkpoint.load_state(tag_dir, r) for r in checkpoint.saved_ranks(tag_dir)]


def _loaded(out_dir, world_size):
    return [json.load(open(os.path.join(out_dir, f"loaded_rank{r}.json"))) for r in range(world_size)]


def _resume(tmp, name, run_dir, nproc, *overrides):
    out = tmp / name
    out.mkdir()
    proc = torchrun("reshard_worker.py", str(out), run_dir, *overrides, nproc=nproc)
    return proc.stdout, _loaded(str(out), nproc)


@pytest.fixture(scope="module")
def zero1(tmp_path_factory):
    """2 ranks ep 2 to step 4; 1 rank ep 1 to step 8; 2 ranks ep 2 to step 12 (ZeRO 1, the default)."""
    tmp = tmp_path_factory.mktemp("reshard")
    run_dir = str(tmp / "run")
    proc = desmoe("train", "--nproc", "2", "--config", DEMO, "--output-dir", run_dir, "--stop-at-step", "4", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    down = _resume(tmp, "to1", run_dir, 1, "parallel.ep_size=1")
    up = _resume(tmp, "to2", run_dir, 2, "parallel.ep_size=2", "train.max_steps=12")
    return run_dir, down, up


def _assert_engine_holds_the_checkpoint(loaded, *, ep_size, zero3=False):
    """Right after the load: every weight and moment as in the checkpoint, each group's Adam step and
    settings too. The backbone, frozen since step 1, has no optimizer state under ZeRO 1/2 (MaskedAdamW
    makes none for a group it has not stepped), in the checkpoint as after the load."""
    for rank in loaded:
        assert rank["stateless_groups"] == ([] if zero3 else [0])
        for name, entry in rank["params"].items():
            if not entry["trainable"]:  # (rebuilt from the base model; ZeRO-3's conversion has optimizer-held ones)
                assert entry["fp32"] == 0.0 or (zero3 and entry["fp32"] == "missing universal"), (name, entry)
            elif "experts" in name or "router" in name or zero3:
                assert (entry["fp32"], entry["exp_avg"], entry["exp_avg_sq"]) == (0.0, 0.0, 0.0), (name, entry)
            else:  # the backbone
                assert (entry["fp32"], entry["exp_avg"], entry["exp_avg_sq"]) == (0.0, "no state", "no state"), name
        assert any(n.endswith("experts.w1") for n in rank["params"]) and any(
            n.endswith("adaptive_router.w1") for n in rank["params"])
        groups = rank["groups"]
        assert [g["name"] for g in groups] == ["backbone", "router", f"ep_size_{ep_size}"]  # this job's EP group
        for i, g in enumerate(groups):
            if i in rank["stateless_groups"]:
                assert g["steps"] == [] and g["saved_steps"] == [0.0], g
            else:
                assert g["steps"] == g["saved_steps"] and len(g["steps"]) == 1, g  # Adam's step, per group
            assert (g["lr"], g["weight_decay"]) == (g["saved_lr"], g["saved_weight_decay"]), g
        assert groups[2]["steps"][0] > 0  # trained experts


def test_universal_conversion_holds_the_checkpoints_weights(zero1):
    run_dir = zero1[0]
    tag_dir = os.path.join(run_dir, "checkpoints", "step4")
    udir = reshard.universal_dir(os.path.dirname(tag_dir), "step4")
    assert reshard.is_current(tag_dir, udir)
    states = checkpoint.read_model_states(tag_dir)

    def fp32(name):
        return torch.load(os.path.join(udir, "zero", name, "fp32.pt"), weights_only=False)["param"]

    for name, t in states["module"].items():
        assert torch.equal(fp32(name), t.float()), name
    for layer in states["ds_autoep_layers"]:
        prefix = layer["expert_key_prefix"]
        for g, _, expert in checkpoint.read_expert_files(tag_dir, layer):
            for w in ("w1", "w2", "w3"):
                assert torch.equal(fp32(f"{prefix}.{w}")[g], expert[f"{prefix}.{w}.{g}"]), (prefix, w, g)


def test_two_ranks_to_one_continues_from_the_same_weights_and_moments(zero1):
    run_dir, (stdout, loaded), _ = zero1
    assert ("resuming step 4 saved on 2 ranks (ep 2) on 1 rank (ep 1) through DeepSpeed's universal checkpoint: "
            "weights and optimizer moments carried over exactly") in stdout
    _assert_engine_holds_the_checkpoint(loaded, ep_size=1)
    rank = loaded[0]
    assert (rank["start_step"], rank["global_steps"], rank["lr_scheduler"]["last_epoch"]) == (4, 4, 4)
    assert rank["summary"] == {"steps": 8, "world_size": 1, "finite": True}


def test_two_ranks_to_one_carries_desmoe_state_over(zero1):
    run_dir, (_, loaded), _ = zero1
    old = _rank_states(os.path.join(run_dir, "checkpoints", "step4"))
    assert len(old) == 2
    method = loaded[0]["method"]
    assert method["phase"] == old[0]["method"]["phase"] == "stabilization"
    assert (method["step"], method["lam"]) == (4, old[0]["method"]["lam"])
    assert method["masks"] == old[0]["method"]["masks"].tolist()
    assert _same(method["affinity"], old[0]["method"]["affinity"])
    counts = old[0]["method"]["counts"] + old[1]["method"]["counts"]
    assert counts.sum() > 0 and method["counts"] == counts.tolist()  # the open window, summed over the old ranks
    # data: the same global position (data.sync_domains), RNG re-seeded from (seed, step, rank)
    assert old[0]["sampler"] == old[1]["sampler"] and loaded[0]["sampler"] == old[0]["sampler"]
    assert loaded[0]["rng_torch_head"] == reshard.reseeded_rng_state(1234, 4, 0)["torch"][:16].tolist()
    assert loaded[0]["state"]["eval_before"] == old[0]["eval_before"]
    step8 = os.path.join(run_dir, "checkpoints", "step8")
    assert checkpoint.saved_ranks(step8) == [0] and reshard.read_layout(step8) == reshard.Layout(1, 1)


def test_one_rank_to_two(zero1):
    run_dir, _, (stdout, loaded) = zero1
    assert "resuming step 8 saved on 1 rank (ep 1) on 2 ranks (ep 2)" in stdout
    _assert_engine_holds_the_checkpoint(loaded, ep_size=2)
    old = _rank_states(os.path.join(run_dir, "checkpoints", "step8"))
    for rank in loaded:
        assert rank["start_step"] == 8 and rank["summary"] == {"steps": 12, "world_size": 2, "finite": True}
        assert rank["method"]["masks"] == old[0]["method"]["masks"].tolist()
        assert rank["method"]["phase"] == "consolidation" and rank["sampler"] == old[0]["sampler"]
    assert loaded[0]["method"]["counts"] == old[0]["method"]["counts"].tolist()
    assert not torch.tensor(loaded[1]["method"]["counts"]).any()  # the window's counts are rank 0's alone
    assert loaded[0]["rng_torch_head"] != loaded[1]["rng_torch_head"]
    assert reshard.read_layout(os.path.join(run_dir, "checkpoints", "step12")) == reshard.Layout(2, 2)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = sorted({json.loads(line)["step"] for line in f if "step" in json.loads(line)})
    assert steps == list(range(1, 13))


def test_zero3_two_ranks_to_one(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = desmoe("train", "--nproc", "2", "--config", DEMO, "--output-dir", run_dir, "--stop-at-step", "4", *SMALL,
                  "parallel.zero_stage=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert checkpoint.is_zero3(os.path.join(run_dir, "checkpoints", "step4"))
    stdout, loaded = _resume(tmp_path, "to1", run_dir, 1, "parallel.ep_size=1")
    assert "resuming step 4 saved on 2 ranks (ep 2) on 1 rank (ep 1)" in stdout
    _assert_engine_holds_the_checkpoint(loaded, ep_size=1, zero3=True)
    assert loaded[0]["summary"] == {"steps": 8, "world_size": 1, "finite": True}
