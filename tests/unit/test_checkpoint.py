"""desmoe.checkpoint on directories built here: which tags are complete, resume, pruning, safe loading.

Only the file layout is under test: a fake engine writes DeepSpeed's model-states file where
engine.save_checkpoint would.
"""

import json
import os
import random

import pytest
import torch

from desmoe import checkpoint
from desmoe.checkpoint import CHECKPOINTS, MODEL_STATES, CheckpointError


def make_tag(root, tag, *, model_states=True, ranks=1):
    """A checkpoint directory ``root/tag`` (with DeepSpeed's model states and ``ranks`` desmoe states)."""
    d = root / tag
    d.mkdir(parents=True)
    if model_states:
        torch.save({"module": {"w": torch.ones(2)}}, d / MODEL_STATES)
    for r in range(ranks):
        torch.save({"step": checkpoint.step_of(tag), "rank": r}, checkpoint.state_file(str(d), r))
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "run" / CHECKPOINTS
    r.mkdir(parents=True)
    return r


class FakeEngine:
    """engine.save_checkpoint / load_checkpoint as far as desmoe.checkpoint uses them."""

    def __init__(self, load_path="ok"):
        self.saved, self.loaded, self.load_path = [], [], load_path
        self.checkpoint_engine = type("CheckpointEngine", (), {"load": None})()

    def save_checkpoint(self, root, tag, save_latest):
        assert save_latest is False
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        torch.save({"module": {"w": torch.full((2,), float(len(self.saved)))}}, os.path.join(root, tag, MODEL_STATES))
        self.saved.append(tag)

    def load_checkpoint(self, root, tag, **kwargs):
        self.loaded.append((root, tag, kwargs))
        return (None if self.load_path is None else os.path.join(root, tag)), {}


# ---- which tags are complete -----------------------------------------------------------------


def test_tag_names():
    assert checkpoint.tag_of(20) == "step20" and checkpoint.step_of("step20") == 20
    assert checkpoint.step_of("best") is None and checkpoint.step_of("step20.partial") is None
    assert checkpoint.step_of("stepx") is None and checkpoint.step_of("xstep3") is None


def test_complete_means_model_states_in_a_final_directory(root):
    for tag in ("step2", "step10", "step9", "best"):
        make_tag(root, tag)
    make_tag(root, "step11.partial")  # a save in progress, even with its files
    make_tag(root, "step1.stale")  # a replaced checkpoint being removed
    make_tag(root, "step12", model_states=False)  # DeepSpeed's files never written
    (root / "step13").write_text("not a directory")
    (root / "latest").write_text("step10")

    assert checkpoint.tags(str(root)) == ["best", "step2", "step9", "step10"]
    assert checkpoint.complete_tags(str(root)) == ["step2", "step9", "step10"]  # by N, best not resumable
    assert checkpoint.is_complete(str(root), "best") and checkpoint.is_complete(str(root), "step9")
    for tag in ("step11.partial", "step1.stale", "step12", "step13", "step99"):
        assert not checkpoint.is_complete(str(root), tag), tag
    assert checkpoint.tags(str(root / "nope")) == [] and checkpoint.complete_tags(str(root / "nope")) == []


def test_latest_tag_follows_latest_and_falls_back_to_the_newest_complete_step(root):
    assert checkpoint.latest_tag(str(root)) is None
    make_tag(root, "best")
    assert checkpoint.latest_tag(str(root)) is None  # best is never resumed from
    make_tag(root, "step9")
    make_tag(root, "step10")
    assert checkpoint.latest_tag(str(root)) == "step10"  # no latest file: the newest by step, not by name
    (root / "latest").write_text("step9\n")
    assert checkpoint.latest_tag(str(root)) == "step9"
    (root / "latest").write_text("step99")  # missing
    assert checkpoint.latest_tag(str(root)) == "step10"
    make_tag(root, "step11", model_states=False)
    (root / "latest").write_text("step11")  # incomplete
    assert checkpoint.latest_tag(str(root)) == "step10"
    (root / "latest").write_text("best")
    assert checkpoint.latest_tag(str(root)) == "step10"


# ---- resolve (desmoe export / eval --checkpoint) ---------------------------------------------


