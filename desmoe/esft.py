"""ESFT's expert selection (Wang et al. 2024), the baselines ``esft_gate`` / ``esft_token``: profile, score, select.

Before training, ``profile`` routes ``method.esft_profile_tokens`` training tokens per domain through the
engine (no training), scores every routed expert per layer and domain, selects per domain by cumulative
share p, and sets the method's masks to the union of the domains' selections (what trains).

Scores: token ratio = share of a domain's tokens routed to e / K; gate score = mean routing weight of e
over the domain's tokens (0 where not selected).
"""

from __future__ import annotations

import torch

from desmoe import dist
from desmoe.data import DomainData
from desmoe.method import DesMoE
from desmoe.routing.affinity import AffinityCounts, select_cumulative


@torch.no_grad()
def profile(method: DesMoE, domains: dict[str, DomainData], *, micro_batch_size: int, rank: int,
            world_size: int) -> dict:
    """Route the profile tokens, select the experts, set ``method.masks``; returns the selection
    (the content of the run's esft_selection.json). A collective: every rank calls it.

    Every rank runs the same number of forwards (expert parallelism needs matching all-to-alls).
    """
    m = method.cfg.method
    engine = method.engine
    dev = next(engine.module.parameters()).device
    engine.eval()
    method.counting = True
    for d, name in enumerate(method.domains):
        data = domains[name]
        rows, seq = data.train_ids.shape
        per_batch = micro_batch_size * world_size * seq
        n_batches = max(1, -(-m.esft_profile_tokens // per_batch))
        method.domain_index = d
        for b in range(n_batches):
            idx = [(b * micro_batch_size * world_size + rank * micro_batch_size + i) % rows
                   for i in range(micro_batch_size)]
            engine(input_ids=data.train_ids[idx].to(dev))
    method.counting = False
    engine.train()
    method.affinity.pool(dist.all_reduce_sum)
    scores, p = expert_scores(method.affinity.counts, method.affinity.gate_sums, method.mode, m.esft_p)
    per_domain = select_cumulative(scores, p)  # [L, D, E]
    union = per_domain.any(dim=1)  # [L, E]
    method.masks = union.unsqueeze(1).expand_as(per_domain).clone()
    method.affinity.reset()
    layers = range(len(method.moe_layers))
    return {
        "mode": method.mode, "p": p, "score": "token_ratio" if method.mode == "esft_token" else "gate_score",
        "profile_tokens_per_domain": m.esft_profile_tokens, "domains": method.domains,
        "layers": method.moe_layers, "scores": scores.tolist(),
        "selected": {name: [torch.nonzero(per_domain[li, d]).flatten().tolist() for li in layers]
                     for d, name in enumerate(method.domains)},
        "trained_union": [torch.nonzero(union[li]).flatten().tolist() for li in layers],
    }


def expert_scores(counts: AffinityCounts, gate_sums: AffinityCounts, mode: str,
                  esft_p: float | None) -> tuple[torch.Tensor, float]:
    """(scores [L, D, E], cumulative share p) of ESFT mode ``mode`` from the profile's pooled counts;
    p defaults to the paper's 0.2 (token ratio) and 0.1 (gate score)."""
    tokens = counts.tokens.unsqueeze(-1).clamp(min=1)
    if mode == "esft_token":
        top_k = counts.hits.sum(-1, keepdim=True) / tokens
        return counts.hits / (tokens * top_k), (esft_p or 0.2)
    return gate_sums.hits / tokens, (esft_p or 0.1)
