"""desmoe.isolation on plain tensors: which rows a rank holds, and the RowGuard around a real optimizer step.

The guard is handed what DeepSpeed ZeRO 1/2 gives it: a wrapper with the inner optimizer (over the flat
fp32 partition) and ``single_partition_of_fp32_groups``, and ``param._hp_mapping`` locating the part of
a fused expert tensor [E, out, in] this rank owns in that partition. After the inner step the wrapper
copies the partition back into the model weights, as ZeRO does.
"""

from types import SimpleNamespace

import pytest
import torch

from desmoe.isolation import ExpertParam, RowGuard
from desmoe.optim import MaskedAdamW

E, OUT, IN = 4, 3, 5
ROW = OUT * IN


def test_local_rows_are_the_ranks_slice_of_a_global_mask():
    global_mask = torch.tensor([True, False, True, True, False, False, True, False])
    for num_local in (1, 2, 4, 8):
        for ep_rank in range(8 // num_local):
            ep = ExpertParam(0, "w", torch.zeros(num_local, 2), ep_rank, num_local)
            got = ep.local_rows(global_mask)
            assert got.shape == (num_local, )
            assert got.tolist() == global_mask[ep_rank * num_local:(ep_rank + 1) * num_local].tolist()
    assert ExpertParam(0, "w", torch.zeros(2, 6), 3, 2).local_rows(global_mask).tolist() == [True, False]


def test_gradient_hook_zeroes_only_the_rows_not_kept():
    p = torch.nn.Parameter(torch.zeros(E, OUT, IN))
    ep = ExpertParam(0, "w", p, 0, E)
    p.register_hook(ep.hook)
    ep.set_keep(torch.tensor([True, False, True, False]))
    (p * torch.arange(1.0, E * ROW + 1).view(E, OUT, IN)).sum().backward()
    assert p.grad[[1, 3]].abs().sum() == 0 and bool((p.grad[[0, 2]] != 0).all())
    ep.set_keep(torch.ones(E, dtype=torch.bool))
    assert ep.all_kept


class FakeZero:
    """What RowGuard reads of DeepSpeedZeroOptimizer: ``optimizer`` and ``single_partition_of_fp32_groups``."""

    def __init__(self, weight: torch.Tensor, optimizer_cls, *, lp_start: int = 0, lp_numel: int | None = None,
                 hp_start: int = 0, extra: int = 0):
        lp_numel = weight.numel() - lp_start if lp_numel is None else lp_numel
        self.weight, self.lp_start, self.lp_numel, self.hp_start = weight, lp_start, lp_numel, hp_start
        # this rank's flat fp32 partition: ``hp_start`` elements of other parameters, then the owned part
        head = torch.randn(hp_start, generator=torch.Generator().manual_seed(1))
        tail = torch.randn(extra, generator=torch.Generator().manual_seed(2))
        self.flat = torch.nn.Parameter(torch.cat([head, weight.detach().view(-1)[lp_start:lp_start + lp_numel], tail]))
        self.single_partition_of_fp32_groups = [self.flat]
        self.optimizer = optimizer_cls([self.flat], lr=0.1, weight_decay=0.5)
        weight._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=lp_start, numel=lp_numel),
                                             hp_fragment_address=SimpleNamespace(start=hp_start), param_group_index=0)

    def owned(self) -> slice:
        return slice(self.hp_start, self.hp_start + self.lp_numel)

    def step(self, seed: int) -> None:
        self.flat.grad = torch.randn(self.flat.shape, generator=torch.Generator().manual_seed(seed))
        self.optimizer.step()
        with torch.no_grad():  # ZeRO: the updated fp32 partition back into the model weights
            self.weight.view(-1)[self.lp_start:self.lp_start + self.lp_numel] = self.flat[self.owned()]


def _expert(seed: int = 0) -> tuple[torch.nn.Parameter, ExpertParam]:
    w = torch.nn.Parameter(torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(seed)))
    return w, ExpertParam(0, "w1", w, ep_rank=0, num_local=E)


def _rows_of_flat(zero: FakeZero, t: torch.Tensor) -> torch.Tensor:
    """[E, ROW] view of the owned fragment of a flat-shaped tensor (whole fragment = whole weight)."""
    return t[zero.owned()].view(E, ROW)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, MaskedAdamW])
