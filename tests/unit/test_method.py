"""desmoe.method without DeepSpeed: what each phase trains in each mode (optimizer groups, LR factors,
gradients, expert rows), the λ schedule, affinity records, and full fine-tuning's do-nothing method.

Expert rows are plain fused tensors wrapped in ExpertParam as ``attach`` would make them (AutoEP's
layers are not built here); the rest is the real DesMoE on a tiny HF model.
"""

import pytest
import torch

from desmoe.config import config_from_dict
from desmoe.constants import ESFT_MODES, METHOD_MODES, METHOD_STATE_MODES
from desmoe.esft import expert_scores
from desmoe.isolation import ExpertParam
from desmoe.method import DesMoE, FullFineTuning, LoRA, build_method
from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices
from desmoe.routing.affinity import AffinityCounts, DomainAffinity
from desmoe.routing.alr import kd_lambda
from desmoe.schedule import (BACKBONE, BACKBONE_WARMUP_TRAINABLE, CONSOLIDATION, ESFT, EXPERTS, ROUTER,
                             SHARED_EXPERTS, STABILIZATION, WARMUP)

T = 10  # max_steps: warm-up 1-2, stabilization 3-7, consolidation 8-10
DOMAINS = ["A", "B"]


def make(mode="desmoe", model_type="qwen3_moe", **method):
    cfg = config_from_dict({"model": {"tiny": {"model_type": model_type}}, "train": {"max_steps": T},
                            "method": {"mode": mode, **method}})
    model = build_tiny_model(cfg.model.tiny, seed=0)
    return cfg, model, build_method(cfg, model, FAMILIES[model_type], list(DOMAINS))


def groups_by_name(method, model):
    return {g["name"]: g["params"] for g in method.param_groups(model)}


def factors(method, step, parts=(BACKBONE, ROUTER, SHARED_EXPERTS)):
    """LR factor of each named group, and of an AutoEP routed-expert group (``moe`` set), at ``step``."""
    out = {p: method.lr_factor({"name": p}, step) for p in parts}
    out[EXPERTS] = method.lr_factor({"name": "ep_size_1_moe_params", "moe": True}, step)
    return out


# ---- build_method and full fine-tuning --------------------------------------------------


@pytest.mark.parametrize("mode", METHOD_MODES)
def test_build_method_chooses_by_mode(mode):
    cfg, model, method = make(mode)
    if mode in METHOD_STATE_MODES:
        assert type(method) is DesMoE
        assert method.moe_layers == moe_layer_indices(model.config) == [0, 1]
        assert method.esft == (mode in ESFT_MODES) and method.family is FAMILIES["qwen3_moe"]
        has_alr = mode in ("desmoe", "desmoe_no_dges")
        assert method.use_alr == has_alr
        assert all(hasattr(layer, "adaptive_router") == has_alr for layer in model.model.layers)
    else:
        assert type(method) is (LoRA if mode == "lora" else FullFineTuning)
        assert not any(hasattr(layer, "adaptive_router") for layer in model.model.layers)
        assert any(".lora_A." in n for n, _ in model.named_parameters()) == (mode == "lora")
    assert method.domains == DOMAINS


def test_full_fine_tuning_does_nothing():
    _, model, method = make("fft")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert method.moe_layers == [] and method.esft is False and method.masks is None
    assert method.param_groups(model) is None and method.lr_factor is None
    method.attach(object())
    for step in (1, 2):
        method.begin_step(step)
        method.begin_micro_batch("A", torch.ones(2, 4, dtype=torch.bool))
        assert method.aux_loss() is None and method.last_kd() is None
        method.before_optimizer_step()
        method.after_optimizer_step()
        assert method.end_step(step) == []
    assert method.metrics() == {"phase": "full", "lambda": 0.0}
    assert method.state_dict() is None
    method.load_state_dict(None)
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())


def test_desmoe_defaults_its_family_from_the_model():
    cfg = config_from_dict({"model": {"tiny": {"model_type": "mixtral"}}, "method": {"mode": "desmoe"}})
    model = build_tiny_model(cfg.model.tiny, seed=0)
    method = DesMoE(cfg, model, moe_layer_indices(model.config), DOMAINS)
    assert method.family is FAMILIES["mixtral"]
    assert method.moe_layers == [0, 1] and hasattr(model.model.layers[1], "adaptive_router")


