"""Expert-domain affinity (METHOD.md §2): pure maths, no ranks, no files.

Per MoE layer l, A[d, e] = fraction of domain-d tokens for which expert e is among the
top-K routed experts, over an update window; counts and token totals are summed over every
data-parallel rank *before* normalising (the caller all-reduces ``AffinityCounts.tensor``).
"""

from __future__ import annotations

import torch


class AffinityCounts:
    """Window counts: ``hits[l, d, e]`` (top-K selections) and ``tokens[l, d]``, float64."""

    def __init__(self, num_layers: int, num_domains: int, num_experts: int):
        self.hits = torch.zeros(num_layers, num_domains, num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, num_domains, dtype=torch.float64)

    def add(self, layer: int, selected_experts: torch.Tensor, domain_ids: torch.Tensor,
            weights: torch.Tensor | None = None) -> None:
        """Count one routing decision.

        selected_experts: [T, K] global expert ids; domain_ids: [T] domain index of each token;
        weights: optional [T, K] values to sum instead of 1 per selection (e.g. gate scores).
        """
        sel = selected_experts.detach().to("cpu", torch.long)
        dom = domain_ids.detach().to("cpu", torch.long)
        num_domains, num_experts = self.hits.shape[1:]
        flat = (dom.unsqueeze(1) * num_experts + sel).reshape(-1)
        w = None if weights is None else weights.detach().to("cpu", torch.float64).reshape(-1)
        self.hits[layer] += torch.bincount(flat, weights=w, minlength=num_domains * num_experts).view(
            num_domains, num_experts).to(torch.float64)
        self.tokens[layer] += torch.bincount(dom, minlength=num_domains).to(torch.float64)

    def reset(self) -> None:
        self.hits.zero_()
        self.tokens.zero_()

    def as_tensor(self) -> torch.Tensor:
        """hits and tokens packed in one tensor [L, D, E + 1] (one all-reduce sums both)."""
        return torch.cat([self.hits, self.tokens.unsqueeze(-1)], dim=-1)

    def load_tensor(self, packed: torch.Tensor) -> None:
        self.hits.copy_(packed[..., :-1])
        self.tokens.copy_(packed[..., -1])


def compute_window_affinity(hits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A[l, d, e] = hits / tokens; rows of domains with no tokens are NaN (no evidence).

    hits: [L, D, E]; tokens: [L, D].
    """
    tok = tokens.unsqueeze(-1)
    return torch.where(tok > 0, hits / tok.clamp(min=1), torch.full_like(hits, float("nan")))


def ema_update(previous: torch.Tensor | None, window: torch.Tensor, beta: float) -> torch.Tensor:
    """Â ← β·A_window + (1−β)·Â; the first estimate is the window itself; domains without
    tokens in this window (NaN rows) keep their previous estimate."""
    if previous is None:
        return window.clone()
    fresh = torch.isnan(window)
    blended = beta * window + (1.0 - beta) * previous
    out = torch.where(fresh, previous, blended)
    return torch.where(torch.isnan(previous) & ~fresh, window, out)


def select_relative(affinity: torch.Tensor, phi: float) -> torch.Tensor:
    """M[.., d, e] = Â[d, e] ≥ φ · max_e' Â[d, e'] (bool, same shape). Rows with no estimate select all."""
    a = torch.nan_to_num(affinity, nan=1.0)
    top = a.max(dim=-1, keepdim=True).values
    return a >= phi * top


def select_cumulative(scores: torch.Tensor, p: float) -> torch.Tensor:
    """ESFT selection: per row, experts in descending score until the cumulative share ≥ p.

    scores: [..., E] non-negative (gate score or token ratio); returns bool [..., E].
    """
    s = torch.nan_to_num(scores.double(), nan=0.0).clamp(min=0)
    total = s.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    share = s / total
    order = torch.argsort(share, dim=-1, descending=True)
    sorted_share = torch.gather(share, -1, order)
    before = torch.cumsum(sorted_share, dim=-1) - sorted_share
    take_sorted = before < p - 1e-12  # take experts while the share so far is below p
    mask = torch.zeros_like(take_sorted)
    mask.scatter_(-1, order, take_sorted)
    return mask
