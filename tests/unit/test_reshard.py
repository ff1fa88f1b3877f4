"""desmoe.reshard without ranks: the saved layout, the universal conversion's reuse and safety, and how
desmoe's state moves to another number of ranks (sampler, affinity window counts, RNG)."""

import os
import random

import pytest
import torch

from desmoe import checkpoint, reshard
from desmoe.checkpoint import MODEL_STATES, CheckpointError
from desmoe.data import DomainData, DomainSampler


def make_checkpoint(tag_dir, *, ranks=2, ep_size=2, states=None):
    """A checkpoint directory as far as desmoe.reshard reads it: DeepSpeed's model states (with AutoEP's
    layer metadata) and one desmoe state per rank."""
    os.makedirs(tag_dir, exist_ok=True)
    layers = [{"moe_layer_id": i, "num_experts": 8, "ep_size": ep_size} for i in range(2)]
    torch.save({"module": {"w": torch.ones(2)}, "ds_autoep_layers": layers,
                "ds_config": {"expert_parallel": {"autoep_size": ep_size}}}, os.path.join(tag_dir, MODEL_STATES))
    for r in range(ranks):
        torch.save(states[r] if states else {"step": 4, "rank": r}, checkpoint.state_file(str(tag_dir), r))
    return str(tag_dir)


# ---- the saved layout ------------------------------------------------------------------------


def test_read_layout_and_plan(tmp_path):
    tag_dir = make_checkpoint(tmp_path / "step4", ranks=2, ep_size=2)
    assert reshard.read_layout(tag_dir) == reshard.Layout(world_size=2, ep_size=2)
    assert reshard.plan(tag_dir, world_size=2, ep_size=2) is None  # same layout: loaded as it is
    assert reshard.plan(tag_dir, world_size=1, ep_size=1) == reshard.Layout(2, 2)
    assert reshard.plan(tag_dir, world_size=2, ep_size=1) == reshard.Layout(2, 2)  # EP size alone differs
    with pytest.raises(CheckpointError, match="does not divide the world size 3"):
        reshard.plan(tag_dir, world_size=3, ep_size=2)
    os.remove(checkpoint.state_file(tag_dir, 0))
    with pytest.raises(CheckpointError, match=r"incomplete \(found ranks \[1\]"):
        reshard.read_layout(tag_dir)


def test_read_layout_without_autoep_metadata_reads_the_ds_config(tmp_path):
    tag_dir = tmp_path / "step2"
    tag_dir.mkdir()
    torch.save({"module": {}, "ds_config": {"expert_parallel": {"autoep_size": 4}}}, tag_dir / MODEL_STATES)
    for r in range(4):
        torch.save({"step": 2}, checkpoint.state_file(str(tag_dir), r))
    assert reshard.read_layout(str(tag_dir)) == reshard.Layout(4, 4)


