from desmoe.schedule import (BACKBONE, BACKBONE_WARMUP_TRAINABLE, CONSOLIDATION, ESFT, EXPERTS, PHASES, ROUTER,
                             SELECTED_EXPERTS, SHARED_EXPERTS, STABILIZATION, WARMUP, check_phase_trainable,
                             lr_factor, phase_at, trainable_table)


def test_phase_boundaries_are_fractions_of_max_steps():
    phases = [phase_at(t, 100, 0.2, 0.7) for t in range(1, 101)]
    assert phases.count(WARMUP) == 20 and phases[19] == WARMUP and phases[20] == STABILIZATION
    assert phases.count(STABILIZATION) == 50 and phases[69] == STABILIZATION and phases[70] == CONSOLIDATION
    assert phases.count(CONSOLIDATION) == 30


def test_default_table_is_the_papers_figure_1():
    t = trainable_table()
    assert t[WARMUP] == {ROUTER, EXPERTS, SHARED_EXPERTS}
    assert t[STABILIZATION] == {ROUTER, SELECTED_EXPERTS}
    assert t[CONSOLIDATION] == {SELECTED_EXPERTS}
    assert all(BACKBONE not in parts for parts in t.values())  # nothing in the paper trains the backbone
    assert t[ESFT] == {SELECTED_EXPERTS}


def test_a_phase_row_can_be_replaced_and_shared_experts_follow_their_knob():
    t = trainable_table({WARMUP: [ROUTER, BACKBONE]}, shared_experts="never")
    assert t[WARMUP] == {ROUTER, BACKBONE} and t[STABILIZATION] == {ROUTER, SELECTED_EXPERTS}
    assert t == {**trainable_table(BACKBONE_WARMUP_TRAINABLE, "never")}
    always = trainable_table(shared_experts="always")
    assert all(SHARED_EXPERTS in always[ph] for ph in PHASES) and SHARED_EXPERTS not in always[ESFT]


def test_lr_factors_follow_the_table():
    t = trainable_table()
    assert lr_factor(EXPERTS, t[WARMUP]) == lr_factor(EXPERTS, t[CONSOLIDATION]) == 1.0
    assert lr_factor(ROUTER, t[STABILIZATION]) == 1.0 and lr_factor(ROUTER, t[CONSOLIDATION]) == 0.0
    assert all(lr_factor(BACKBONE, t[ph], backbone_lr_scale=0.1) == 0.0 for ph in PHASES)
    assert lr_factor(SHARED_EXPERTS, t[WARMUP]) == 1.0 and lr_factor(SHARED_EXPERTS, t[STABILIZATION]) == 0.0
    small = trainable_table({ph: [ROUTER, EXPERTS, BACKBONE] for ph in PHASES})
    assert lr_factor(BACKBONE, small[CONSOLIDATION], backbone_lr_scale=0.1) == 0.1
    assert lr_factor(EXPERTS, frozenset({ROUTER})) == 0.0


def test_phase_table_problems_name_phase_part_and_fix():
    assert check_phase_trainable(None) == [] and check_phase_trainable({WARMUP: []}) == []
    problems = check_phase_trainable({"warm": [ROUTER], STABILIZATION: ["routers", SHARED_EXPERTS],
                                      CONSOLIDATION: [EXPERTS, SELECTED_EXPERTS]})
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "'warm' is not a phase" in text and "unknown part(s) ['routers']" in text
    assert "method.shared_experts" in text and "keep one" in text
    assert "must be a mapping" in check_phase_trainable([ROUTER])[0]
    assert "must be a list" in check_phase_trainable({WARMUP: ROUTER})[0]