# ---- optimizer groups -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["desmoe", "desmoe_no_alr", "esft_gate"])
def test_param_groups_router_alr_and_backbone(mode):
    _, model, method = make(mode)
    groups = groups_by_name(method, model)
    assert list(groups) == [BACKBONE, ROUTER]  # no shared experts in Qwen3-MoE
    expected_router = []
    for i in method.moe_layers:
        layer = model.model.layers[i]
        expected_router.append(layer.mlp.gate.weight)
        if method.use_alr:
            alr = layer.adaptive_router
            expected_router += [alr.w1, alr.b1, alr.w2, alr.b2]  # not the frozen teacher
    assert [id(p) for p in groups[ROUTER]] == [id(p) for p in expected_router]
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(trainable)  # every trainable parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("adaptive_router" not in names[id(p)] and ".gate.weight" not in names[id(p)]
               for p in groups[BACKBONE])
    assert any(".mlp.experts." in names[id(p)] for p in groups[BACKBONE])  # AutoEP takes them out later
    assert not any(n.endswith("teacher_weight") for n in map(names.get, ids))


@pytest.mark.parametrize("model_type,marks", [("qwen2_moe", (".shared_expert.", ".shared_expert_gate.")),
                                              ("deepseek_v2", (".shared_experts.", ))])
def test_param_groups_shared_experts_have_their_own_group(model_type, marks):
    _, model, method = make("desmoe", model_type)
    groups = groups_by_name(method, model)
    assert list(groups) == [BACKBONE, ROUTER, SHARED_EXPERTS]
    names = {id(p): n for n, p in model.named_parameters()}
    shared = sorted(names[id(p)] for p in groups[SHARED_EXPERTS])
    want = sorted(n for n, _ in model.named_parameters() if any(m in n for m in marks))
    assert shared == want and shared
    assert not any(".shared_expert" in names[id(p)] for p in groups[BACKBONE] + groups[ROUTER])
    assert len(groups[ROUTER]) == 5 * len(method.moe_layers)
    if model_type == "deepseek_v2":  # layer 0 is dense: its MLP is backbone, not a router or expert
        assert any(names[id(p)].startswith("model.layers.0.mlp.") for p in groups[BACKBONE])


# ---- LR factors per phase ---------------------------------------------------------------


def test_lr_factors_follow_the_papers_table():
    _, _, method = make("desmoe")
    for step in range(1, T + 1):
        assert method.phase_of_step(step) == (WARMUP if step <= 2 else STABILIZATION if step <= 7 else CONSOLIDATION)
    assert factors(method, 1) == factors(method, 2) == {BACKBONE: 0.0, ROUTER: 1.0, SHARED_EXPERTS: 1.0,
                                                        EXPERTS: 1.0}
    assert factors(method, 3) == factors(method, 7) == {BACKBONE: 0.0, ROUTER: 1.0, SHARED_EXPERTS: 0.0,
                                                        EXPERTS: 1.0}
    assert factors(method, 8) == factors(method, 10) == {BACKBONE: 0.0, ROUTER: 0.0, SHARED_EXPERTS: 0.0,
                                                         EXPERTS: 1.0}
    assert method.lr_factor({"params": []}, 1) == 0.0  # an unnamed group is backbone


@pytest.mark.parametrize("mode", ["desmoe_no_alr", "desmoe_no_dges"])
def test_ablations_keep_the_table(mode):
    _, _, desmoe = make("desmoe")
    _, _, method = make(mode)
    assert all(factors(method, s) == factors(desmoe, s) for s in range(1, T + 1))


@pytest.mark.parametrize("mode", ESFT_MODES)
def test_esft_trains_only_the_selected_experts_in_every_step(mode):
    _, _, method = make(mode)
    assert method.phase == ESFT and method.lam == 0.0
    for step in (1, 5, T):
        assert method.phase_of_step(step) == ESFT
        assert factors(method, step) == {BACKBONE: 0.0, ROUTER: 0.0, SHARED_EXPERTS: 0.0, EXPERTS: 1.0}


def test_old_schedule_knobs_backbone_warmup_and_lr_scale():
    _, _, method = make("desmoe", phase_trainable={k: list(v) for k, v in BACKBONE_WARMUP_TRAINABLE.items()},
                        backbone_lr_scale=0.1, shared_experts="never")
    assert factors(method, 2) == {BACKBONE: 0.1, ROUTER: 1.0, SHARED_EXPERTS: 0.0, EXPERTS: 0.0}
    assert factors(method, 3) == {BACKBONE: 0.0, ROUTER: 1.0, SHARED_EXPERTS: 0.0, EXPERTS: 1.0}
    assert factors(method, 9) == {BACKBONE: 0.0, ROUTER: 0.0, SHARED_EXPERTS: 0.0, EXPERTS: 1.0}
    _, _, always = make("desmoe", shared_experts="always", warmup_end=0.5, stabilization_end=0.8)
    assert [always.phase_of_step(s) for s in (5, 6, 8, 9)] == [WARMUP, STABILIZATION, STABILIZATION, CONSOLIDATION]
    assert all(factors(always, s)[SHARED_EXPERTS] == 1.0 for s in range(1, T + 1))


