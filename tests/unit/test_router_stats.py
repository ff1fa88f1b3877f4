import itertools
import math

import torch

from desmoe.router_stats import domain_overlap, load_metrics


def test_load_metrics_balanced_and_collapsed():
    shares = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    m = load_metrics(shares, [1, 3])
    assert m["expert_load/layer1/max_over_mean"] == 1.0 and math.isclose(m["expert_load/layer1/entropy"], 1.0)
    assert m["expert_load/layer3/max_over_mean"] == 4.0 and m["expert_load/layer3/entropy"] == 0.0


def test_domain_overlap_is_mean_jaccard_over_layers():
    masks = torch.tensor([
        [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]],  # layer 0: a/b share 1 of 3, a/c 0, b/c 0
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]],  # layer 1: a/b 2/2, a/c 2/4, b/c 2/4
    ], dtype=torch.bool)
    m = domain_overlap(masks, ["a", "b", "c"])
    assert math.isclose(m["affinity_overlap/a-b"], (1 / 3 + 1) / 2)
    assert math.isclose(m["affinity_overlap/a-c"], 0.25) and math.isclose(m["affinity_overlap/b-c"], 0.25)


def test_domain_overlap_above_eight_domains_is_one_metric_per_domain():
    torch.manual_seed(0)
    masks = torch.rand(3, 12, 16) < 0.3
    names = [f"d{i}" for i in range(12)]
    m = domain_overlap(masks, names)
    assert len(m) == 2 * 12 + 1
    pairs = domain_overlap(masks[:, :8], names[:8])  # the pairwise form, on the first 8
    assert len(pairs) == 28
    jac = {}
    for i, j in itertools.permutations(range(12), 2):
        inter = (masks[:, i] & masks[:, j]).sum(-1).double()
        union = (masks[:, i] | masks[:, j]).sum(-1).double()
        jac[i, j] = float((inter / union.clamp(min=1)).mean())
    assert math.isclose(pairs["affinity_overlap/d0-d1"], jac[0, 1])
    for i in range(12):
        others = [jac[i, j] for j in range(12) if j != i]
        assert math.isclose(m[f"affinity_overlap/d{i}"], sum(others) / 11)
        assert math.isclose(m[f"affinity_overlap_max/d{i}"], max(others))
    assert math.isclose(m["affinity_overlap/mean"], sum(jac.values()) / len(jac))
