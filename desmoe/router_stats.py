"""Router statistics for tracking: expert load per MoE layer and the overlap of domains' expert sets."""

from __future__ import annotations

import math

import torch

from desmoe import dist


class ExpertLoad:
    """Tokens routed to each expert of each AutoEP layer in training forwards, summed on the device.

    ``collect()`` (a collective: every rank calls it at the same steps) sums the window over
    ranks and returns per-layer load shares; the window then restarts.
    """

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.names = [n for n, _ in layers]
        self.counts = None
        for li, (_, moe) in enumerate(layers):
            moe.router.register_forward_hook(self._hook(li, len(layers), moe.num_experts))

    def _hook(self, li: int, num_layers: int, num_experts: int):
        def hook(router, inputs, output):
            if not torch.is_grad_enabled():  # evaluation and profiling forwards are not training load
                return
            counts = output[2].detach()
            if self.counts is None:
                self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=counts.device)
            self.counts[li] += counts.to(torch.float64)

        return hook

    def collect(self) -> torch.Tensor | None:
        """[L, E] share of routed tokens per expert over all ranks since the last call (rows sum to 1)."""
        if not self.names:
            return None
        window = self.counts.cpu() if self.counts is not None else torch.zeros(1)
        window = dist.all_reduce_sum(window.clone())
        if self.counts is not None:
            self.counts.zero_()
        if window.dim() != 2:
            return None
        return window / window.sum(-1, keepdim=True).clamp(min=1)


def load_metrics(shares: torch.Tensor, layer_indices: list[int]) -> dict[str, float]:
    """Per layer: the busiest expert's share over the mean share (1 = balanced) and the normalised
    entropy of the load (1 = balanced, 0 = one expert takes everything)."""
    out = {}
    num_experts = shares.shape[-1]
    for row, layer in zip(shares, layer_indices):
        p = row.clamp(min=0)
        nz = p[p > 0]
        entropy = float(-(nz * nz.log()).sum()) / math.log(num_experts) + 0.0
        out[f"expert_load/layer{layer}/max_over_mean"] = float(p.max() * num_experts)
        out[f"expert_load/layer{layer}/entropy"] = float(entropy)
    return out


PAIRWISE_OVERLAP_MAX_DOMAINS = 8
"""Up to this many domains every pair's overlap is its own MLflow metric (28 at 8); above, one per domain."""


def domain_overlap(masks: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """Mean over MoE layers of the Jaccard overlap of the domains' expert sets; masks: bool [L, D, E].

    Up to PAIRWISE_OVERLAP_MAX_DOMAINS domains: ``affinity_overlap/<a>-<b>`` for every pair. Above (D·(D-1)/2
    keys would be 496 at 32 domains, every update): ``affinity_overlap/<d>`` = d's mean overlap with the other
    domains and ``affinity_overlap_max/<d>`` its largest, plus ``affinity_overlap/mean`` over all pairs."""
    inter = (masks.unsqueeze(2) & masks.unsqueeze(1)).sum(-1).double()  # [L, D, D]
    union = (masks.unsqueeze(2) | masks.unsqueeze(1)).sum(-1).double()
    jac = (inter / union.clamp(min=1)).mean(0)  # [D, D], mean over layers
    n = len(domains)
    if n <= PAIRWISE_OVERLAP_MAX_DOMAINS:
        return {f"affinity_overlap/{a}-{domains[j]}": float(jac[i, j])
                for i, a in enumerate(domains) for j in range(i + 1, n)}
    off = ~torch.eye(n, dtype=torch.bool)
    out = {}
    for i, d in enumerate(domains):
        others = jac[i][off[i]]
        out[f"affinity_overlap/{d}"] = float(others.mean())
        out[f"affinity_overlap_max/{d}"] = float(others.max())
    out["affinity_overlap/mean"] = float(jac[off].mean())
    return out