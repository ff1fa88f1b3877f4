"""The three-phase DES-MoE schedule (METHOD.md §3): step -> phase, and what each phase trains. Pure.

One table decides what a phase trains (``trainable_table``); the method reads it for both
the optimizer groups' LR factors (``lr_factor``) and which weight gradients are computed at
all, so the two can never disagree.
"""

from __future__ import annotations

WARMUP, STABILIZATION, CONSOLIDATION = "warmup", "stabilization", "consolidation"
PHASES = (WARMUP, STABILIZATION, CONSOLIDATION)
ESFT = "esft"
"""The single "phase" of the ESFT baselines: the selected experts train, everything else is frozen."""

ROUTER, EXPERTS, SELECTED_EXPERTS, SHARED_EXPERTS, BACKBONE = (
    "router", "experts", "selected_experts", "shared_experts", "backbone")
TABLE_PARTS = (ROUTER, EXPERTS, SELECTED_EXPERTS, BACKBONE)
"""What ``method.phase_trainable`` may list. router = the router weight and the ALR; experts = every
routed expert on every domain's tokens; selected_experts = only the batch domain's selected routed
experts (gradient isolation); backbone = attention, norms, embeddings, lm_head, dense MLP layers.
Shared experts follow ``method.shared_experts`` instead."""

PAPER_TRAINABLE = {
    WARMUP: (ROUTER, EXPERTS),
    STABILIZATION: (ROUTER, SELECTED_EXPERTS),
    CONSOLIDATION: (SELECTED_EXPERTS, ),
}
"""The paper's Figure 1 (METHOD.md §3 table): the backbone is frozen in every phase."""

BACKBONE_WARMUP_TRAINABLE = {
    WARMUP: (ROUTER, BACKBONE),
    STABILIZATION: (ROUTER, SELECTED_EXPERTS),
    CONSOLIDATION: (SELECTED_EXPERTS, ),
}
"""desmoe's schedule before the METHOD.md correction (warm-up trains the backbone, routed experts frozen);
reachable with ``method.phase_trainable``."""

SHARED_EXPERT_PHASES = {"never": (), "warmup": (WARMUP, ), "always": PHASES}
"""``method.shared_experts`` -> the phases in which shared (always-on) experts train."""

SHARED_EXPERT_MARK = ".shared_expert"
"""In a parameter name: a shared (always-on) expert or its gate (DeepSeek ``mlp.shared_experts``, Qwen2-MoE
``mlp.shared_expert`` / ``shared_expert_gate``, AutoEP's ``shared_experts`` / ``shared_experts_gate``)."""


def part_of(name: str) -> str:
    """The phase-table part of a non-routed parameter, by its name in the engine's module."""
    if ".router." in name or "adaptive_router" in name:
        return ROUTER
    return SHARED_EXPERTS if SHARED_EXPERT_MARK in name else BACKBONE


def phase_at(step: int, max_steps: int, warmup_frac: float, stabilization_frac: float) -> str:
    """Phase of optimizer step ``step`` (1-based): t ≤ T₁ warm-up, T₁ < t ≤ T₂ stabilization, else consolidation.

    T₁ = warmup_frac·T and T₂ = stabilization_frac·T (fractions of max_steps).
    """
    t1, t2 = warmup_frac * max_steps, stabilization_frac * max_steps
    if step <= t1:
        return WARMUP
    if step <= t2:
        return STABILIZATION
    return CONSOLIDATION


def trainable_table(phase_trainable: dict | None = None, shared_experts: str = "warmup") -> dict[str, frozenset]:
    """phase -> the set of parts it trains: the paper's table, phases overridden by ``phase_trainable``
    (phase -> list of TABLE_PARTS), shared experts added in the phases ``shared_experts`` names.

    The ESFT entry is fixed: the selected experts only."""
    table = {ph: set(parts) for ph, parts in PAPER_TRAINABLE.items()}
    for ph, parts in (phase_trainable or {}).items():
        table[ph] = set(parts)
    for ph in SHARED_EXPERT_PHASES[shared_experts]:
        table[ph].add(SHARED_EXPERTS)
    table[ESFT] = {SELECTED_EXPERTS}
    return {ph: frozenset(parts) for ph, parts in table.items()}


def check_phase_trainable(value) -> list[str]:
    """Problems with a ``method.phase_trainable`` value (empty when it is valid or None)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"method.phase_trainable: {value!r} must be a mapping phase -> list of parts, e.g. "
                "{warmup: [router, experts], stabilization: [router, selected_experts], "
                "consolidation: [selected_experts]}."]
    problems = []
    for ph, parts in value.items():
        if ph not in PHASES:
            problems.append(f"method.phase_trainable: {ph!r} is not a phase; use {', '.join(PHASES)}.")
            continue
        if not isinstance(parts, (list, tuple)) or not all(isinstance(x, str) for x in parts):
            problems.append(f"method.phase_trainable.{ph}: {parts!r} must be a list of parts "
                            f"({', '.join(TABLE_PARTS)}; [] freezes everything).")
            continue
        unknown = [x for x in parts if x not in TABLE_PARTS]
        if SHARED_EXPERTS in unknown:
            problems.append(f"method.phase_trainable.{ph}: shared experts are set by method.shared_experts "
                            f"({', '.join(SHARED_EXPERT_PHASES)}), not in the table.")
            unknown.remove(SHARED_EXPERTS)
        if unknown:
            problems.append(f"method.phase_trainable.{ph}: unknown part(s) {unknown}; use {', '.join(TABLE_PARTS)}.")
        if EXPERTS in parts and SELECTED_EXPERTS in parts:
            problems.append(f"method.phase_trainable.{ph}: lists both experts (every routed expert) and "
                            "selected_experts (the domain's own); keep one.")
    return problems


def experts_train(parts: frozenset) -> bool:
    """Whether routed experts (all, or the selected ones) train under ``parts``."""
    return EXPERTS in parts or SELECTED_EXPERTS in parts


def trains(part: str, parts: frozenset) -> bool:
    """Whether ``part`` (ROUTER, SHARED_EXPERTS, BACKBONE, or EXPERTS for every routed expert) trains under
    ``parts``; the one answer behind both the LR factors and the gradients a phase computes."""
    return experts_train(parts) if part == EXPERTS else part in parts


def isolates(parts: frozenset) -> bool:
    """Whether ``parts`` trains each domain's selected experts only (gradient isolation is on)."""
    return SELECTED_EXPERTS in parts and EXPERTS not in parts


def lr_factor(group_part: str, parts: frozenset, *, backbone_lr_scale: float = 1.0) -> float:
    """Multiplier of an optimizer group's LR in a phase that trains ``parts``: 0 freezes the group.

    ``group_part``: ROUTER, SHARED_EXPERTS, BACKBONE, or EXPERTS for AutoEP's routed-expert groups
    (per-domain selection is then the gradient mask, not the LR)."""
    if not trains(group_part, parts):
        return 0.0
    return backbone_lr_scale if group_part == BACKBONE else 1.0