def test_universal_ds_config_leaves_the_original_alone():
    ds = {"zero_optimization": {"stage": 1}, "checkpoint": {"tag_validation": "Warn"}}
    out = reshard.universal_ds_config(ds)
    assert out["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert ds["checkpoint"] == {"tag_validation": "Warn"} and out["zero_optimization"] is ds["zero_optimization"]


# ---- conversion: once, reused while current, never of a tampered file -------------------------


@pytest.fixture
def fake_converter(monkeypatch):
    """checkpoint.to_universal replaced by one that only makes the output layout (DeepSpeed is tested in
    tests/integration/test_reshard.py)."""
    calls = []

    def to_universal(tag_dir, out_dir):
        calls.append(tag_dir)
        os.makedirs(os.path.join(out_dir, "zero", "w"))
        torch.save({"param": torch.ones(2)}, os.path.join(out_dir, "zero", "w", "fp32.pt"))
        return out_dir

    monkeypatch.setattr(checkpoint, "to_universal", to_universal)
    return calls


def test_convert_once_and_again_when_the_checkpoint_is_saved_anew(tmp_path, fake_converter):
    root = tmp_path / "checkpoints"
    make_checkpoint(root / "step4")
    udir = reshard.convert(str(root), "step4", trust_pickle=False)
    assert udir == str(root / "step4.universal") and reshard.is_current(str(root / "step4"), udir)
    assert reshard.convert(str(root), "step4", trust_pickle=False) == udir
    assert len(fake_converter) == 1  # reused
    model_states = root / "step4" / MODEL_STATES
    torch.save({"module": {"w": torch.zeros(3)}}, model_states)  # the same step saved again
    os.utime(model_states, ns=(1, 1))
    assert not reshard.is_current(str(root / "step4"), udir)
    reshard.convert(str(root), "step4", trust_pickle=False)
    assert len(fake_converter) == 2
    assert not checkpoint.is_complete(str(root), "step4.universal")  # never taken for a resumable tag


def _optim_file(path, states):
    """A ZeRO 1/2 optimizer-states file as far as fill_stateless_groups reads it (one flat partition per group)."""
    flats = [torch.full((4,), float(i)) for i in range(len(states))]
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {
        "state": dict(enumerate(states)), "param_groups": [{"lr": 0.0, "params": [i]} for i in range(len(states))]},
        "single_partition_of_fp32_groups": flats}}, path)


def test_groups_without_optimizer_state_get_what_their_first_step_would_create(tmp_path, fake_converter):
    """MaskedAdamW keeps no moments for a group it has never stepped (ZeRO 1/2); DeepSpeed's converter needs them."""
    root = tmp_path / "checkpoints"
    tag_dir = make_checkpoint(root / "step4")
    trained = {"step": torch.tensor(4.0), "exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)}
    for r in range(2):
        _optim_file(os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), [{}, trained])
    work = str(tmp_path / "filled")
    source, stateless = reshard.fill_stateless_groups(tag_dir, work)
    assert (source, stateless) == (work, [0])
    assert sorted(os.listdir(work)) == sorted(os.listdir(tag_dir))
    assert os.path.islink(os.path.join(work, MODEL_STATES))
    base = torch.load(os.path.join(work, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                      weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    assert torch.equal(base["state"][0]["exp_avg"], torch.zeros(4)) and float(base["state"][0]["step"]) == 0.0
    assert torch.equal(base["state"][1]["exp_avg"], torch.ones(4))  # trained groups as they were
    # convert: the converter reads the filled copy, which is removed after; the universal dir records group 0
    udir = reshard.convert(str(root), "step4", trust_pickle=False)
    assert fake_converter == [str(root / ("step4" + reshard.FILLED))] and not os.path.exists(fake_converter[0])
    assert reshard.read_source(udir)["stateless_groups"] == [0]
    # nothing missing: the checkpoint itself is converted
    for r in range(2):
        _optim_file(os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), [trained, trained])
    assert reshard.fill_stateless_groups(tag_dir, str(tmp_path / "again")) == (tag_dir, [])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_before_deepspeed_unpickles_it(tmp_path, fake_converter):
    root = tmp_path / "checkpoints"
    tag_dir = make_checkpoint(root / "step4")
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Evil(marker)}, os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1.*posix\.system.*checkpoint\.trust_pickle"):
        reshard.convert(str(root), "step4", trust_pickle=False)
    assert not marker.exists() and not fake_converter