def test_resolve_picks_latest_or_the_tag_asked_for(root):
    run_dir = str(root.parent)
    for tag in ("step10", "step9", "best"):
        make_tag(root, tag)
    (root / "latest").write_text("step9")
    assert checkpoint.resolve(run_dir) == ("step9", os.path.join(run_dir, CHECKPOINTS, "step9"))
    assert checkpoint.resolve(run_dir, "best") == ("best", os.path.join(run_dir, CHECKPOINTS, "best"))
    assert checkpoint.resolve(run_dir, "step10")[0] == "step10"


def test_resolve_errors_say_what_is_there(root):
    run_dir = str(root.parent)
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve(run_dir)
    assert str(e.value).startswith(f"{run_dir} has no checkpoint ({root}/latest does not exist).")
    with pytest.raises(CheckpointError, match="--checkpoint step1: no complete checkpoint with that tag") as e:
        checkpoint.resolve(run_dir, "step1")
    assert str(e.value).endswith("There is no complete checkpoint.")

    make_tag(root, "step10")
    make_tag(root, "step9")
    make_tag(root, "best")
    make_tag(root, "step11.partial")
    listing = "Complete checkpoints: best, step9, step10."
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve(run_dir)
    assert str(e.value) == f"{root}/latest does not exist. {listing} Pick one with --checkpoint TAG."
    (root / "latest").write_text("step11.partial")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve(run_dir)
    assert str(e.value) == (f"{root}/latest names checkpoint 'step11.partial', which is missing or incomplete in "
                            f"{root}. {listing} Pick one with --checkpoint TAG.")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve(run_dir, "step11")
    assert str(e.value) == f"--checkpoint step11: no complete checkpoint with that tag in {root}. {listing}"


# ---- resume ----------------------------------------------------------------------------------


def test_find_resumable(root):
    run_dir = str(root.parent)
    make_tag(root, "step3.partial")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*only the incomplete step3\.partial"):
        checkpoint.find_resumable(run_dir)
    make_tag(root, "best")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.find_resumable(run_dir)
    make_tag(root, "step4", ranks=2)
    assert checkpoint.find_resumable(run_dir) == (str(root), "step4")  # any world size (desmoe.reshard)
    assert checkpoint.saved_ranks(str(root / "step4")) == [0, 1]
    os.remove(checkpoint.state_file(str(root / "step4"), 0))
    os.rename(checkpoint.state_file(str(root / "step4"), 1), root / "step4" / "desmoe_state_rank7.pt")
    with pytest.raises(CheckpointError, match=r"holds desmoe's state of rank\(s\) \[7\], not of ranks 0\.\.7"):
        checkpoint.find_resumable(run_dir)  # one state file, but not rank 0's


def test_load_resumes_through_the_engine_and_returns_this_ranks_state(root):
    make_tag(root, "step4", ranks=2)
    engine = FakeEngine()
    state = checkpoint.load(engine, str(root), "step4", rank=1, trust_pickle=False)
    assert state == {"step": 4, "rank": 1}
    assert engine.loaded == [(str(root), "step4", {"load_optimizer_states": True,
                                                    "load_lr_scheduler_states": True})]
    assert engine.checkpoint_engine.load is not None  # safe loading installed before DeepSpeed reads
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(FakeEngine(load_path=None), str(root), "step4", rank=0, trust_pickle=True)
    assert str(e.value) == f"--resume: DeepSpeed could not load {root / 'step4'}."


# ---- saving ----------------------------------------------------------------------------------


def test_save_keeps_the_newest_and_points_latest(tmp_path):
    run_dir = str(tmp_path / "run")
    root = os.path.join(run_dir, CHECKPOINTS)
    engine = FakeEngine()
    for step in (1, 2, 3, 4):
        path = checkpoint.save(engine, run_dir, step, {"step": step}, keep=2, rank=0)
        assert path == os.path.join(root, f"step{step}")
    assert engine.saved == ["step1.partial", "step2.partial", "step3.partial", "step4.partial"]
    assert sorted(os.listdir(root)) == ["latest", "step3", "step4"]
    assert open(os.path.join(root, "latest")).read() == "step4"
    assert checkpoint.load_state(os.path.join(root, "step3"), 0) == {"step": 3}

    # a resumed run repeating step 3 replaces it, and latest points at it; the one just saved is never pruned
    checkpoint.save(engine, run_dir, 3, {"step": 3, "again": True}, keep=1, rank=0)
    assert sorted(os.listdir(root)) == ["latest", "step3", "step4"]
    assert checkpoint.load_state(os.path.join(root, "step3"), 0) == {"step": 3, "again": True}
    assert checkpoint.latest_tag(root) == "step3"

    # a save killed before: its .partial is replaced
    os.makedirs(os.path.join(root, "step5.partial", "junk"))
    checkpoint.save(engine, run_dir, 5, {"step": 5}, keep=2, rank=0)
    assert not os.path.exists(os.path.join(root, "step5", "junk"))
    assert checkpoint.complete_tags(root) == ["step4", "step5"]


