"""Expert-domain affinity (METHOD.md §2): pure maths, no ranks, no files.

Per MoE layer l, A[d, e] = fraction of domain-d tokens for which expert e is among the
top-K routed experts, over an update window; counts and token totals are summed over every
data-parallel rank *before* normalising (``DomainAffinity.update`` is given the collective that
does it, e.g. ``desmoe.dist.all_reduce_sum``).
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


class DomainAffinity:
    """One run's expert-domain affinity on this rank: the window's routing counts, the EMA estimate
    over windows and the experts each domain selects (``selection``: relative with ``phi``, or
    cumulative share ``p`` of the token ratio or of the mean gate weight).

    ``update(all_reduce)`` sums the window over ranks with the collective it is given, so every rank
    holds the same estimate and masks afterwards; the counts themselves are this rank's until then.
    """

    SELECTIONS = ("relative", "cumulative_token", "cumulative_gate")

    def __init__(self, num_layers: int, num_domains: int, num_experts: int, *, beta: float,
                 selection: str = "relative", phi: float = 0.5, p: float = 0.2):
        if selection not in self.SELECTIONS:
            raise ValueError(f"selection {selection!r}: not one of {', '.join(self.SELECTIONS)}")
        self.counts = AffinityCounts(num_layers, num_domains, num_experts)
        self.gate_sums = AffinityCounts(num_layers, num_domains, num_experts)
        """Sums of the routing weights of the selections (the cumulative_gate score; ESFT's gate score)."""
        self.estimate: torch.Tensor | None = None  # [L, D, E] EMA of the top-K frequency
        self.gate_estimate: torch.Tensor | None = None  # [L, D, E] EMA of the mean gate weight
        self.beta, self.selection, self.phi, self.p = beta, selection, phi, p

    @property
    def counts_gates(self) -> bool:
        """Whether training forwards must also sum gate weights (the selection uses them)."""
        return self.selection == "cumulative_gate"

    def count(self, layer: int, scores: torch.Tensor, selected: torch.Tensor, domain_ids: torch.Tensor, *,
              gates: bool) -> None:
        """One routing decision: selected [T, K] expert ids, their scores [T, K], domain_ids [T]."""
        self.counts.add(layer, selected, domain_ids)
        if gates:
            self.gate_sums.add(layer, selected, domain_ids, weights=scores)

    def pool(self, all_reduce) -> None:
        """Sum both window counts over ranks, in place (``all_reduce``: a collective every rank calls)."""
        packed = all_reduce(torch.stack([self.counts.as_tensor(), self.gate_sums.as_tensor()]))
        self.counts.load_tensor(packed[0])
        self.gate_sums.load_tensor(packed[1])

    def reset(self) -> None:
        """Start a new window."""
        self.counts.reset()
        self.gate_sums.reset()

    def update(self, all_reduce) -> torch.Tensor:
        """Pool the window, fold it into the EMA, start a new window; returns the selection M [L, D, E]."""
        self.pool(all_reduce)
        self.estimate = ema_update(self.estimate, compute_window_affinity(self.counts.hits, self.counts.tokens),
                                   self.beta)
        if self.counts_gates:
            gate = compute_window_affinity(self.gate_sums.hits, self.gate_sums.tokens)  # mean gate weight
            self.gate_estimate = ema_update(self.gate_estimate, gate, self.beta)
        self.reset()
        if self.selection == "relative":
            return select_relative(self.estimate, self.phi)
        if self.selection == "cumulative_token":
            return select_cumulative(self.estimate, self.p)  # token ratio ∝ top-K frequency
        return select_cumulative(self.gate_estimate, self.p)

    def state_dict(self) -> dict:
        """The estimates and this rank's window counts (summed over ranks only at the next update)."""
        return {"affinity": self.estimate, "gate_affinity": self.gate_estimate, "counts": self.counts.as_tensor(),
                "gate_sums": self.gate_sums.as_tensor()}

    def load_state_dict(self, state: dict) -> None:
        self.estimate, self.gate_estimate = state["affinity"], state["gate_affinity"]
        self.counts.load_tensor(state["counts"])
        self.gate_sums.load_tensor(state["gate_sums"])


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
