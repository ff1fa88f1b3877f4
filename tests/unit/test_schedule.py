from desmoe.schedule import CONSOLIDATION, STABILIZATION, WARMUP, phase_at


def test_phase_boundaries_are_fractions_of_max_steps():
    phases = [phase_at(t, 100, 0.2, 0.7) for t in range(1, 101)]
    assert phases.count(WARMUP) == 20 and phases[19] == WARMUP and phases[20] == STABILIZATION
    assert phases.count(STABILIZATION) == 50 and phases[69] == STABILIZATION and phases[70] == CONSOLIDATION
    assert phases.count(CONSOLIDATION) == 30
