import math

import pytest
import torch

from desmoe.routing.affinity import (AffinityCounts, compute_window_affinity, ema_update, select_cumulative,
                                     select_relative)


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
