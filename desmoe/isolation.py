"""Gradient isolation of routed experts: gradient masks on fused expert rows and an exact masked step.

AutoEP stores a layer's local experts as fused tensors ``experts.w1/w2/w3`` of shape
[E_local, ...]; local row i is global expert ``ep_rank * E_local + i``.

Two mechanisms make a masked expert row bit-identical across an optimizer step (METHOD.md §2):
- a tensor hook multiplies the row's gradient by 0 for every micro-batch whose domain does
  not select it, so it contributes nothing (and the global grad norm does not see it);
- around ``engine.step()``, rows masked for the whole step are kept out of the update, so
  neither decoupled weight decay nor momentum from earlier steps moves them: with desmoe's
  ``MaskedAdamW`` (the method modes' optimizer) their ranges of the flat fp32 partition are
  handed to the optimizer, which updates only the rest; with any other optimizer their fp32
  master copy, Adam moments and model weights are saved and restored. The partition ranges
  come from DeepSpeed ZeRO 1/2's tensor-fragment mapping (``param._hp_mapping``) or, under ZeRO 3,
  from ``deepspeed.utils.safe_get_local_fp32_param`` (this rank's partition of the parameter, a view of
  the optimizer's flat fp32 sub-group), locally, without collectives: each rank handles only the
  fragment it owns.
"""

from __future__ import annotations

import torch

from desmoe import dist
from desmoe.optim import MaskedAdamW


class ExpertParam:
    """One fused expert tensor of one MoE layer on this rank."""

    def __init__(self, layer: int, name: str, param: torch.nn.Parameter, ep_rank: int, num_local: int):
        self.layer, self.name, self.param = layer, name, param
        self.ep_rank, self.num_local = ep_rank, num_local
        # NOTE: under ZeRO 3 the parameter's own data is released between forwards; ds_numel is its full size
        self.row_numel = getattr(param, "ds_numel", param.numel()) // num_local
        self.keep = torch.ones(num_local, dtype=param.dtype, device=param.device)  # gradient row mask
        self.all_kept = True  # host-side copy of keep.all(): the hook must not sync with the device

    def set_keep(self, rows: torch.Tensor) -> None:
        """Rows (bool or 0/1, [E_local], on the host) whose gradient passes in the next backward."""
        self.all_kept = bool(rows.all())
        self.keep = rows.to(device=self.keep.device, dtype=self.keep.dtype)

    def local_rows(self, global_mask: torch.Tensor) -> torch.Tensor:
        """The rows of a [E_global] mask that this rank holds -> [E_local]."""
        start = self.ep_rank * self.num_local
        return global_mask[start:start + self.num_local]

    def hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self.all_kept:
            return grad
        return grad * self.keep.view(-1, *([1] * (grad.dim() - 1)))


