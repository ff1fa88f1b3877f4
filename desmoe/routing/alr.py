"""Adaptive Lightweight Router (ALR) and its distillation from the frozen pretrained router.

Student logits (METHOD.md §1):   z_adapt = W h + W2 · GELU(W1 h + b1) + b2
    W   the model's own router weight, trainable (AutoEP's ``router.gate``),
    W1  Kaiming-initialised [hidden, d_model], b1 zeros,
    W2, b2 zeros, so z_adapt == z_orig exactly at step 0.
Teacher logits:                  z_orig = W_orig h   (a frozen copy of the pretrained W)

Router parameters receive ∇(λ·L_KD + (1−λ)·L_task); every other parameter ∇L_task only.
The task path scales only the *router parameters'* gradient by (1−λ) (``scale_grad``),
never the gradient flowing back into the hidden states; L_KD is computed on detached
hidden states so it reaches router parameters alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return _ScaleGrad.apply(x, scale)


def kd_lambda(alpha: float, alpha2: float) -> float:
    """λ(α) = max(0, 1 − α/α₂): 1 at the start, 0 from α ≥ α₂ on (the paper's 1 − α with α₂ = 1)."""
    if alpha2 <= 0:
        return 0.0
    return max(0.0, 1.0 - alpha / alpha2)


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · mean over tokens of KL(softmax(teacher/τ) ‖ softmax(student/τ)).

    Shapes: both [T, E] (any leading dims are flattened). Teacher first; computed in fp32.
    """
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / tau
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / tau
    log_p = F.log_softmax(t, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return tau * tau * kl.mean()


def _gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da GELU(a) for the exact (erf) GELU: Φ(a) + a·φ(a)."""
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + a * pdf


class _FusedStudent(torch.autograd.Function):
    """z = W h + W2·GELU(W1 h + b1) + b2 computed once, returned twice: for the task and for L_KD.

    Backward: router parameters get ``task_scale``·(task gradient) + (KD gradient); the hidden
    states get the task gradient only, exactly as if L_KD had been computed on ``h.detach()``.
    Saves the second student forward that a separate detached KD path would cost.
    """

    @staticmethod
    def forward(ctx, h, w, w1, b1, w2, b2, task_scale):
        a = F.linear(h, w1, b1)
        g = F.gelu(a)
        z = F.linear(h, w) + F.linear(g, w2, b2)
        ctx.save_for_backward(h, w, w1, w2, a, g)
        ctx.task_scale = task_scale
        return z, z.detach().clone()

    @staticmethod
    def backward(ctx, dz_task, dz_kd):
        h, w, w1, w2, a, g = ctx.saved_tensors
        if dz_task is None:
            dz_task = torch.zeros_like(dz_kd)
        dz_p = dz_task * ctx.task_scale
        if dz_kd is not None:
            dz_p = dz_p + dz_kd
        gelu_grad = _gelu_grad(a)
        da_p = (dz_p @ w2) * gelu_grad
        dh = dz_task @ w + ((dz_task @ w2) * gelu_grad) @ w1
        return (dh, dz_p.t() @ h, da_p.t() @ h, da_p.sum(0), dz_p.t() @ g, dz_p.sum(0), None)


class AdaptiveRouter(nn.Module):
    """The ALR residual MLP and the frozen teacher weight of one MoE layer.

    Lives on the decoder layer (not inside the MoE block, which AutoEP replaces), so its
    parameters exist and are trainable when the optimizer is built. NOTE: no parameter name
    here contains "expert": DeepSpeed's non-expert checkpoint filters on that word.

    Args:
        router_weight: the pretrained router weight [E, d_model]; copied as the frozen teacher.
        hidden: width of the residual MLP (METHOD default 4·d_model).
    """

    def __init__(self, *, router_weight: torch.Tensor, hidden: int, seed: int):
        super().__init__()
        num_routes, d_model = router_weight.shape
        self.teacher_weight = nn.Parameter(router_weight.detach().clone().float(), requires_grad=False)
        self.w1 = nn.Parameter(torch.empty(hidden, d_model))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(num_routes, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_routes))
        gen = torch.Generator().manual_seed(seed)
        bound = math.sqrt(6.0 / d_model)  # Kaiming-uniform for GELU ~ ReLU gain, fan_in = d_model
        with torch.no_grad():
            self.w1.uniform_(-bound, bound, generator=gen)

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """W2 · GELU(W1 h + b1) + b2: [T, d_model] -> [T, E]."""
        return F.linear(F.gelu(F.linear(h, self.w1, self.b1)), self.w2, self.b2)

    def teacher_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.teacher_weight).to(h.dtype)

    def student_logits_task_and_kd(self, h: torch.Tensor, router_weight: torch.Tensor, *, task_scale: float):
        """(z for the task, z for L_KD), one computation: router parameters receive task_scale x the task
        gradient plus the KD gradient; ``h`` receives the task gradient only. h: [T, d_model]."""
        return _FusedStudent.apply(h, router_weight, self.w1, self.b1, self.w2, self.b2, task_scale)

    def student_logits(self, h: torch.Tensor, router_weight: torch.Tensor, *, param_grad_scale: float = 1.0):
        """z_adapt with the router parameters' gradient scaled by ``param_grad_scale`` (hidden states unscaled)."""
        w = scale_grad(router_weight, param_grad_scale)
        w1, b1 = scale_grad(self.w1, param_grad_scale), scale_grad(self.b1, param_grad_scale)
        w2, b2 = scale_grad(self.w2, param_grad_scale), scale_grad(self.b2, param_grad_scale)
        return F.linear(h, w) + F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
