from desmoe.schedule import (BACKBONE, BACKBONE_WARMUP_TRAINABLE, CONSOLIDATION, ESFT, EXPERTS, PHASES, ROUTER,
                             SELECTED_EXPERTS, SHARED_EXPERTS, STABILIZATION, TABLE_PARTS, WARMUP,
                             check_phase_trainable, experts_train, isolates, lr_factor, part_of, phase_at,
                             trainable_table, trains)


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


def test_trains_and_isolates_read_the_table():
    t = trainable_table()
    assert [trains(EXPERTS, t[ph]) for ph in (*PHASES, ESFT)] == [True, True, True, True]
    assert [trains(ROUTER, t[ph]) for ph in (*PHASES, ESFT)] == [True, True, False, False]
    assert [isolates(t[ph]) for ph in (*PHASES, ESFT)] == [False, True, True, True]
    assert not trains(BACKBONE, t[WARMUP]) and trains(SHARED_EXPERTS, t[WARMUP])
    assert not trains(SELECTED_EXPERTS, frozenset({EXPERTS})) and trains(EXPERTS, frozenset({SELECTED_EXPERTS}))
    assert not experts_train(frozenset({ROUTER, BACKBONE})) and not isolates(frozenset())
    for parts in (frozenset(), frozenset(TABLE_PARTS) - {SELECTED_EXPERTS}, frozenset({SELECTED_EXPERTS, BACKBONE})):
        for part in (ROUTER, EXPERTS, SHARED_EXPERTS, BACKBONE):  # a zero LR factor is exactly "does not train"
            assert (lr_factor(part, parts, backbone_lr_scale=0.3) > 0) == trains(part, parts)


def test_edge_steps_of_the_phases():
    assert phase_at(1, 10, 0.0, 0.0) == CONSOLIDATION  # no warm-up, no stabilization
    assert phase_at(10, 10, 1.0, 1.0) == WARMUP
    assert [phase_at(t, 7, 0.2, 0.7) for t in range(1, 8)] == [WARMUP, STABILIZATION, STABILIZATION,
                                                                STABILIZATION, CONSOLIDATION, CONSOLIDATION,
                                                                CONSOLIDATION]  # T1 = 1.4, T2 = 4.9


def test_part_of_a_parameter_by_its_engine_name():
    assert part_of("model.layers.0.mlp.router.gate.weight") == ROUTER
    assert part_of("model.layers.3.adaptive_router.w1") == ROUTER
    assert part_of("model.layers.0.mlp.shared_experts.down_proj.weight") == SHARED_EXPERTS
    assert part_of("model.layers.0.mlp.shared_expert_gate.weight") == SHARED_EXPERTS
    assert part_of("model.layers.0.self_attn.q_proj.weight") == BACKBONE
    assert part_of("model.layers.0.mlp.gate_proj.weight") == BACKBONE  # a dense MLP (DeepSeek's first layers)
    assert part_of("lm_head.weight") == part_of("model.embed_tokens.weight") == BACKBONE
