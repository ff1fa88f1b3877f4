"""Gradient isolation of routed experts: gradient masks on fused expert rows and an exact masked step.

AutoEP stores a layer's local experts as fused tensors ``experts.w1/w2/w3`` of shape
[E_local, ...]; local row i is global expert ``ep_rank * E_local + i``.

Two mechanisms make a masked expert row bit-identical across an optimizer step (METHOD.md §2):
- a tensor hook multiplies the row's gradient by 0 for every micro-batch whose domain does
  not select it, so it contributes nothing (and the global grad norm does not see it);
- around ``engine.step()``, rows masked for the whole step have their fp32 master copy,
  Adam moments and model weights saved and restored, so neither decoupled weight decay nor
  momentum from earlier steps moves them. The master copy and moments are reached through
  DeepSpeed ZeRO 1/2's tensor-fragment mapping (``param._hp_mapping``), locally, without
  collectives: each rank restores only the fragment it owns.
"""

from __future__ import annotations

import torch


class ExpertParam:
    """One fused expert tensor of one MoE layer on this rank."""

    def __init__(self, layer: int, name: str, param: torch.nn.Parameter, ep_rank: int, num_local: int):
        self.layer, self.name, self.param = layer, name, param
        self.ep_rank, self.num_local = ep_rank, num_local
        self.row_numel = param.numel() // num_local
        self.keep = torch.ones(num_local, dtype=param.dtype, device=param.device)  # gradient row mask

    def local_rows(self, global_mask: torch.Tensor) -> torch.Tensor:
        """The rows of a [E_global] mask that this rank holds -> [E_local]."""
        start = self.ep_rank * self.num_local
        return global_mask[start:start + self.num_local]

    def hook(self, grad: torch.Tensor) -> torch.Tensor:
        if bool(self.keep.all()):
            return grad
        return grad * self.keep.view(-1, *([1] * (grad.dim() - 1)))


class RowGuard:
    """Save, then restore, the state of masked expert rows around one optimizer step (ZeRO 1/2).

    Args:
        optimizer: the engine's DeepSpeedZeroOptimizer (stage 1 or 2).
    """

    def __init__(self, optimizer):
        self.opt = optimizer
        self.saved: list = []
        self._index_cache: dict = {}

    def _fragment(self, ep: ExpertParam):
        mapping = getattr(ep.param, "_hp_mapping", None)
        if mapping is None:
            return None
        lp = mapping.lp_fragment_address
        flat = self.opt.single_partition_of_fp32_groups[mapping.param_group_index]
        return mapping, lp.start, lp.numel, flat

    def _flat_index(self, ep: ExpertParam, rows: tuple[int, ...]):
        """Indices into this rank's fp32 partition of the given local rows (those it owns), cached."""
        key = (id(ep.param), rows)
        if key not in self._index_cache:
            frag = self._fragment(ep)
            idx = None
            if frag is not None:
                mapping, lp_start, lp_numel, _ = frag
                hp_start = mapping.hp_fragment_address.start
                parts = []
                for r in rows:
                    lo = max(r * ep.row_numel, lp_start)
                    hi = min((r + 1) * ep.row_numel, lp_start + lp_numel)
                    if lo < hi:
                        parts.append(torch.arange(hp_start + lo - lp_start, hp_start + hi - lp_start))
                idx = torch.cat(parts) if parts else None
            self._index_cache[key] = idx
        return self._index_cache[key]

    @torch.no_grad()
    def save(self, params: list[ExpertParam], frozen_rows: dict[int, torch.Tensor]) -> None:
        """``frozen_rows[layer]`` is a bool [E_local] of rows that must not move in this step."""
        self.saved = []
        for ep in params:
            rows = frozen_rows.get(ep.layer)
            if rows is None or not bool(rows.any()):
                continue
            rows_t = tuple(torch.nonzero(rows).flatten().tolist())
            row_idx = torch.tensor(rows_t)
            weights = ep.param.data[row_idx].clone()
            idx = self._flat_index(ep, rows_t)
            master = moments = flat = None
            if idx is not None:
                flat = self._fragment(ep)[3]
                state = self.opt.optimizer.state.get(flat, {})
                master = flat[idx]
                moments = {k: state[k][idx] for k in ("exp_avg", "exp_avg_sq") if k in state}
            self.saved.append((ep, row_idx, weights, flat, idx, master, moments))

    @torch.no_grad()
    def restore(self) -> None:
        for ep, row_idx, weights, flat, idx, master, moments in self.saved:
            ep.param.data[row_idx] = weights
            if idx is None:
                continue
            flat[idx] = master
            state = self.opt.optimizer.state.get(flat, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    # a state created by this very step started from zero
                    state[k][idx] = moments[k] if k in moments else 0
        self.saved = []

    @torch.no_grad()
    def clear_moments(self, params: list[ExpertParam], rows_by_layer: dict[int, torch.Tensor]) -> None:
        """Zero the Adam moments of the given local rows (experts that left every domain's set)."""
        for ep in params:
            rows = rows_by_layer.get(ep.layer)
            frag = self._fragment(ep)
            if rows is None or frag is None or not bool(rows.any()):
                continue
            mapping, lp_start, lp_numel, flat = frag
            state = self.opt.optimizer.state.get(flat, {})
            hp_start = mapping.hp_fragment_address.start
            for r in torch.nonzero(rows).flatten().tolist():
                lo = max(r * ep.row_numel, lp_start)
                hi = min((r + 1) * ep.row_numel, lp_start + lp_numel)
                if lo < hi:
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in state:
                            state[k][hp_start + lo - lp_start:hp_start + hi - lp_start] = 0