# ---- the loop without an engine: λ, gradients a phase computes, expert rows ------------------------------


def fake_attach(method, num_experts=8, ep_rank=0, num_local=4):
    """What attach sets, on plain tensors: two layers of fused experts and one parameter of each other part."""
    method.num_experts = num_experts
    method.expert_params = [ExpertParam(li, name, torch.nn.Parameter(torch.zeros(num_local, 3, 2)), ep_rank, num_local)
                            for li in range(len(method.moe_layers)) for name in ("w1", "w2")]
    method.parts_params = {EXPERTS: [ep.param for ep in method.expert_params]}
    for part in (ROUTER, SHARED_EXPERTS, BACKBONE):
        method.parts_params[part] = [torch.nn.Parameter(torch.zeros(2))]
    m = method.cfg.method
    method.affinity = DomainAffinity(len(method.moe_layers), len(method.domains), num_experts, beta=m.affinity_beta,
                                     selection=m.selection, phi=m.phi, p=m.selection_p)


def test_lambda_follows_alpha_and_is_zero_where_the_router_is_frozen():
    _, _, method = make("desmoe", kd_alpha_end=0.5)
    fake_attach(method)
    method.affinity.estimate = torch.zeros(2, 2, 8)  # an estimate exists: no affinity update at the warm-up's end
    assert method.lam == 1.0
    lams = []
    for step in range(1, T + 1):
        method.begin_step(step)
        lams.append(method.lam)
        assert method.metrics() == {"phase": method.phase_of_step(step), "lambda": method.lam}
    assert lams == [kd_lambda((s - 1) / T, 0.5) for s in range(1, 8)] + [0.0] * 3
    assert lams[:3] == [1.0, 0.8, 0.6] and lams[5] == 0.0
    _, _, no_alr = make("desmoe_no_alr")
    fake_attach(no_alr)
    no_alr.affinity.estimate = torch.zeros(2, 2, 8)
    for step in (1, 4):
        no_alr.begin_step(step)
        assert no_alr.lam == 0.0 and no_alr.aux_loss() is None and no_alr.last_kd() is None


def test_begin_step_computes_only_the_gradients_the_phase_trains():
    _, _, method = make("desmoe", model_type="qwen2_moe")
    fake_attach(method)
    method.affinity.estimate = torch.zeros(2, 2, 8)

    def trained(step):
        method.begin_step(step)
        return {part: all(p.requires_grad for p in ps) for part, ps in method.parts_params.items()
                if all(p.requires_grad for p in ps) or not any(p.requires_grad for p in ps)}

    assert trained(1) == {EXPERTS: True, ROUTER: True, SHARED_EXPERTS: True, BACKBONE: False}
    assert trained(5) == {EXPERTS: True, ROUTER: True, SHARED_EXPERTS: False, BACKBONE: False}
    assert trained(9) == {EXPERTS: True, ROUTER: False, SHARED_EXPERTS: False, BACKBONE: False}
    _, _, keep_all = make("desmoe", skip_frozen_grads=False)
    fake_attach(keep_all)
    keep_all.affinity.estimate = torch.zeros(2, 2, 8)
    keep_all.begin_step(9)
    assert all(p.requires_grad for ps in keep_all.parts_params.values() for p in ps)


def _masks():
    m = torch.zeros(2, 2, 8, dtype=torch.bool)
    m[:, 0, [0, 1, 5]] = True  # domain A
    m[:, 1, [1, 4, 6, 7]] = True  # domain B
    return m


def _kept(method):
    return {ep.layer: ep.keep.bool().tolist() for ep in method.expert_params}


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_expert_rows_each_phase_trains_per_domain(ep_rank):
    _, _, method = make("desmoe")
    fake_attach(method, ep_rank=ep_rank)
    method.affinity.estimate, method.masks = torch.zeros(2, 2, 8), _masks()
    local = slice(4 * ep_rank, 4 * ep_rank + 4)
    method.begin_step(1)  # warm-up: every routed expert on every domain's tokens
    method.begin_micro_batch("A")
    assert _kept(method) == {0: [True] * 4, 1: [True] * 4} and not any(r.any() for r in method._frozen.values())
    for step in (3, 8):  # stabilization and consolidation: the domain's selected experts only
        method.begin_step(step)
        method.begin_micro_batch("A")
        assert _kept(method) == {li: _masks()[li, 0, local].tolist() for li in (0, 1)}
        method.begin_micro_batch("B")
        assert _kept(method) == {li: _masks()[li, 1, local].tolist() for li in (0, 1)}
        # a row is frozen for the step only if no micro-batch's domain selected it
        assert {li: r.tolist() for li, r in method._frozen.items()} == {
            li: (~(_masks()[li, 0] | _masks()[li, 1]))[local].tolist() for li in (0, 1)}


