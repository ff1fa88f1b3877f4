"""desmoe.dist in one process: the helpers without a process group, and all_to_all_single on a 1-rank gloo group."""

import datetime

import pytest
import torch
import torch.distributed as tdist

from desmoe import dist


@pytest.fixture
def no_group():
    assert not tdist.is_initialized(), "a process group leaked from another test"
    yield


def test_without_a_process_group_it_is_a_run_of_one(no_group):
    assert not dist.is_initialized()
    assert dist.get_world_size_and_rank() == (1, 0)
    t = torch.tensor([1.0, 2.5])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.5]
    obj = {"a": [1, 2]}
    assert dist.broadcast_object(obj) is obj
    assert dist.all_gather_objects(obj) == [obj]
    dist.barrier()  # no-op, does not raise
    dist.destroy()  # no-op, does not raise
    out = torch.empty(3)
    assert dist.all_to_all_single(out, torch.tensor([4.0, 5.0, 6.0]), [3], [3]) is out
    assert out.tolist() == [4.0, 5.0, 6.0]


@pytest.fixture
def gloo_group(tmp_path, no_group):
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        tdist.destroy_process_group()
    assert not tdist.is_initialized()


def test_collectives_on_a_one_rank_gloo_group(gloo_group):
    assert dist.is_initialized() and dist.get_world_size_and_rank() == (1, 0)
    x = torch.arange(6, dtype=torch.float32).view(3, 2) * 1.5 - 2
    out = torch.full_like(x, float("nan"))
    got = dist.all_to_all_single(out, x, [3], [3])
    assert got is out and torch.equal(out, x)
    out = torch.zeros(3, 2)
    dist.all_to_all_single(out, x, group=tdist.group.WORLD)  # even splits, explicit group
    assert torch.equal(out, x)
    t = torch.tensor([3.0, -1.0], dtype=torch.float64)
    assert dist.all_reduce_sum(t).tolist() == [3.0, -1.0]
    assert dist.all_gather_objects({"r": 0}) == [{"r": 0}]
    assert dist.broadcast_object([1, "x"]) == [1, "x"]
    dist.barrier()
