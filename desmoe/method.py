"""The fine-tuning method of a run, driven by the recipe's loop (desmoe/train.py) with no hidden callbacks.

``build_method`` gives DES-MoE (and its ablations, and the ESFT baselines: ``DesMoE``) or full
fine-tuning (``FullFineTuning``, which does nothing); both have one interface, called unconditionally:

    method = build_method(cfg, model, family, domains)  # before deepspeed.initialize: ALR modules
    engine = build_engine(model, ..., param_groups=method.param_groups(model), lr_factor=method.lr_factor)
    method.attach(engine)                         # after: hooks on AutoEP routers and experts
    (ESFT: desmoe.esft.profile(method, ...) selects the experts once, before training)
    for each optimizer step:
        method.begin_step(step)
        for each micro-batch:
            method.begin_micro_batch(domain, real_tokens); loss = task + method.aux_loss(); backward
            method.before_optimizer_step() / engine.step() / method.after_optimizer_step()  (at the boundary)
        records = method.end_step(step)           # affinity updates of this step (every T_update steps)

What each phase trains comes from one table (desmoe.schedule): it sets the optimizer groups' LR
factors, the weight gradients computed at all, and whether routed experts are isolated per domain.
"""

from __future__ import annotations

import torch
from torch import nn

from desmoe import dist, lora
from desmoe.constants import ESFT_MODES, LORA_MODE, METHOD_STATE_MODES
from desmoe.engine import autoep_layers
from desmoe.isolation import ExpertParam, RowGuard, TokenMasker
from desmoe.models import Family, get_family, moe_layer_indices
from desmoe.routing.affinity import DomainAffinity
from desmoe.routing.alr import AdaptiveRouter, kd_lambda, kd_loss
from desmoe.schedule import (BACKBONE, ESFT, EXPERTS, ROUTER, SHARED_EXPERT_MARK, SHARED_EXPERTS, WARMUP,
                             experts_train, isolates, lr_factor, part_of, phase_at, trainable_table, trains)


def build_method(cfg, model: nn.Module, family: Family, domains: list[str]):
    """The method object of ``cfg.method.mode``: DesMoE for the modes with per-expert state, else
    FullFineTuning. Call before ``deepspeed.initialize`` (DesMoE adds the adaptive routers to ``model``)."""
    if cfg.method.mode in METHOD_STATE_MODES:
        return DesMoE(cfg, model, moe_layer_indices(model.config, family), domains, family=family)
    if cfg.method.mode == LORA_MODE:
        return LoRA(cfg, model, family, domains)
    return FullFineTuning(domains)


class FullFineTuning:
    """Full fine-tuning: every parameter trains with DeepSpeed's own optimizer; every hook is a no-op."""

    esft = False
    masks = None
    lr_factor = None
    """No per-group LR factors: build_engine builds DeepSpeed's own optimizer and schedule."""

    def __init__(self, domains: list[str]):
        self.domains = list(domains)
        self.moe_layers: list[int] = []

    def param_groups(self, model: nn.Module) -> None:
        return None

    def attach(self, engine) -> None:
        """No hooks: fft adds nothing to the engine."""

    def begin_step(self, step: int) -> None:
        """No phases: every step trains everything."""

    def begin_micro_batch(self, domain: str, real_tokens: torch.Tensor | None = None) -> None:
        """No gradient masks and no affinity counting."""

    def aux_loss(self) -> None:
        return None

    def last_kd(self) -> None:
        return None

    def before_optimizer_step(self) -> None:
        """No expert rows to guard."""

    def after_optimizer_step(self) -> None:
        """No expert rows to restore."""

    def end_step(self, step: int) -> list[dict]:
        return []

    def metrics(self) -> dict:
        return {"phase": "full", "lambda": 0.0}

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        """Nothing to restore (``state`` is the None that state_dict saved)."""


