import math

import pytest
import torch

from desmoe.routing.affinity import (AffinityCounts, DomainAffinity, compute_window_affinity, ema_update,
                                     select_cumulative, select_relative)


def test_counts_and_window_affinity_known_answer():
    c = AffinityCounts(num_layers=1, num_domains=2, num_experts=4)
    # 3 tokens of domain 0 choosing {0,1},{0,2},{0,1}; 1 token of domain 1 choosing {3,2}
    c.add(0, torch.tensor([[0, 1], [0, 2], [0, 1], [3, 2]]), torch.tensor([0, 0, 0, 1]))
    a = compute_window_affinity(c.hits, c.tokens)[0]
    assert a[0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert a[1].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_summing_packed_counts_equals_counting_everything_in_one_place():
    rng = torch.Generator().manual_seed(0)
    parts = [(torch.randint(0, 8, (50, 2), generator=rng), torch.randint(0, 3, (50,), generator=rng))
             for _ in range(2)]
    ranks = []
    for sel, dom in parts:
        c = AffinityCounts(1, 3, 8)
        c.add(0, sel, dom)
        ranks.append(c.as_tensor())
    single = AffinityCounts(1, 3, 8)
    single.add(0, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    summed = AffinityCounts(1, 3, 8)
    summed.load_tensor(ranks[0] + ranks[1])
    assert torch.equal(summed.hits, single.hits) and torch.equal(summed.tokens, single.tokens)


def test_ema_first_estimate_then_blend_and_missing_domains_keep_estimate():
    w1 = torch.tensor([[0.5, 0.5], [float("nan"), float("nan")]])
    a = ema_update(None, w1, 0.9)
    assert torch.equal(a[0], w1[0])
    w2 = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    b = ema_update(a, w2, 0.9)
    assert b[0].tolist() == pytest.approx([0.95, 0.05])
    assert b[1].tolist() == pytest.approx([0.2, 0.8])  # first evidence for domain 1
    w3 = torch.tensor([[float("nan"), float("nan")], [0.0, 1.0]])
    c = ema_update(b, w3, 0.9)
    assert c[0].tolist() == pytest.approx([0.95, 0.05])


def test_relative_selection():
    a = torch.tensor([[0.9, 0.6, 0.53, 0.1], [0.2, 0.2, 0.05, 0.0]])
    m = select_relative(a, 0.6)
    assert m.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert select_relative(torch.full((1, 3), float("nan")), 0.6).all()


def test_cumulative_selection_known_answer():
    s = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.1, 0.7]])
    assert select_cumulative(s, 0.2).tolist() == [[True, False, False, False], [False, False, False, True]]
    assert select_cumulative(s, 0.6).tolist() == [[True, True, False, False], [False, False, False, True]]
    assert select_cumulative(s, 0.75).tolist()[1].count(True) == 2
    assert select_cumulative(s, 1.0).all()


# ---- DomainAffinity: one run's counts, estimate and selection ------------------------------------


def _routed(aff: DomainAffinity, *, gates: bool) -> None:
    """Layer 0: domain 0's 2 tokens go to experts (0, 1) and (0, 2); domain 1's token to (2, 3)."""
    selected = torch.tensor([[0, 1], [0, 2], [2, 3]])
    scores = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    aff.count(0, scores, selected, torch.tensor([0, 0, 1]), gates=gates)


def test_domain_affinity_update_pools_once_folds_the_ema_and_starts_a_new_window():
    aff = DomainAffinity(1, 2, 4, beta=0.25, selection="relative", phi=0.6)
    calls = []

    def all_reduce(t):  # stands for the sum over 2 ranks that each saw the same tokens
        calls.append(tuple(t.shape))
        return t * 2

    _routed(aff, gates=False)
    masks = aff.update(all_reduce)
    assert calls == [(2, 1, 2, 5)]  # both windows in one collective: [counts | gate sums, L, D, E + tokens]
    assert aff.estimate[0].tolist() == [[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]]
    assert masks[0].tolist() == [[True, False, False, False], [False, False, True, True]]  # >= 0.6 * max
    assert aff.counts.hits.sum() == 0 and aff.gate_sums.tokens.sum() == 0 and aff.gate_estimate is None
    aff.count(0, torch.ones(1, 2), torch.tensor([[1, 3]]), torch.tensor([0]), gates=False)
    aff.update(all_reduce)
    # domain 0: 0.25 * window (0, 1, 0, 1) + 0.75 * previous; domain 1 had no tokens: its estimate stays
    assert aff.estimate[0, 0].tolist() == [0.75, 0.625, 0.375, 0.25]
    assert aff.estimate[0, 1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_domain_affinity_cumulative_gate_selects_by_mean_gate_weight():
    aff = DomainAffinity(1, 2, 4, beta=1.0, selection="cumulative_gate", p=0.5)
    assert aff.counts_gates
    _routed(aff, gates=True)
    masks = aff.update(lambda t: t)
    assert torch.allclose(aff.gate_estimate[0, 0], torch.tensor([0.75, 0.2, 0.05, 0.0], dtype=torch.float64))
    assert torch.equal(masks, select_cumulative(aff.gate_estimate, 0.5))
    assert masks[0, 0].tolist() == [True, False, False, False]  # 0.75 of the gate weight >= p
    token = DomainAffinity(1, 2, 4, beta=1.0, selection="cumulative_token", p=0.5)
    _routed(token, gates=False)
    assert torch.equal(token.update(lambda t: t), select_cumulative(token.estimate, 0.5))
    with pytest.raises(ValueError, match="not one of"):
        DomainAffinity(1, 2, 4, beta=1.0, selection="top_k")


def test_domain_affinity_state_round_trips_estimates_and_window():
    aff = DomainAffinity(1, 2, 4, beta=0.5, selection="cumulative_gate", p=0.3)
    _routed(aff, gates=True)
    aff.update(lambda t: t)
    _routed(aff, gates=True)  # a window in progress
    state = aff.state_dict()
    assert set(state) == {"affinity", "gate_affinity", "counts", "gate_sums"}  # the checkpoint's keys
    other = DomainAffinity(1, 2, 4, beta=0.5, selection="cumulative_gate", p=0.3)
    other.load_state_dict(state)
    assert torch.equal(other.estimate, aff.estimate) and torch.equal(other.gate_estimate, aff.gate_estimate)
    assert torch.equal(other.counts.hits, aff.counts.hits) and torch.equal(other.gate_sums.tokens, aff.gate_sums.tokens)
    assert torch.equal(other.update(lambda t: t), aff.update(lambda t: t))
