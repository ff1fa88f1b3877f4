"""desmoe.optim.MaskedAdamW: torch's AdamW element for element, frozen ranges and LR-0 groups untouched."""

import torch

from desmoe.optim import MaskedAdamW, trainable_ranges


def _pair(n=12, **kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    q = torch.nn.Parameter(p.detach().clone())
    return p, torch.optim.AdamW([p], **kw), q, MaskedAdamW([q], **kw)


def _step(opt, param, grad):
    param.grad = grad.clone()
    opt.step()


def test_without_masks_it_is_torch_adamw_bit_for_bit():
    p, ref, q, opt = _pair(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    for _ in range(5):
        g = torch.randn(12)
        _step(ref, p, g)
        _step(opt, q, g)
    assert torch.equal(p, q)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(ref.state[p][k], opt.state[q][k])


def test_frozen_ranges_do_not_move_and_the_rest_is_adamw():
    p, ref, q, opt = _pair(lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(12)
        _step(ref, p, g)
        _step(opt, q, g)
    before = {k: opt.state[q][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    w_before = q.detach().clone()
    g = torch.randn(12)
    opt.frozen_ranges[id(q)] = [(2, 5), (8, 9)]
    _step(opt, q, g)
    _step(ref, p, g)
    frozen = torch.zeros(12, dtype=torch.bool)
    frozen[2:5] = frozen[8:9] = True
    assert torch.equal(q[frozen], w_before[frozen])  # no weight decay, no momentum drift
    for k in before:
        assert torch.equal(opt.state[q][k][frozen], before[k][frozen])
        assert torch.equal(opt.state[q][k][~frozen], ref.state[p][k][~frozen])
    assert torch.equal(q[~frozen], p[~frozen])  # same bias correction: one step for the whole tensor
    assert opt.state[q]["step"].item() == 4


def test_a_group_with_lr_zero_is_skipped_entirely():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = MaskedAdamW([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.1}], weight_decay=0.5)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert torch.equal(a, torch.ones(4)) and a not in opt.state  # no arithmetic, no state
    assert not torch.equal(b, torch.ones(4))


def test_trainable_ranges_are_the_complement():
    assert trainable_ranges([(2, 5), (5, 7)], 10) == [(0, 2), (7, 10)]
    assert trainable_ranges([], 4) == [(0, 4)] and trainable_ranges([(0, 4)], 4) == []