class RowGuard:
    """Save, then restore, the state of masked expert rows around one optimizer step (ZeRO 1, 2 or 3).

    Args:
        optimizer: the engine's DeepSpeedZeroOptimizer (stage 1 or 2) or DeepSpeedZeroOptimizer_Stage3.
    """

    def __init__(self, optimizer):
        self.opt = optimizer
        self.masked = isinstance(getattr(optimizer, "optimizer", None), MaskedAdamW)
        self.saved: list = []
        self._index_cache: dict = {}
        self._z3_fragments: dict = {}  # ZeRO 3: the flat partitions do not move once built

    def _fragment(self, ep: ExpertParam):
        """(lp_start, lp_numel, hp_start, flat) of the part of ``ep.param`` this rank owns: elements
        [lp_start, lp_start + lp_numel) of the flattened parameter sit at [hp_start, ...) of ``flat``, the fp32
        partition the optimizer steps (and keys its state by); None if this rank owns none of it."""
        if hasattr(ep.param, "ds_tensor"):
            key = id(ep.param)
            if key not in self._z3_fragments:
                self._z3_fragments[key] = self._fragment_zero3(ep)
            return self._z3_fragments[key]
        mapping = getattr(ep.param, "_hp_mapping", None)
        if mapping is None:
            return None
        lp = mapping.lp_fragment_address
        flat = self.opt.single_partition_of_fp32_groups[mapping.param_group_index]
        return lp.start, lp.numel, mapping.hp_fragment_address.start, flat

    def _fragment_zero3(self, ep: ExpertParam):
        """ZeRO 3: DeepSpeed's ``safe_get_local_fp32_param`` gives this rank's partition of the parameter as a
        view of one sub-group's flat fp32 partition; the view's place in that flat is the fragment. The
        partition is the ``ds_tensor.ds_numel`` elements starting at partition-rank x that size."""
        from deepspeed.utils import safe_get_local_fp32_param

        view = safe_get_local_fp32_param(ep.param)
        if view is None:
            return None
        for flat in self.opt.fp32_partitioned_groups_flat:
            offset = (view.data_ptr() - flat.data_ptr()) // flat.element_size()
            if flat.untyped_storage().data_ptr() == view.untyped_storage().data_ptr() and 0 <= offset < flat.numel():
                part = ep.param.ds_tensor.ds_numel
                lp_start = self.opt._get_param_partition_rank(ep.param) * part
                return lp_start, max(0, min(part, ep.param.ds_numel - lp_start)), offset, flat
        raise RuntimeError(f"ZeRO 3: the fp32 partition of expert tensor {ep.name} of MoE layer {ep.layer} is not in "
                           "any of the optimizer's flat sub-groups")

    def _flat_ranges(self, ep: ExpertParam, rows: tuple[int, ...]) -> list[tuple[int, int]]:
        """[start, end) ranges of this rank's fp32 partition that hold the given local rows (the parts it
        owns), consecutive rows merged into one range; cached.

        NOTE: a fused expert row is contiguous in the flat buffer, so whole ranges are copied with
        slices (memcpy speed) instead of gathering index tensors as large as the experts."""
        key = (id(ep.param), rows)
        if key not in self._index_cache:
            frag = self._fragment(ep)
            ranges: list[tuple[int, int]] = []
            if frag is not None:
                lp_start, _, hp_start, _ = frag
                for lo, hi in self._owned(ep, frag, self._row_runs(rows)):
                    a, b = hp_start + lo - lp_start, hp_start + hi - lp_start
                    if ranges and ranges[-1][1] == a:
                        ranges[-1] = (ranges[-1][0], b)
                    else:
                        ranges.append((a, b))
            self._index_cache[key] = ranges
        return self._index_cache[key]

    def _weight_runs(self, ep: ExpertParam, rows: tuple[int, ...]) -> list[tuple[torch.Tensor, int, int]]:
        """(tensor, start, end) of the model weights of the given local rows that this rank holds: slices of the
        flattened parameter (ZeRO 1/2), or of its local partition ``ds_tensor`` (ZeRO 3)."""
        if not hasattr(ep.param, "ds_tensor"):
            flat = ep.param.data.view(-1)
            return [(flat, a * ep.row_numel, b * ep.row_numel) for a, b in self._row_runs(rows)]
        frag = self._fragment(ep)
        if frag is None:
            return []
        part = ep.param.ds_tensor.data.view(-1)
        return [(part, lo - frag[0], hi - frag[0]) for lo, hi in self._owned(ep, frag, self._row_runs(rows))]

    @staticmethod
    def _owned(ep: ExpertParam, frag, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of runs of local rows that this rank's fragment holds, as [start, end) element ranges of
        the flattened parameter."""
        lp_start, lp_numel = frag[0], frag[1]
        out = []
        for a, b in runs:
            lo, hi = max(a * ep.row_numel, lp_start), min(b * ep.row_numel, lp_start + lp_numel)
            if lo < hi:
                out.append((lo, hi))
        return out

    @staticmethod
    def _row_runs(rows: tuple[int, ...]) -> list[tuple[int, int]]:
        """Consecutive local rows as [start, end) runs."""
        runs: list[tuple[int, int]] = []
        for r in rows:
            if runs and runs[-1][1] == r:
                runs[-1] = (runs[-1][0], r + 1)
            else:
                runs.append((r, r + 1))
        return runs

    @torch.no_grad()
    def save(self, params: list[ExpertParam], frozen_rows: dict[int, torch.Tensor]) -> None:
        """``frozen_rows[layer]`` is a bool [E_local] of rows that must not move in this step."""
        self.saved = []
        if self.masked:
            self._hand_to_optimizer(params, frozen_rows)
            return
        for ep in params:
            rows = frozen_rows.get(ep.layer)
            if rows is None or not bool(rows.any()):
                continue
            rows_t = tuple(torch.nonzero(rows).flatten().tolist())
            weights = [(lp, a, b, lp[a:b].clone()) for lp, a, b in self._weight_runs(ep, rows_t)]
            ranges = self._flat_ranges(ep, rows_t)
            flat = masters = moments = None
            if ranges:
                flat = self._fragment(ep)[3]
                state = self.opt.optimizer.state.get(flat, {})
                masters = [flat[a:b].clone() for a, b in ranges]
                moments = {k: [state[k][a:b].clone() for a, b in ranges] for k in ("exp_avg", "exp_avg_sq")
                           if k in state}
            self.saved.append((ep, weights, flat, ranges, masters, moments))

    def _hand_to_optimizer(self, params: list[ExpertParam], frozen_rows: dict[int, torch.Tensor]) -> None:
        """MaskedAdamW: the step skips the frozen rows' ranges of each flat partition."""
        ranges = self.opt.optimizer.frozen_ranges
        ranges.clear()
        for ep in params:
            rows = frozen_rows.get(ep.layer)
            if rows is None or not bool(rows.any()):
                continue
            own = self._flat_ranges(ep, tuple(torch.nonzero(rows).flatten().tolist()))
            if own:
                ranges.setdefault(id(self._fragment(ep)[3]), []).extend(own)

    @torch.no_grad()
    def restore(self) -> None:
        if self.masked:
            self.opt.optimizer.frozen_ranges.clear()
            return
        for ep, weights, flat, ranges, masters, moments in self.saved:
            for lp, a, b, w in weights:
                lp[a:b] = w
            if not ranges:
                continue
            state = self.opt.optimizer.state.get(flat, {})
            for i, (a, b) in enumerate(ranges):
                flat[a:b] = masters[i]
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in state:
                        # a state created by this very step started from zero
                        state[k][a:b] = moments[k][i] if k in moments else 0
        self.saved = []

    @torch.no_grad()
    def clear_moments(self, params: list[ExpertParam], rows_by_layer: dict[int, torch.Tensor]) -> None:
        """Zero the Adam moments of the given local rows (experts that left every domain's set)."""
        for ep in params:
            rows = rows_by_layer.get(ep.layer)
            if rows is None or not bool(rows.any()):
                continue
            ranges = self._flat_ranges(ep, tuple(torch.nonzero(rows).flatten().tolist()))
            if not ranges:
                continue
            state = self.opt.optimizer.state.get(self._fragment(ep)[3], {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    for a, b in ranges:
                        state[k][a:b] = 0


class TokenMasker:
    """Per-token gradient isolation for one AutoEP layer (mixed domains in a micro-batch or across ranks).

    Token i of domain d_i contributes to expert e's weight gradient only where M[d_i, e] = 1;
    its forward output and the gradient reaching the hidden states are unchanged. After the
    router (on the token's own rank) each token-slot's domain label is sent along the same
    all-to-all split plan AutoEP uses for the hidden states, and permuted with AutoEP's own
    ``permute_by_local_expert``, so every row the experts compute carries its domain. Rows whose
    domain does not select their expert are recomputed with detached expert weights and swapped
    in: same value, no weight gradient, exact input gradient.

    NOTE: this costs one extra count all-to-all and one label all-to-all per layer and forward,
    on every rank of the EP group alike (collectives stay matched), plus the recomputation of the
    masked rows' experts.
    """

    def __init__(self, moe, layer: int):
        self.moe, self.layer = moe, layer
        self.row_labels = None  # [N_padded] domain id + 1 of each permuted row (0 = padding)
        self.allowed = None  # bool [D, E_global] for this step's phase, or None = all allowed
        self.active = False
        self.kept_rows = torch.zeros(moe.num_local_experts, dtype=torch.bool)  # rows that got an allowed token

    def after_router(self, router_output, token_domains: torch.Tensor) -> None:
        """Route the labels exactly like the hidden states. router_output: (scores, selected [T, K], counts [E])."""
        from deepspeed.module_inject.auto_ep_layer import compute_split_plan, permute_by_local_expert

        moe = self.moe
        selected, counts = router_output[1], router_output[2]
        order = torch.argsort(selected.view(-1), stable=True)
        labels = (token_domains.to(selected.device)[order // moe.top_k] + 1).to(torch.float32).unsqueeze(1)
        if moe.ep_size == 1:
            local_counts = counts
        else:
            plan = compute_split_plan(selected_experts=selected, num_experts=moe.num_experts, ep_size=moe.ep_size,
                                      num_local_experts=moe.num_local_experts, ep_group=moe.ep_group,
                                      num_tokens_per_expert=counts)
            received = labels.new_empty((sum(plan.output_splits), 1))
            dist.all_to_all_single(received, labels.contiguous(), plan.output_splits, plan.input_splits,
                                   group=moe.ep_group)
            labels, local_counts = received, plan.local_counts_by_source
        permuted, _, _, _ = permute_by_local_expert(labels, local_counts)
        self.row_labels = permuted.squeeze(1).round().long()

    def experts_hook(self, experts, inputs, output):
        if not self.active or self.row_labels is None or self.allowed is None:
            return output
        x, sizes = inputs
        moe = self.moe
        # rows are grouped by local expert in ``sizes`` (alignment-padded); trailing rows are padding
        grouped = torch.repeat_interleave(torch.arange(moe.num_local_experts, device=x.device), sizes.to(torch.long))
        row_expert = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        row_expert[:grouped.shape[0]] = grouped
        labels = self.row_labels.to(x.device)
        assert labels.shape[0] == x.shape[0], "label routing out of step with AutoEP's dispatch"
        global_expert = moe.ep_rank * moe.num_local_experts + row_expert
        allowed = self.allowed.to(x.device)
        keep = (labels == 0) | allowed[(labels - 1).clamp(min=0), global_expert]
        self.kept_rows[row_expert[keep & (labels > 0)].unique().cpu()] = True
        self.row_labels = None
        if bool(keep.all()):
            return output
        detached = {n: p.detach() for n, p in experts.named_parameters()}
        # NOTE: the module's forward itself, not its __call__: ZeRO 3's hooks on the experts module would try to
        # gather the plain detached tensors as partitioned parameters (torch's own reparametrisation, the one
        # torch.func.functional_call uses; private API of the pinned torch 2.13)
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(experts, detached):
            frozen_out = experts.forward(x, sizes)
        return torch.where(keep.unsqueeze(1), output, frozen_out)