def test_without_dges_or_masks_nothing_is_isolated_and_frozen_experts_keep_no_row():
    _, _, no_dges = make("desmoe_no_dges")
    fake_attach(no_dges)
    no_dges.affinity.estimate, no_dges.masks = torch.zeros(2, 2, 8), _masks()
    no_dges.begin_step(5)
    no_dges.begin_micro_batch("B")
    assert _kept(no_dges) == {0: [True] * 4, 1: [True] * 4}
    _, _, method = make("desmoe", phase_trainable={k: list(v) for k, v in BACKBONE_WARMUP_TRAINABLE.items()})
    fake_attach(method)
    method.begin_step(1)  # warm-up trains the backbone: no routed expert row gets a gradient
    method.begin_micro_batch("A", torch.tensor([[True, True, False]]))
    assert _kept(method) == {0: [False] * 4, 1: [False] * 4}
    assert method.real_tokens.tolist() == [True, True, False] and method.training_forward
    method.begin_micro_batch("A", torch.ones(1, 3, dtype=torch.bool))
    assert method.real_tokens is None  # nothing is padding


def test_end_step_returns_this_steps_affinity_records():
    _, _, method = make("desmoe", affinity_update_every=3, skip_frozen_grads=False)
    fake_attach(method)
    selected = torch.tensor([[0, 1], [0, 5], [1, 5]])
    for step in (1, 2):
        method.begin_step(step)
        for li in (0, 1):
            method.affinity.counts.add(li, selected, torch.tensor([0, 0, 1]))
        assert method.end_step(step) == []
    method.begin_step(3)  # warm-up -> stabilization: the first estimate, recorded as step 2
    assert method.masks is not None and [r["step"] for r in method.history] == [2]
    for li in (0, 1):
        method.affinity.counts.add(li, selected, torch.tensor([0, 0, 1]))  # the same routing: the masks stay
    records = method.end_step(3)  # and the T_update = 3 update of step 3
    assert [r["step"] for r in records] == [2, 3] and records == method.history
    assert set(records[0]) == {"step", "domains", "layers", "affinity", "masks"}
    assert records[0]["domains"] == DOMAINS and records[0]["layers"] == [0, 1]
    assert records[1]["affinity"][0][0] == [1.0, 0.5, 0, 0, 0, 0.5, 0, 0]  # domain A: 2 tokens
    assert records[1]["masks"][0][1] == [0, 1, 0, 0, 0, 1, 0, 0]  # domain B: experts 1 and 5
    assert method.affinity.counts.hits.sum() == 0 and method.affinity.counts.tokens.sum() == 0  # a new window
    method.begin_step(4)
    assert method.end_step(4) == []


def test_esft_end_step_never_updates_affinity():
    _, _, method = make("esft_token", affinity_update_every=1, skip_frozen_grads=False)
    fake_attach(method)
    for step in (1, 2):
        method.begin_step(step)
        assert method.end_step(step) == [] and method.history == []


def test_esft_scores_token_ratio_and_gate_score():
    counts, gates = AffinityCounts(1, 2, 4), AffinityCounts(1, 2, 4)
    sel = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 2]])
    dom = torch.tensor([0, 0, 0, 1])
    counts.add(0, sel, dom)
    gates.add(0, sel, dom, weights=torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]]))
    ratio, p = expert_scores(counts, gates, "esft_token", None)
    assert p == 0.2
    assert torch.allclose(ratio[0, 0], torch.tensor([3, 2, 1, 0], dtype=torch.float64) / 6)  # share / K
    gate, p = expert_scores(counts, gates, "esft_gate", 0.3)
    assert p == 0.3
    assert torch.allclose(gate[0, 0], torch.tensor([2.0, 0.9, 0.1, 0.0], dtype=torch.float64) / 3)
    assert torch.allclose(gate[0, 1], torch.tensor([0.0, 0.0, 0.3, 0.7], dtype=torch.float64))
    assert expert_scores(counts, gates, "esft_gate", None)[1] == 0.1
