import math

import pytest
import torch
import torch.nn.functional as F

from desmoe.routing.alr import AdaptiveRouter, kd_lambda, kd_loss, scale_grad


def _router(d=6, e=4, hidden=24, seed=0):
    w = torch.randn(e, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(w.clone()), AdaptiveRouter(router_weight=w, hidden=hidden, seed=seed)


def test_student_equals_teacher_at_step_zero():
    w, alr = _router()
    h = torch.randn(10, 6)
    assert torch.equal(alr.student_logits(h, w), F.linear(h, w))
    assert torch.equal(alr.teacher_logits(h), F.linear(h, w))
    assert not alr.teacher_weight.requires_grad


def test_kd_loss_matches_hand_computation():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    tau = 0.7
    total = 0.0
    for row_t, row_s in zip(t.tolist(), s.tolist()):
        zp = sum(math.exp(v / tau) for v in row_t)
        zq = sum(math.exp(v / tau) for v in row_s)
        p = [math.exp(v / tau) / zp for v in row_t]
        q = [math.exp(v / tau) / zq for v in row_s]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = tau * tau * total / 2
    assert kd_loss(t, s, tau).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("alpha,expected", [(0.0, 1.0), (0.35, 0.5), (0.7, 0.0), (0.9, 0.0)])
def test_lambda_schedule(alpha, expected):
    assert kd_lambda(alpha, 0.7) == pytest.approx(expected)


@pytest.mark.parametrize("alpha,expected", [(0.0, 1.0), (0.35, 0.65), (0.7, 0.3), (1.0, 0.0)])
def test_lambda_default_is_the_papers_one_minus_alpha(alpha, expected):
    from desmoe.config import MethodSection

    assert kd_lambda(alpha, MethodSection().kd_alpha_end) == pytest.approx(expected)


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.25))


def test_router_gets_mixed_gradient_and_backbone_task_gradient_only():
    """Router params: ∇(λ·L_KD + (1−λ)·L_task); backbone: ∇L_task. Checked against autograd on separate losses."""
    torch.manual_seed(0)
    d, e, tau, lam = 6, 4, 0.7, 0.3
    backbone = torch.nn.Parameter(torch.randn(d, d))
    w, alr = _router(d, e)
    with torch.no_grad():  # leave step 0 so the residual MLP matters
        alr.w2.normal_()
        alr.b2.normal_()
    x = torch.randn(12, d)
    target = torch.randint(0, e, (12,))
    router_params = [w, alr.w1, alr.b1, alr.w2, alr.b2]

    def task_loss(logits, h):  # depends on the router's logits and directly on the hidden states
        return F.cross_entropy(logits, target) + (h ** 2).mean()

    # what desmoe computes: one backward of the combined objective
    h = x @ backbone
    z = alr.student_logits(h, w, param_grad_scale=1 - lam)
    hd = h.detach()
    combined = task_loss(z, h) + lam * kd_loss(alr.teacher_logits(hd), alr.student_logits(hd, w), tau)
    got = torch.autograd.grad(combined, router_params + [backbone])

    # reference: gradients of the separate objectives
    h = x @ backbone
    z = alr.student_logits(h, w)
    l_task = task_loss(z, h)
    l_kd = kd_loss(alr.teacher_logits(h), alr.student_logits(h, w), tau)
    g_task = torch.autograd.grad(l_task, router_params + [backbone], retain_graph=True)
    g_kd = torch.autograd.grad(l_kd, router_params, allow_unused=True)
    for i in range(len(router_params)):
        want = (1 - lam) * g_task[i] + lam * g_kd[i]
        assert torch.allclose(got[i], want, atol=1e-6), i
    assert torch.allclose(got[-1], g_task[-1], atol=1e-6)  # backbone: task gradient only


def test_fused_task_and_kd_path_matches_the_two_separate_paths():
    torch.manual_seed(1)
    d, e, tau, lam = 6, 4, 0.7, 0.4
    backbone = torch.nn.Parameter(torch.randn(d, d))
    w, alr = _router(d, e)
    with torch.no_grad():
        alr.w2.normal_()
        alr.b2.normal_()
    x = torch.randn(9, d)
    target = torch.randint(0, e, (9,))
    params = [w, alr.w1, alr.b1, alr.w2, alr.b2, backbone]

    def objective(fused):
        h = x @ backbone
        if fused:
            z, zk = alr.student_logits_task_and_kd(h, w, task_scale=1 - lam)
        else:
            z, zk = alr.student_logits(h, w, param_grad_scale=1 - lam), alr.student_logits(h.detach(), w)
        assert torch.allclose(z, zk)
        teacher = alr.teacher_logits(h.detach())
        return F.cross_entropy(z, target) + (h ** 2).mean() + lam * kd_loss(teacher, zk, tau)

    got = torch.autograd.grad(objective(True), params)
    want = torch.autograd.grad(objective(False), params)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, atol=1e-6)