def test_save_best_is_complete_but_never_resumed_or_pruned(tmp_path):
    run_dir = str(tmp_path / "run")
    root = os.path.join(run_dir, CHECKPOINTS)
    engine = FakeEngine()
    checkpoint.save(engine, run_dir, 1, {"step": 1}, keep=1, rank=0)
    assert checkpoint.save_best(engine, run_dir, {"step": 1, "value": 2.5}, rank=0) == os.path.join(root, "best")
    checkpoint.save_best(engine, run_dir, {"step": 1, "value": 1.5}, rank=0)  # replaced
    checkpoint.save(engine, run_dir, 2, {"step": 2}, keep=1, rank=0)
    assert sorted(os.listdir(root)) == ["best", "latest", "step2"]
    assert checkpoint.tags(root) == ["best", "step2"] and checkpoint.latest_tag(root) == "step2"
    assert json.load(open(os.path.join(root, "best", "best.json"))) == {"step": 1, "value": 1.5}
    best = torch.load(os.path.join(root, "best", MODEL_STATES), weights_only=True)
    assert torch.equal(best["module"]["w"], torch.full((2,), 2.0))  # the second save_best's weights


# ---- state -----------------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(5), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


class NotData:
    """Stands for any object a tampered checkpoint could make torch.load build."""


def test_safe_loading_refuses_pickled_objects(tmp_path):
    ok, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(3), "n": 1}, ok)
    torch.save({"w": NotData()}, bad)
    engine = FakeEngine()
    checkpoint.use_safe_loading(engine)
    loaded = engine.checkpoint_engine.load(str(ok), map_location="cpu")
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["n"] == 1
    with pytest.raises(CheckpointError) as e:
        engine.checkpoint_engine.load(str(bad))
    assert str(e.value).startswith(f"{bad} holds the object {__name__}.NotData; desmoe loads checkpoints as data")
    assert "checkpoint.trust_pickle=true" in str(e.value)

    trusting = FakeEngine()
    checkpoint.use_safe_loading(trusting, trust_pickle=True)
    assert trusting.checkpoint_engine.load is None  # DeepSpeed's own loader stays


def test_read_file_and_model_states(root):
    d = make_tag(root, "step1")
    assert torch.equal(checkpoint.read_model_states(str(d))["module"]["w"], torch.ones(2))
    missing = str(d / "layer_0_expert_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_file(missing)
    assert str(e.value) == (f"{missing} is missing: the checkpoint is incomplete. Export another one with "
                            "--checkpoint TAG.")
    (d / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_file(str(d / "junk.pt"))
    assert str(e.value).startswith(f"cannot read {d / 'junk.pt'} (UnpicklingError: ")
    assert str(e.value).endswith("). The checkpoint is damaged; export another one with --checkpoint TAG.")
    torch.save([1, 2], d / MODEL_STATES)
    with pytest.raises(CheckpointError, match="holds no module state: not a DeepSpeed checkpoint written by desmoe"):
        checkpoint.read_model_states(str(d))


def test_read_expert_files_in_global_order(root):
    d = make_tag(root, "step1")
    for g in range(3):
        torch.save({f"m.experts.w1.{g}": torch.tensor([g])}, d / f"layer_4_expert_{g}_{MODEL_STATES}")
    layer = {"moe_layer_id": 4, "module_path": "m", "num_experts": 3, "expert_key_prefix": "m.experts"}
    got = list(checkpoint.read_expert_files(str(d), layer))
    assert [(g, os.path.basename(p)) for g, p, _ in got] == [(g, f"layer_4_expert_{g}_{MODEL_STATES}")
                                                              for g in range(3)]
    assert [int(s[f"m.experts.w1.{g}"]) for g, _, s in got] == [0, 1, 2]
    with pytest.raises(CheckpointError, match="experts of m are stored as 'fused'"):
        list(checkpoint.read_expert_files(str(d), dict(layer, checkpoint_format="fused")))
    with pytest.raises(CheckpointError, match="layer_4_expert_3_mp_rank_00_model_states.pt is missing"):
        list(checkpoint.read_expert_files(str(d), dict(layer, num_experts=4)))
