"""The three-phase DES-MoE schedule (METHOD.md §3): step -> phase, pure."""

from __future__ import annotations

WARMUP, STABILIZATION, CONSOLIDATION = "warmup", "stabilization", "consolidation"
PHASES = (WARMUP, STABILIZATION, CONSOLIDATION)


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


# What each phase trains (METHOD.md §3 table); a part not listed is frozen in that phase.
TRAINABLE = {
    WARMUP: {"router", "backbone"},
    STABILIZATION: {"router", "selected_experts"},
    CONSOLIDATION: {"selected_experts"},
}
