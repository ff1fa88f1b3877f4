"""DomainSampler (desmoe/data/sampler.py): seeded domain draws, rank slices, resume."""

import pytest
import torch

from desmoe.data import DomainData, DomainSampler


def _domain(name, n, weight=1.0):
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return DomainData(name=name, weight=weight, examples=n, tokens=4 * n, train_ids=ids, train_labels=ids + 1000,
                      eval_ids=ids[:1], eval_labels=ids[:1])


def _domains(steps, sampler):
    return [sampler.next_batch()[0] for _ in range(steps)]


def test_same_seed_same_stream_other_seed_other_domains():
    domains = {"a": _domain("a", 10), "b": _domain("b", 10), "c": _domain("c", 10)}

    def stream(seed):
        s = DomainSampler(domains, micro_batch_size=2, seed=seed)
        return [(d, x[:, 0].tolist()) for d, x, _ in (s.next_batch() for _ in range(40))]

    assert stream(5) == stream(5)
    assert [d for d, _ in stream(5)] != [d for d, _ in stream(6)]


def test_sync_domains_false_draws_per_rank_and_domain_of_predicts_them():
    domains = {"a": _domain("a", 16), "b": _domain("b", 16)}
    synced = [DomainSampler(domains, micro_batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    free = [DomainSampler(domains, micro_batch_size=2, seed=1, rank=r, world_size=2, sync_domains=False)
            for r in range(2)]
    predicted = [[free[0].domain_of(r, k) for k in range(50)] for r in range(2)]
    assert _domains(50, synced[0]) == _domains(50, synced[1])
    drawn = [_domains(50, s) for s in free]
    assert drawn[0] != drawn[1]  # each rank its own draw
    assert drawn == predicted  # any rank can compute any rank's domain
    again = DomainSampler(domains, micro_batch_size=2, seed=1, rank=1, world_size=2, sync_domains=False)
    assert _domains(50, again) == drawn[1]


def test_ranks_split_each_epoch_and_labels_follow_their_rows():
    domains = {"a": _domain("a", 12)}
    samplers = [DomainSampler(domains, micro_batch_size=3, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        rows = []
        for _ in range(2):  # 2 micro-steps x 2 ranks x 3 rows = one epoch of 12 rows
            for s in samplers:
                _, x, y = s.next_batch()
                assert torch.equal(y, x + 1000)
                rows += x[:, 0].tolist()
        assert sorted(rows) == list(range(12)), epoch
    assert samplers[0].cursor["a"] == 3 * 12


def test_zero_weight_domain_is_never_drawn():
    s = DomainSampler({"a": _domain("a", 4), "off": _domain("off", 4, weight=0.0)}, micro_batch_size=1, seed=0)
    assert set(_domains(200, s)) == {"a"}


def test_state_dict_is_a_copy_and_unknown_domains_start_at_zero():
    domains = {"a": _domain("a", 6), "b": _domain("b", 6)}
    s = DomainSampler(domains, micro_batch_size=2, seed=2)
    _domains(3, s)
    state = s.state_dict()
    saved = dict(state["cursor"])
    _domains(3, s)
    assert state["cursor"] == saved and state["micro_step"] == 3 and state["seed"] == 2
    resumed = DomainSampler(domains, micro_batch_size=2, seed=2)
    resumed.load_state_dict({"micro_step": 3, "cursor": {"a": saved["a"]}})
    assert resumed.cursor == {"a": saved["a"], "b": 0} and resumed.micro_step == 3


def test_needs_a_domain():
    with pytest.raises(ValueError, match="at least one domain"):
        DomainSampler({}, micro_batch_size=1, seed=0)