def test_load_reports_a_conversion_error_on_every_rank(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    make_checkpoint(root / "step4")

    def broken(tag_dir, out_dir):
        raise CheckpointError(f"cannot convert {tag_dir} to DeepSpeed's universal format")

    monkeypatch.setattr(checkpoint, "to_universal", broken)
    with pytest.raises(CheckpointError, match="cannot convert"):
        reshard.load(object(), str(root), "step4", reshard.Layout(2, 2), rank=0, world_size=1, seed=1,
                     trust_pickle=False)


class FakeEngine:
    def __init__(self):
        self.loaded = []
        self.checkpoint_engine = type("CheckpointEngine", (), {"load": None})()
        self.optimizer = type("Optimizer", (), {"param_groups": [{"name": "backbone"}, {"name": "ep_size_1"}]})()

    def load_checkpoint(self, root, tag, **kwargs):
        self.loaded.append((root, tag))
        self.optimizer.param_groups[1]["name"] = "ep_size_2"  # as DeepSpeed copies the saved group's settings
        return os.path.join(root, tag), {}


def test_load_reads_the_universal_tag_and_maps_every_ranks_state(tmp_path, fake_converter):
    root = tmp_path / "checkpoints"
    states = [state(r, counts=float(r + 1)) for r in range(2)]
    make_checkpoint(root / "step4", states=states)
    engine = FakeEngine()
    out = reshard.load(engine, str(root), "step4", reshard.Layout(2, 2), rank=0, world_size=1, seed=7,
                       trust_pickle=False)
    assert engine.loaded == [(str(root), "step4.universal")]
    assert engine.checkpoint_engine.load is checkpoint.safe_load
    assert [g["name"] for g in engine.optimizer.param_groups] == ["backbone", "ep_size_1"]  # this job's EP group
    assert torch.equal(out["method"]["counts"], torch.full((2, 3, 9), 3.0))


# ---- desmoe's state on the new ranks ---------------------------------------------------------


def state(rank, *, step=4, counts=1.0, cursor=None):
    """A per-rank state as train.save_checkpoint writes it (DES-MoE mode)."""
    return {"step": step, "world_size": 2, "elapsed_s": 10.0 + rank, "eval_before": {"math": {"loss": 6.0}},
            "eval_history": [{"step": 2}], "eval_best": None,
            "sampler": {"micro_step": 4, "cursor": cursor or {"math": 16, "code": 8}, "seed": 1},
            "rng": {"rank": rank},
            "method": {"phase": "stabilization", "lam": 0.5, "step": step, "masks": torch.ones(2, 3, 8, dtype=torch.bool),
                       "affinity": torch.full((2, 3, 8), 0.25), "gate_affinity": None,
                       "counts": torch.full((2, 3, 9), counts), "gate_sums": torch.full((2, 3, 9), counts / 2)}}


def test_same_number_of_ranks_keeps_each_ranks_own_state():
    states = [state(0, counts=1.0), state(1, counts=2.0)]
    for r in range(2):
        assert reshard.map_state(states, rank=r, world_size=2, seed=1) is states[r]


def test_two_ranks_to_one_and_to_four():
    states = [state(0, counts=1.0), state(1, counts=2.0)]
    one = reshard.map_state(states, rank=0, world_size=1, seed=1)
    assert one["world_size"] == 1 and one["step"] == 4 and one["elapsed_s"] == 10.0
    assert one["eval_history"] == [{"step": 2}] and one["eval_before"] == states[0]["eval_before"]
    m = one["method"]
    assert (m["phase"], m["lam"], m["step"]) == ("stabilization", 0.5, 4)
    assert m["masks"] is states[0]["method"]["masks"] and m["affinity"] is states[0]["method"]["affinity"]
    # the window counts are summed: the next all-reduce (over one rank) sees the two ranks' totals
    assert torch.equal(m["counts"], torch.full((2, 3, 9), 3.0))
    assert torch.equal(m["gate_sums"], torch.full((2, 3, 9), 1.5))
    four = [reshard.map_state(states, rank=r, world_size=4, seed=1) for r in range(4)]
    total = sum(s["method"]["counts"] for s in four)
    assert torch.equal(total, torch.full((2, 3, 9), 3.0)) and not four[1]["method"]["counts"].any()
    assert not torch.equal(four[0]["rng"]["torch"], four[1]["rng"]["torch"])  # re-seeded per rank


def test_no_method_state_stays_none():
    states = [{**state(r), "method": None} for r in range(2)]
    assert reshard.map_state(states, rank=0, world_size=1, seed=1)["method"] is None


def test_a_checkpoint_whose_ranks_disagree_is_refused():
    with pytest.raises(CheckpointError, match=r"disagree on the step \(\[4, 5\]\)"):
        reshard.map_state([state(0), state(1, step=5)], rank=0, world_size=1, seed=1)
    bad = state(1)
    bad["sampler"] = {**bad["sampler"], "micro_step": 3}
    with pytest.raises(CheckpointError, match="disagree on the micro-step"):
        reshard.map_state([state(0), bad], rank=0, world_size=1, seed=1)


def test_map_sampler_takes_each_domains_furthest_position():
    out = reshard.map_sampler([{"micro_step": 6, "cursor": {"a": 8, "b": 16}, "seed": 1},
                               {"micro_step": 6, "cursor": {"a": 12, "b": 4}, "seed": 1}])
    assert out == {"micro_step": 6, "cursor": {"a": 12, "b": 16}, "seed": 1}


def _domain(name, n):
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return DomainData(name=name, weight=1.0, examples=n, tokens=4 * n, train_ids=ids, train_labels=ids,
                      eval_ids=ids[:1], eval_labels=ids[:1])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_the_data_continues_where_it_stopped(before, after):
    """With data.sync_domains, W ranks for 5 micro-steps then W' ranks read each domain's rows in the order
    one job would: the domain sequence goes on, no row is repeated or skipped within an epoch."""
    domains = {"a": _domain("a", 200), "b": _domain("b", 200)}  # (all in the first epoch)
    old = [DomainSampler(domains, micro_batch_size=2, seed=3, rank=r, world_size=before) for r in range(before)]
    seen = {"a": [], "b": []}
    sequence = []
    for _ in range(5):
        batches = [s.next_batch() for s in old]
        sequence.append(batches[0][0])
        for name, ids, _ in batches:
            seen[name] += ids[:, 0].tolist()
    mapped = reshard.map_sampler([s.state_dict() for s in old])
    new = [DomainSampler(domains, micro_batch_size=2, seed=3, rank=r, world_size=after) for r in range(after)]
    for s in new:
        s.load_state_dict(mapped)
    for _ in range(5):
        batches = [s.next_batch() for s in new]
        assert len({b[0] for b in batches}) == 1
        sequence.append(batches[0][0])
        for name, ids, _ in batches:
            seen[name] += ids[:, 0].tolist()
    assert sequence == [DomainSampler(domains, micro_batch_size=2, seed=3).domain_of(0, k) for k in range(10)]
    for name, rows in seen.items():
        order = [new[0]._order(name, 0)[i] for i in range(len(rows))]
        assert sorted(rows) == sorted(order), name  # exactly the epoch permutation's first rows, each once


def test_reseeded_rng_is_deterministic_per_rank_and_leaves_this_process_alone():
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), random.getstate())
    a = reshard.reseeded_rng_state(1234, 40, 0)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    b = reshard.reseeded_rng_state(1234, 40, 0)
    c = reshard.reseeded_rng_state(1234, 40, 1)
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]
    assert not torch.equal(a["torch"], c["torch"])
    checkpoint.set_rng_state(a)
    x = torch.rand(3)
    torch.manual_seed(reshard.rng_seed(1234, 40, 0))
    assert torch.equal(x, torch.rand(3))


def test_describe():
    assert reshard.describe(reshard.Layout(2, 2), step=4, world_size=1, ep_size=1) == (
        "resuming step 4 saved on 2 ranks (ep 2) on 1 rank (ep 1) through DeepSpeed's universal checkpoint: "
        "weights and optimizer moments carried over exactly; data order continues from the saved position, "
        "split over the new ranks; per-rank RNG streams re-seeded from (run.seed, step, rank)")
    assert "RNG streams carried over" in reshard.describe(reshard.Layout(2, 2), step=4, world_size=2, ep_size=1)