def test_guarded_rows_are_bit_identical_after_a_step_with_weight_decay(optimizer_cls):
    w, ep = _expert()
    zero = FakeZero(w, optimizer_cls, hp_start=7, extra=3)
    guard = RowGuard(zero)
    assert guard.masked == (optimizer_cls is MaskedAdamW)
    zero.step(seed=10)  # Adam moments exist and are non-zero before the guarded step
    frozen = torch.tensor([False, True, False, True])
    weights = w.detach().clone()
    flat = zero.flat.detach().clone()
    state = {k: v.clone() for k, v in zero.optimizer.state[zero.flat].items() if k != "step"}
    guard.save([ep], {0: frozen})
    zero.step(seed=11)
    guard.restore()
    assert torch.equal(w[frozen], weights[frozen])
    assert bool((w[~frozen] != weights[~frozen]).all())  # decay + Adam move every other element
    assert torch.equal(_rows_of_flat(zero, zero.flat.detach())[frozen], _rows_of_flat(zero, flat)[frozen])
    for k in ("exp_avg", "exp_avg_sq"):
        now = zero.optimizer.state[zero.flat][k]
        assert torch.equal(_rows_of_flat(zero, now)[frozen], _rows_of_flat(zero, state[k])[frozen])
        assert bool((_rows_of_flat(zero, now)[~frozen] != _rows_of_flat(zero, state[k])[~frozen]).all())
    # the parts of the partition that are not this expert (other parameters) trained normally
    assert bool((zero.flat.detach()[:7] != flat[:7]).all()) and bool((zero.flat.detach()[-3:] != flat[-3:]).all())
    if guard.masked:
        assert zero.optimizer.frozen_ranges == {}  # handed back after the step


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, MaskedAdamW])
def test_a_partial_fragment_guards_only_the_owned_part_of_each_row(optimizer_cls):
    # this rank owns the end of row 0, all of rows 1 and 2, and the start of row 3
    w, ep = _expert(seed=3)
    lp_start, lp_numel = ROW - 4, 2 * ROW + 6
    zero = FakeZero(w, optimizer_cls, lp_start=lp_start, lp_numel=lp_numel, hp_start=2)
    guard = RowGuard(zero)
    zero.step(seed=20)
    before = w.detach().clone().view(-1)
    frozen = torch.tensor([True, False, False, True])
    guard.save([ep], {0: frozen})
    zero.step(seed=21)
    guard.restore()
    after = w.detach().view(-1)
    owned = torch.zeros(E * ROW, dtype=torch.bool)
    owned[lp_start:lp_start + lp_numel] = True
    frozen_elems = frozen.repeat_interleave(ROW)
    assert torch.equal(after[frozen_elems], before[frozen_elems])
    assert bool((after[owned & ~frozen_elems] != before[owned & ~frozen_elems]).all())
    assert guard._flat_ranges(ep, (0, 3)) == [(2, 6), (2 + 4 + 2 * ROW, 2 + lp_numel)]


def test_nothing_frozen_is_a_plain_step():
    w, ep = _expert(seed=4)
    zero = FakeZero(w, torch.optim.AdamW)
    ref = FakeZero(w.detach().clone(), torch.optim.AdamW)
    guard = RowGuard(zero)
    guard.save([ep], {0: torch.zeros(E, dtype=torch.bool)})
    zero.step(seed=30)
    guard.restore()
    ref.step(seed=30)
    assert guard.saved == [] and torch.equal(zero.flat, ref.flat)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, MaskedAdamW])
def test_clear_moments_zeroes_exactly_the_given_rows(optimizer_cls):
    w, ep = _expert(seed=5)
    zero = FakeZero(w, optimizer_cls, hp_start=4, extra=2)
    zero.step(seed=40)
    zero.step(seed=41)
    state = zero.optimizer.state[zero.flat]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    rows = torch.tensor([True, False, False, True])
    RowGuard(zero).clear_moments([ep], {0: rows})
    for k, old in before.items():
        now = state[k]
        assert bool((_rows_of_flat(zero, now)[rows] == 0).all())
        assert torch.equal(_rows_of_flat(zero, now)[~rows], _rows_of_flat(zero, old)[~rows])
        assert torch.equal(now[:4], old[:4]) and torch.equal(now[-2:], old[-2:])
        assert bool((_rows_of_flat(zero, old)[rows] != 0).all())
    RowGuard(zero).clear_moments([ep], {1: rows})  # another layer's rows: nothing of this one
    assert bool((_rows_of_flat(zero, state["exp_avg"])[~rows] != 0).all())
