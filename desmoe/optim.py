"""AdamW that leaves frozen parameter groups and frozen ranges of a parameter exactly untouched.

Used in the method modes (desmoe, its ablations, ESFT) as the optimizer inside DeepSpeed ZeRO
1/2, passed to ``deepspeed.initialize`` as a client optimizer with the settings desmoe would
otherwise give DeepSpeed's own (``torch.optim.AdamW`` through ``torch_adam``). Two differences:

- a group whose LR is 0 (a part the phase table freezes) is skipped: no Adam arithmetic over it
  and its moments do not decay while it is frozen;
- ``frozen_ranges[id(p)]``, set before a step by the gradient isolation (``RowGuard``), lists
  [start, end) ranges of a flat ZeRO partition that the step must not change (the fused expert
  rows a step's domain does not select): the update runs on the remaining ranges only, so
  weights, master copy and moments of the frozen rows stay bit-identical, and the step costs
  in proportion to what trains.

Every other element gets torch's own AdamW arithmetic (``torch.optim.adam.adam``), element for
element the same as ``torch.optim.AdamW`` on the whole tensor.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam


def trainable_ranges(frozen: list[tuple[int, int]], numel: int) -> list[tuple[int, int]]:
    """The complement of sorted, non-overlapping ``frozen`` ranges in [0, numel)."""
    out, pos = [], 0
    for a, b in sorted(frozen):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < numel:
        out.append((pos, numel))
    return out


class MaskedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW plus skipped LR-0 groups and per-parameter frozen ranges (see the module doc)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        if any(g["amsgrad"] for g in self.param_groups):
            raise ValueError("MaskedAdamW does not support amsgrad")
        self.frozen_ranges: dict[int, list[tuple[int, int]]] = {}
        self.state_for_frozen_groups = False
        """Create (zero) state for LR-0 groups at each step too. Set under ZeRO 3: DeepSpeed's universal
        conversion of a ZeRO 3 checkpoint (export, resume on another world size) needs optimizer state for
        every sub-group. The cost: Adam moments for frozen parts too (partitioned over the ranks)."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MaskedAdamW.step takes no closure")
        for group in self.param_groups:
            if group["lr"] == 0:
                if self.state_for_frozen_groups:
                    # zero moments and step 0, what the group's first real step would create anyway
                    self._init_group(group, [], [], [], [], [], [])
                continue
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
            # NOTE: torch's own lazy state initialisation (private API of the pinned torch 2.13).
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps)
            masked_steps = []
            if self.frozen_ranges:
                params, grads, exp_avgs, exp_avg_sqs, steps, masked_steps = self._split(
                    params, grads, exp_avgs, exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            if params:
                adam(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, amsgrad=False, has_complex=has_complex,
                     beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
                     differentiable=group["differentiable"], fused=group["fused"],
                     grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                     decoupled_weight_decay=group["decoupled_weight_decay"])
            for s in masked_steps:  # one step for the whole tensor, its frozen ranges included
                s += 1
        return None

    def _split(self, params, grads, exp_avgs, exp_avg_sqs, steps):
        """Replace each parameter with frozen ranges by views of its trainable ranges (each with its own
        copy of the step count, so the bias correction is the tensor's)."""
        out = ([], [], [], [], [])
        masked_steps = []
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            frozen = self.frozen_ranges.get(id(p))
            if not frozen:
                for lst, x in zip(out, (p, g, m, v, s)):
                    lst.append(x)
                continue
            flat = [t.view(-1) for t in (p, g, m, v)]
            for a, b in trainable_ranges(frozen, p.numel()):
                for lst, t in zip(out, flat):
                    lst.append(t[a:b])
                out[4].append(s.clone())
            masked_steps.append(s)
        return (*out, masked_steps)