class LoRA(FullFineTuning):
    """lora: peft's adapters train (desmoe.lora); everything else is frozen, the routers optionally not.

    NOTE: the routed experts still enter the optimizer, in an LR-0 group: ZeRO and AutoEP need their
    MoE parameter groups. They compute no weight gradient (requires_grad off once the engine is built;
    not under ZeRO 3, see experts_compute_grads) and MaskedAdamW skips LR-0 groups, so they never move.
    """

    FROZEN_EXPERTS = "frozen_experts"

    def __init__(self, cfg, model: nn.Module, family: Family, domains: list[str]):
        super().__init__(domains)
        self.family = family
        self.train_router = cfg.method.lora_train_router
        # NOTE: DeepSpeed 0.19.8 cannot checkpoint AutoEP experts whose requires_grad is off under ZeRO 3
        # ("does not support frozen expert parameters yet"): there they keep computing weight gradients, which
        # the LR-0 group discards, and hold (zero) Adam state.
        self.experts_compute_grads = cfg.parallel.zero_stage == 3
        self.modules = lora.inject(model, family, cfg.method, seed=cfg.run.seed)
        self._groups = self._trainable(model)
        self._experts: list[nn.Parameter] = []

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The adapters, the routers (lora_train_router) and the routed experts (LR 0); nothing else trains."""
        return self._groups

    def _trainable(self, model: nn.Module) -> list[dict]:
        """The optimizer groups; only their parameters require grad from here on."""
        routers = [self.family.router_weight(self.family.moe_block(self.family.decoder_layers(model)[i]))
                   for i in moe_layer_indices(model.config, self.family)]
        router_ids = {id(p) for p in routers}
        adapters, experts = [], []
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                adapters.append(p)
            elif id(p) not in router_ids and _is_routed_expert(name, model, self.family):
                experts.append(p)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in adapters + experts + (routers if self.train_router else []):
            p.requires_grad_(True)
        groups = [{"name": "lora", "params": adapters}, {"name": self.FROZEN_EXPERTS, "params": experts}]
        return groups + ([{"name": ROUTER, "params": routers}] if self.train_router else [])

    def lr_factor(self, group: dict, step: int) -> float:
        """1 for the adapters (and trained routers), 0 for the routed experts (AutoEP's MoE groups)."""
        return 0.0 if group.get("moe") or group.get("name") == self.FROZEN_EXPERTS else 1.0

    def attach(self, engine) -> None:
        """Find the routed experts (their weight gradients go off at the first step) and check what trains."""
        self._experts = []
        for _, moe in autoep_layers(engine.module):
            self._experts += list(moe.experts.parameters())
            if not self.train_router:
                moe.router.requires_grad_(False)
        expert_ids = {id(p) for p in self._experts}
        wrong = [n for n, p in engine.module.named_parameters() if p.requires_grad and id(p) not in expert_ids
                 and not lora.is_adapter(n) and not (self.train_router and ".router." in n)]
        if wrong:  # NOTE: a guard on the AutoEP conversion (it makes new parameters for what it replaces)
            raise RuntimeError(f"lora: parameters outside the adapters would train: {wrong[:4]}")
        if dist.get_world_size_and_rank()[1] == 0:
            def numel(p):  # ZeRO 3 releases a parameter's data between forwards; ds_numel is its full size
                return getattr(p, "ds_numel", p.numel())

            # NOTE: from the module, not self._groups: ZeRO 3 empties the optimizer's group lists between steps
            adapters = sum(numel(p) for n, p in engine.module.named_parameters() if lora.is_adapter(n))
            total = sum(numel(p) for p in engine.module.parameters())  # this rank's experts only under EP
            print(f"lora: adapters on {len(self.modules)} modules, {adapters:,} trainable parameters "
                  f"({100 * adapters / total:.2f}% of rank 0's {total:,})"
                  + (", routers trained in full" if self.train_router else ""), flush=True)

    def begin_step(self, step: int) -> None:
        """No weight gradients for the routed experts (LR 0: they never move).

        NOTE: switched off here, not in attach: with DeepSpeed 0.19.8 (ZeRO 2, AutoEP ep 2), loading a
        checkpoint while the experts' requires_grad is off gave rank 1 rank 0's experts (seen in the
        resume test); with it on at load time, as every mode has it, the load is exact.
        """
        if self.experts_compute_grads:
            return
        for p in self._experts:
            p.requires_grad_(False)

    def metrics(self) -> dict:
        return {"phase": LORA_MODE, "lambda": 0.0}


def _is_routed_expert(name: str, model: nn.Module, family: Family) -> bool:
    """A parameter of the routed experts of an HF MoE block (before AutoEP): inside the block, not a
    shared expert, not the router."""
    for i in moe_layer_indices(model.config, family):
        block = family.moe_block_path(i) + "."
        if name.startswith(block):
            rest = name[len(block):]
            return not rest.startswith(family.router_attr + ".") and "shared_expert" not in rest
    return False


class DesMoE:
    """State and hooks of one DES-MoE (or ESFT) run on this rank."""

    def __init__(self, cfg, model: nn.Module, moe_layers: list[int], domains: list[str], family: Family | None = None):
        m = cfg.method
        self.cfg, self.mode = cfg, m.mode
        self.family = family or get_family(model.config.model_type)
        self.esft = m.mode in ESFT_MODES
        self.use_alr = m.mode not in ("desmoe_no_alr", ) + ESFT_MODES
        self.use_dges = m.mode != "desmoe_no_dges"
        self.moe_layers = moe_layers
        self.domains = domains
        self.max_steps = cfg.train.max_steps
        self.phase = ESFT if self.esft else WARMUP
        self.table = trainable_table(m.phase_trainable, m.shared_experts)  # phase -> parts it trains
        self.lam = 1.0 if self.use_alr else 0.0
        self.real_tokens = None  # bool [T] of the current micro-batch's real tokens; None when all are real
        self.counting = False  # count routing decisions outside training forwards (the ESFT profile)
        self.step = 0
        self.domain_index = 0
        self.training_forward = False
        self._kd_terms: list[torch.Tensor] = []
        self.affinity: DomainAffinity | None = None  # counts, EMA estimate, selection (built by attach)
        self.masks = None  # bool [L, D, E]: expert e trains on domain d, identical on every rank
        self.expert_params: list[ExpertParam] = []
        self.per_token = m.isolation == "token" and self.use_dges and not self.esft
        self.token_maskers: list[TokenMasker] = []
        self.guard = None
        self._frozen = None  # dict layer -> bool [E_local]: rows that must not move in this step
        self.history: list[dict] = []  # every affinity record so far
        self._records: list[dict] = []  # the affinity records of the current step
        if self.use_alr:
            hidden = m.router_hidden or 4 * model.config.hidden_size
            for i in moe_layers:
                layer = self.family.decoder_layers(model)[i]
                # NOTE: on the decoder layer, not inside the MoE block that AutoEP replaces.
                layer.adaptive_router = AdaptiveRouter(
                    router_weight=self.family.router_weight(self.family.moe_block(layer)), hidden=hidden,
                    seed=cfg.run.seed * 1000 + i)

    # ---- before deepspeed.initialize -----------------------------------------------------

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups named after the phase table's parts: router (+ ALR), shared experts (if the
        model has any) and backbone; AutoEP moves the routed experts into its own MoE groups."""
        router_ids = set()
        router = []
        for i in self.moe_layers:
            layer = self.family.decoder_layers(model)[i]
            for p in [self.family.router_weight(self.family.moe_block(layer))] + (
                    [q for q in layer.adaptive_router.parameters() if q.requires_grad] if self.use_alr else []):
                router.append(p)
                router_ids.add(id(p))
        shared, backbone = [], []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in router_ids:
                (shared if SHARED_EXPERT_MARK in name else backbone).append(p)
        groups = [{"name": BACKBONE, "params": backbone}, {"name": ROUTER, "params": router}]
        return groups + ([{"name": SHARED_EXPERTS, "params": shared}] if shared else [])

    def phase_of_step(self, step: int) -> str:
        if self.esft:
            return ESFT
        return phase_at(step, self.max_steps, self.cfg.method.warmup_end, self.cfg.method.stabilization_end)

    def lr_factor(self, group: dict, step: int) -> float:
        """Multiplier of a group's LR at optimizer step ``step`` (1-based), from the phase table: 0 freezes it."""
        part = EXPERTS if group.get("moe") else group.get("name", BACKBONE)
        return lr_factor(part, self.table[self.phase_of_step(step)], backbone_lr_scale=self.cfg.method.backbone_lr_scale)

    # ---- after deepspeed.initialize ------------------------------------------------------

    def attach(self, engine) -> None:
        self.engine = engine
        self.guard = RowGuard(engine.optimizer)
        layers = dict(autoep_layers(engine.module))
        self.num_experts = None
        for li, i in enumerate(self.moe_layers):
            moe = layers[self.family.moe_block_path(i)]
            self.num_experts = moe.num_experts
            if self.per_token:
                tm = TokenMasker(moe, li)
                # NOTE: prepended, so it runs before ZeRO 3's own post-forward hook releases the experts' weights
                moe.experts.register_forward_hook(tm.experts_hook, prepend=True)
                self.token_maskers.append(tm)
            moe.router.register_forward_hook(self._count_hook(li))
            if self.use_alr:
                alr = self.family.decoder_layers(engine.module)[i].adaptive_router
                moe.router.gate.register_forward_hook(self._alr_hook(alr))
            for name, p in moe.experts.named_parameters():
                ep = ExpertParam(li, name, p, moe.ep_rank, moe.num_local_experts)
                p.register_hook(ep.hook)
                self.expert_params.append(ep)
        expert_ids = {id(ep.param) for ep in self.expert_params}
        # parameters by table part (routed experts: EXPERTS), for the gradients a phase computes
        self.parts_params = {EXPERTS: [ep.param for ep in self.expert_params], ROUTER: [], SHARED_EXPERTS: [],
                             BACKBONE: []}
        for name, p in engine.module.named_parameters():
            if p.requires_grad and id(p) not in expert_ids:
                self.parts_params[part_of(name)].append(p)
        m = self.cfg.method
        self.affinity = DomainAffinity(len(self.moe_layers), len(self.domains), self.num_experts, beta=m.affinity_beta,
                                       selection=m.selection, phi=m.phi, p=m.selection_p)

    def _alr_hook(self, alr: AdaptiveRouter):
        def hook(gate, inputs, output):
            x = inputs[0]
            if not (torch.is_grad_enabled() and self.training_forward):
                return output + alr.residual(x)
            if self.lam <= 0:  # no KD (e.g. the router is frozen in this phase)
                return alr.student_logits(x, gate.weight)
            # router parameters: (1 - λ)·task gradient + KD gradient; hidden states: task gradient only
            logits, kd_logits = alr.student_logits_task_and_kd(x, gate.weight, task_scale=1.0 - self.lam)
            with torch.no_grad():
                teacher = alr.teacher_logits(x)
            self._kd_terms.append(kd_loss(teacher, kd_logits, self.cfg.method.kd_tau))
            return logits

        return hook

    def _count_hook(self, li: int):
        def hook(router, inputs, output):
            if self.training_forward or self.counting:
                scores, selected = output[0], output[1]
                domain_ids = torch.full((selected.shape[0], ), self.domain_index)
                real = self.real_tokens if self.training_forward else None
                if real is not None and real.shape[0] == selected.shape[0]:
                    # affinity counts real tokens only, not the padding at the end of a packed row
                    self._count(li, scores[real.to(scores.device)], selected[real.to(selected.device)],
                                domain_ids[real])
                else:
                    self._count(li, scores, selected, domain_ids)
                if self.per_token and self.training_forward and self.token_maskers[li].active:
                    self.token_maskers[li].after_router(output, domain_ids)

        return hook

    def _count(self, li: int, scores: torch.Tensor, selected: torch.Tensor, domain_ids: torch.Tensor) -> None:
        # gate weights too where the selection scores by them, and in ESFT's profile (its gate score)
        self.affinity.count(li, scores, selected, domain_ids, gates=self.counting or self.affinity.counts_gates)

    # ---- the loop ------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step = step
        self._frozen = None
        self._records = []
        if self.esft:
            self._skip_frozen_grads(ESFT)
            return
        new_phase = self.phase_of_step(step)
        if new_phase != self.phase and dist.get_world_size_and_rank()[1] == 0:
            print(f"phase: {self.phase} -> {new_phase} at step {step}", flush=True)
        self._skip_frozen_grads(new_phase)
        if new_phase != WARMUP and self.phase == WARMUP and self.affinity.estimate is None:
            self.update_affinity(step - 1)  # the first estimate comes from warm-up
        self.phase = new_phase
        alpha = (step - 1) / self.max_steps
        # NOTE: λ is 0 where the router is frozen (nothing would receive the KD gradient)
        router_trains = self.use_alr and trains(ROUTER, self.table[new_phase])
        self.lam = kd_lambda(alpha, self.cfg.method.kd_alpha_end) if router_trains else 0.0

    def _skip_frozen_grads(self, phase: str) -> None:
        """Compute weight gradients only for what ``phase`` trains (the phase table; speed); set at every
        step, so a resumed run is in the same state as an uninterrupted one.

        NOTE: freezing itself is the LR factor 0 of their optimizer group (set since the optimizer
        was built, from the same table) and, for experts, the gradient mask; this only skips the
        backward work. ZeRO 1/2 treat a missing gradient as zero. Under the paper's table nothing is
        switched back on; a custom table that re-enables a part resumes it with Adam moments that
        decayed (zero gradients, LR 0) while it was frozen.
        """
        if not self.cfg.method.skip_frozen_grads:
            return
        parts = self.table[phase]
        for part, params in self.parts_params.items():
            for p in params:
                p.requires_grad_(trains(part, parts))

    def begin_micro_batch(self, domain: str, real_tokens: torch.Tensor | None = None) -> None:
        """Masks for a micro-batch of ``domain``; ``real_tokens`` (bool [B, S], optional): the tokens that
        are not row padding, the only ones the affinity counts."""
        self.domain_index = self.domains.index(domain)
        self.training_forward = True
        self._kd_terms = []
        # decided once per micro-batch, not in every layer's hook: None when nothing is padding
        real = None if real_tokens is None else real_tokens.reshape(-1).cpu()
        self.real_tokens = None if real is None or bool(real.all()) else real
        if self.per_token:
            # rows are masked per token inside the experts (TokenMasker); the guard uses the rows
            # that received no allowed token during the step, decided at the optimizer step
            active = self._isolating()
            for li, tm in enumerate(self.token_maskers):
                tm.active = active
                tm.allowed = self.masks[li] if active else None
            return
        keep = self._keep_rows(self.domain_index)
        for ep in self.expert_params:
            ep.set_keep(keep[ep.layer])
        frozen = {li: ~rows for li, rows in keep.items()}
        self._frozen = frozen if self._frozen is None else {li: self._frozen[li] & frozen[li] for li in frozen}

    def _isolating(self) -> bool:
        """Whether this phase trains only each domain's selected experts (gradient isolation is on)."""
        return isolates(self.table[self.phase]) and self.use_dges and self.masks is not None

    def _keep_rows(self, d: int) -> dict[int, torch.Tensor]:
        """Local rows (bool, per layer) that may receive a gradient from a micro-batch of domain ``d``."""
        out = {}
        trains_experts = experts_train(self.table[self.phase])
        isolating = self._isolating()
        for ep in self.expert_params:
            if ep.layer in out:
                continue
            if not trains_experts:
                out[ep.layer] = torch.zeros(ep.num_local, dtype=torch.bool)
            elif not isolating:
                out[ep.layer] = torch.ones(ep.num_local, dtype=torch.bool)
            else:
                out[ep.layer] = ep.local_rows(self.masks[ep.layer, d])
        return out

    def aux_loss(self) -> torch.Tensor | None:
        """kd_weight · λ · (sum, or mean, over MoE layers of L_KD) for the last forward; None when there is none.

        NOTE: summed by default: each router gets its own λ·L_KD term (METHOD.md §1)."""
        self.training_forward = False
        if not self._kd_terms:
            return None
        terms = torch.stack(self._kd_terms)
        kd = terms.sum() if self.cfg.method.kd_layer_reduction == "sum" else terms.mean()
        return (self.cfg.method.kd_weight * self.lam) * kd

    def last_kd(self) -> torch.Tensor | None:
        """Mean L_KD of the last forward (detached, on the device), or None."""
        return torch.stack(self._kd_terms).detach().mean() if self._kd_terms else None

    def before_optimizer_step(self) -> None:
        if self.per_token and self.token_maskers and self.token_maskers[0].active:
            self._frozen = self._rows_without_allowed_tokens()
        # NOTE: where the phase trains no routed expert, their groups' LR is 0: nothing to guard
        if experts_train(self.table[self.phase]) and self._frozen is not None:
            self.guard.save(self.expert_params, self._frozen)

    def _rows_without_allowed_tokens(self) -> dict[int, torch.Tensor]:
        """Per-token mode: local rows no rank's allowed token reached this step (OR over expert replicas)."""
        kept = torch.zeros(len(self.token_maskers), self.num_experts, dtype=torch.float64)
        for li, tm in enumerate(self.token_maskers):
            start = tm.moe.ep_rank * tm.moe.num_local_experts
            kept[li, start:start + tm.moe.num_local_experts] = tm.kept_rows.to(torch.float64)
            tm.kept_rows.zero_()
        kept = dist.all_reduce_sum(kept) > 0
        return {li: ~self.expert_params[0].local_rows(kept[li]) for li in range(kept.shape[0])}

    def after_optimizer_step(self) -> None:
        self.guard.restore()

    def end_step(self, step: int) -> list[dict]:
        """The affinity records made during this step, in order (every T_update steps, and the first
        estimate at the end of warm-up); empty: the masks did not change."""
        if not self.esft and step % self.cfg.method.affinity_update_every == 0:
            self.update_affinity(step)
        records, self._records = self._records, []
        return records

    def update_affinity(self, step: int) -> dict:
        """All-reduce the window counts, fold them into the EMA, reselect the masks (same on every rank);
        returns the affinity record (step, domains, layers, affinity, masks)."""
        old = self.masks
        self.masks = self.affinity.update(dist.all_reduce_sum)
        if old is not None:
            left = old.any(dim=1) & ~self.masks.any(dim=1)  # [L, E]: no domain selects it any more
            if bool(left.any()):
                self.guard.clear_moments(self.expert_params,
                                         {li: self.expert_params[0].local_rows(left[li]) for li in range(left.shape[0])})
        record = {"step": step, "domains": self.domains, "layers": self.moe_layers,
                  "affinity": torch.nan_to_num(self.affinity.estimate, nan=-1.0).tolist(),
                  "masks": self.masks.int().tolist()}
        self.history.append(record)
        self._records.append(record)
        return record

    def metrics(self) -> dict:
        return {"phase": self.phase, "lambda": self.lam}

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the DeepSpeed checkpoint (this rank's window counts
        included: they are summed over ranks only at the next affinity update)."""
        return {"phase": self.phase, "lam": self.lam, "step": self.step, "masks": self.masks,
                **self.affinity.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.lam, self.step = state["phase"], float(state["lam"]), int(state["step"])
        self.masks = state["masks"]
        self.affinity.load_state_dict(state)
