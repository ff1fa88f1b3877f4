"""benchmarks/pretrain_base.py and benchmarks/reproduce.py: the pure parts (data split, baselines, analysis, plots)."""

import math
import os

import pytest
import torch

from benchmarks import pretrain_base as pb
from benchmarks import reproduce as rp
from desmoe.config import DataSection, DomainSection, config_from_dict, validate
from desmoe.data import IGNORE_INDEX, ByteTokenizer, build_holdout, encode_example, pack_sequences


def test_general_split_holds_out_exactly_the_rows_desmoe_evaluates_as_holdout():
    tok = ByteTokenizer()
    seq_len, rows, val = 128, 8, 4
    general = pb.load_corpora(["general"])["general"][:60]
    encoded = [encode_example(ex, tok) for ex in general]
    h, v = pb.split_general(encoded, seq_len=seq_len, holdout_rows=rows, val_rows=val, bos=True)
    assert 0 < h < v < len(encoded)

    def pack(exs):
        return pack_sequences(exs, seq_len=seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)

    cfg = DataSection(domains={}, holdout=DomainSection(builtin="general"), seq_len=seq_len, holdout_sequences=rows)
    desmoe_holdout = build_holdout(cfg, tok)
    ids, labels = pack(encoded[:h])
    assert torch.equal(ids[:rows], desmoe_holdout.eval_ids) and torch.equal(labels[:rows], desmoe_holdout.eval_labels)
    # the first held-out-free example starts at or after the end of the holdout rows: no text shared
    framed = [len(e[0]) + 2 for e in encoded]
    assert sum(framed[:h]) >= rows * seq_len and sum(framed[:h - 1]) < rows * seq_len
    assert sum(framed[:v]) >= (rows + val) * seq_len


def test_unigram_loss_is_the_entropy_of_the_smoothed_counts():
    vocab = 8
    train = torch.tensor([[IGNORE_INDEX, 3, 3, 4]])
    evals = torch.tensor([[IGNORE_INDEX, 3, 4]])
    # counts + 1: token 3 -> 3, token 4 -> 2, six others -> 1: total 11
    expected = -(math.log(3 / 11) + math.log(2 / 11)) / 2
    assert pb.compute_unigram_loss(train, evals, vocab) == pytest.approx(expected)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = {"lr": 1e-3, "warmup_steps": 10, "steps": 110, "min_lr_ratio": 0.1}
    assert pb.lr_at(5, t) == pytest.approx(5e-4)
    assert pb.lr_at(10, t) == pytest.approx(1e-3)
    assert pb.lr_at(110, t) == pytest.approx(1e-4)
    assert all(pb.lr_at(s, t) >= pb.lr_at(s + 1, t) for s in range(10, 110))


def test_cache_key_follows_recipe_and_corpora():
    key = pb.recipe_key(pb.FULL, "abc")
    assert key.startswith("full-") and key == pb.recipe_key(dict(pb.FULL), "abc")
    assert pb.recipe_key(pb.FULL, "abd") != key
    changed = dict(pb.FULL, train=dict(pb.FULL["train"], steps=601))
    assert pb.recipe_key(changed, "abc") != key
    assert pb.recipe_key(pb.QUICK, "abc").startswith("quick-")


# ---------------------------------------------------------------------------------------------
# benchmarks/reproduce.py
# ---------------------------------------------------------------------------------------------


def _base(tmp_path, holdout=None):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    finetune = {"seq_len": 128, "holdout_sequences": 256, "max_examples": {d: 100 for d in pb.DOMAINS}}
    if holdout is not None:
        finetune["holdout"] = holdout
    return {"dir": str(tmp_path), "info": {"finetune": finetune}}


def test_run_names_encode_mode_lr_seed_and_domain_count():
    assert [rp.lr_tag(x) for x in (1e-4, 3e-4, 1e-3, 2.5e-4, 0.01)] == ["1e-4", "3e-4", "1e-3", "2.5e-4", "1e-2"]
    assert rp.run_name("desmoe", 3e-4, 1, 6) == "desmoe_lr3e-4_s1_d6"
    assert rp.run_name("desmoe_phi04", 1e-3, 2, 4) == "desmoe_phi04_lr1e-3_s2_d4"


def test_full_plans_sweep_lrs_and_seeds_with_large_eval_sets():
    for name in ("full", "full_qwen"):
        plan = rp.PLANS[name]
        assert len(plan["lrs"]) >= 3 and len(plan["seeds"]) >= 2
        assert plan["eval_sequences"] >= 64 and plan["holdout_sequences"] >= 128
        assert set(rp.MODES) <= set(plan["modes"]) and plan["variants"]
        assert plan["domain_counts"][-1] == len(plan["domains"])
    assert rp.PLANS["full"]["recipe"] == ("dsv2" if "dsv2" in pb.RECIPES else "full")
    assert rp.PLANS["full_qwen"]["recipe"] == "full"
    full = rp.PLANS["full"]
    sweep = rp.sweep_runs(full)
    per_seed = sum(len(s["lrs"]) for s in rp.settings(full).values())
    assert len(sweep) == per_seed * len(full["seeds"])
    assert all(len(rp.settings(full)[m]["lrs"]) >= 3 for m in rp.MODES)  # every mode at >= 3 LRs
    # a set cut short has whole seeds: every run of seed 1 comes before any of seed 2
    seeds = [s["seed"] for s in sweep]
    assert seeds == sorted(seeds)


def test_every_planned_run_config_is_a_valid_desmoe_config(tmp_path):
    for plan_name, plan in rp.PLANS.items():
        base = _base(tmp_path)
        sweep = rp.sweep_runs(plan)
        choice = {"fft": {"setting": "fft", "lr": plan["lrs"][0]}, "esft": {"setting": "esft_gate", "lr": 1e-3},
                  "desmoe": {"setting": "desmoe", "lr": rp.settings(plan)["desmoe"]["lrs"][-1]}}
        fig2 = rp.figure2_runs(plan, choice)
        names = [s["name"] for s in sweep + fig2]
        assert len(names) == len(set(names)), plan_name
        sets = rp.settings(plan)
        expected = {rp.run_name(n, lr, seed, len(plan["domains"])) for n, s in sets.items() for lr in s["lrs"]
                    for seed in plan["seeds"]}
        assert {s["name"] for s in sweep} == expected
        counts = [n for n in plan["domain_counts"] if n != len(plan["domains"])]
        assert len(fig2) == len(counts) * len(plan["seeds"]) * 3
        assert {len(s["domains"]) for s in fig2} == set(counts)
        for spec in sweep + fig2:
            cfg_dict = rp.run_config(plan, base, spec, out_dir=str(tmp_path / spec["name"]), nproc=2)
            assert rp.config_problem(cfg_dict, 2) is None, (plan_name, spec["name"])
            cfg = config_from_dict(cfg_dict)
            validate(cfg, world_size=2)
            steps = plan["steps_per_domain"] * len(spec["domains"])
            assert cfg.train.max_steps == steps and cfg.train.lr == spec["lr"] and cfg.run.seed == spec["seed"]
            assert cfg.method.mode == spec["mode"] and list(cfg.data.domains) == spec["domains"]
            assert cfg.eval.every == rp.eval_every(plan, steps) and cfg.eval.max_pairs == plan["eval_max_pairs"]
            assert cfg.data.eval_sequences == plan["eval_sequences"]
            assert cfg.data.holdout_sequences == min(plan["holdout_sequences"], 256)
            assert cfg.data.holdout.builtin == "general" and cfg.checkpoint.save_final is False
            for key, value in spec["overrides"].items():
                section, field = key.split(".")
                assert getattr(getattr(cfg, section), field) == value
        assert any(s["overrides"] for s in sweep) == bool(plan["variants"])  # the example variant runs
        # evaluations: evals_per_run after step 0, the last one the final evaluation
        steps = rp.steps_of(plan, len(plan["domains"]))
        every = rp.eval_every(plan, steps)
        assert len([s for s in range(every, steps, every)]) + 1 == plan["evals_per_run"]


def test_holdout_comes_from_the_base_models_recipe(tmp_path):
    plan = rp.PLANS["quick"]
    spec = rp.sweep_runs(plan)[0]
    held = tmp_path / "general_holdout.jsonl"
    held.write_text('{"text": "hello"}\n')
    base = _base(tmp_path, holdout={"train": str(held)})
    base["info"]["finetune"]["holdout_sequences"] = 4  # fewer held-out rows than the plan asks: at most those
    cfg = rp.run_config(plan, base, spec, out_dir=str(tmp_path / "r"), nproc=2)
    assert cfg["data"]["holdout"] == {"train": str(held)} and cfg["data"]["holdout_sequences"] == 4
    assert rp.config_problem(cfg, 2) is None


def test_an_unknown_override_fails_clearly_and_is_recorded_not_raised(tmp_path, monkeypatch):
    plan = dict(rp.PLANS["quick"], variants={"bad": {"mode": "desmoe", "overrides": {"method.no_such_knob": 1}}})
    spec = next(s for s in rp.sweep_runs(plan) if s["setting"] == "bad")
    cfg = rp.run_config(plan, _base(tmp_path), spec, out_dir=str(tmp_path / "x"), nproc=2)
    assert cfg["method"]["no_such_knob"] == 1
    assert "method.no_such_knob" in rp.config_problem(cfg, 2)

    def never(*a, **k):
        raise AssertionError("a rejected config must not be launched")

    monkeypatch.setattr(rp, "run_cli", never)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    runner = rp.Runner(plan, _base(tmp_path), str(out), 2, reuse=False, analyse_only=False, log=lambda m: None)
    rec = runner.one(spec, 1, 1.0)
    assert rec["status"] == "failed" and "no_such_knob" in rec["error"]
    assert "no_such_knob" in open(rec["log"]).read()
    assert os.path.isfile(out / "runs" / f"{spec['name']}.run.json")
    # analyse-only finds it failed; a run never started is missing
    again = rp.Runner(plan, _base(tmp_path), str(out), 2, reuse=False, analyse_only=True, log=lambda m: None)
    assert again.one(spec, 1, 1.0)["status"] == "failed"
    other = rp.sweep_runs(plan)[0]
    assert again.one(other, 1, 1.0)["status"] == "missing"
    with pytest.raises(ValueError):
        rp.set_dotted({}, "phi", 1)


def _res(losses: dict, holdout: float, **task) -> dict:
    out = {d: {"loss": v} for d, v in losses.items()}
    for d, v in task.items():
        out[d]["exact_match"] = v
    out["holdout"] = {"loss": holdout}
    return out


def test_best_evaluation_is_the_lowest_average_domain_loss_periodic_or_final():
    ev = {"before": _res({"a": 5.0, "b": 5.0}, 9.0),
          "history": [{"step": 2, "results": _res({"a": 4.0, "b": 4.0}, 9.5)},
                      {"step": 4, "results": _res({"a": 2.0, "b": 4.0}, 10.0)}],
          "after": _res({"a": 3.0, "b": 4.0}, 9.2)}
    best = rp.best_evaluation(ev, ["a", "b"], last_step=6)
    assert best["step"] == 4 and best["avg_domain_loss"] == pytest.approx(3.0)
    assert best["holdout_loss"] == 10.0 and best["forgetting"] == pytest.approx(1.0)
    assert best["loss"] == {"a": 2.0, "b": 4.0}
    # the final evaluation wins when it is the best; a tie goes to the earlier evaluation
    ev["after"] = _res({"a": 1.0, "b": 4.0}, 9.1)
    assert rp.best_evaluation(ev, ["a", "b"], 6)["step"] == 6
    ev["after"] = _res({"a": 2.0, "b": 4.0}, 9.1)
    assert rp.best_evaluation(ev, ["a", "b"], 6)["step"] == 4
    # only the domains asked for count
    assert rp.best_evaluation(ev, ["b"], 6)["step"] == 2
    assert rp.best_evaluation(None, ["a"]) is None
    assert rp.best_evaluation({"before": ev["before"], "after": None}, ["a"]) is None


def _rows(losses_by_step, step_time=1.0, phase="full"):
    return [{"step": s, "domain": d, "loss": l, "elapsed_s": s * step_time + 100, "step_time_s": step_time,
             "phase": phase} for s, (d, l) in enumerate(losses_by_step, start=1)]


def _run(name, setting, lr, seed, evals, *, mode=None, domains=("a", "b"), steps=6, step_time=1.0,
         before=None, phase="full"):
    """A finished run record: evals = [(step, {domain: loss}, holdout)] ending with the final one at ``steps``."""
    domains = list(domains)
    before = before or (dict.fromkeys(domains, 5.0), 9.0)
    hist = [{"step": s, "results": _res(l, h, a=0.5)} for s, l, h in evals[:-1]]
    eval_json = {"before": _res(before[0], before[1], a=0.0), "history": hist,
                 "after": _res(evals[-1][1], evals[-1][2], a=0.5)}
    return {"name": name, "setting": setting, "mode": mode or setting, "lr": lr, "seed": seed,
            "domains": domains, "stage": "sweep", "status": "ok", "nproc": 2, "log": f"/x/{name}.log",
            "peak_rss_mib": [100.0, 110.0], "wall_s": 10.0,
            "summary": {"steps": steps, "train_time_s": 8.0},
            "metrics": _rows([(domains[i % len(domains)], 1.0) for i in range(steps)], step_time, phase),
            "data_summary": [{"domain": d, "train_seqs": 100, "metrics": ["exact_match"] if d == "a" else
                              ["token_accuracy"]} for d in domains],
            "eval": eval_json}


def test_run_point_and_aggregate_over_seeds():
    r1 = _run("x1", "fft", 1e-3, 1, [(2, {"a": 4.0, "b": 4.0}, 9.5), (6, {"a": 3.0, "b": 3.0}, 10.0)])
    r2 = _run("x2", "fft", 1e-3, 2, [(2, {"a": 3.0, "b": 3.0}, 9.4), (6, {"a": 3.5, "b": 3.5}, 10.0)])
    heads = rp.headline_metrics(r1["data_summary"], ["a", "b"])
    assert heads == {"a": "exact_match", "b": "token_accuracy"}
    r1["eval"]["after"]["b"]["token_accuracy"] = 0.25
    p1 = rp.run_point(r1, heads)
    assert p1["step"] == 6 and p1["forgetting"] == pytest.approx(1.0) and p1["task"] == {"a": 50.0, "b": 25.0}
    assert p1["task_avg"] == pytest.approx(37.5) and p1["final"]["avg_domain_loss"] == pytest.approx(3.0)
    p2 = rp.run_point(r2, {"a": "exact_match"})
    assert p2["step"] == 2 and p2["forgetting"] == pytest.approx(0.4)
    assert p2["final"] == {"step": 6, "avg_domain_loss": pytest.approx(3.5), "forgetting": pytest.approx(1.0)}
    g = rp.aggregate([p1, dict(p2, task=None, task_avg=None)])
    assert g["seeds"] == [1, 2] and g["best_step"] == [6, 2]
    assert g["avg_domain_loss"]["mean"] == pytest.approx(3.0) and g["avg_domain_loss"]["std"] == 0.0
    assert g["forgetting"]["mean"] == pytest.approx(0.7) and g["forgetting"]["min"] == pytest.approx(0.4)
    assert g["forgetting"]["std"] == pytest.approx(math.sqrt(2 * 0.3 ** 2)) and g["task"] is None
    assert rp.stats([None]) is None and rp.stats([2.0])["std"] == 0.0


def _p(f, loss, lr=None):
    return {"forgetting": f, "loss": loss, "lr": lr}


def test_pareto_front_keeps_the_non_dominated_points_by_forgetting():
    pts = [_p(0.5, 3.0, 1), _p(0.1, 3.5, 2), _p(0.3, 3.6, 3), _p(0.9, 2.8, 4), _p(0.9, 2.9, 5), _p(0.1, 3.5, 6)]
    front = rp.pareto_front(pts)
    # (0.3, 3.6) is beaten by (0.1, 3.5); (0.9, 2.9) by (0.9, 2.8); the duplicate (0.1, 3.5) kept once
    assert [(p["forgetting"], p["loss"], p["lr"]) for p in front] == [(0.1, 3.5, 2), (0.5, 3.0, 1), (0.9, 2.8, 4)]
    assert rp.pareto_front([]) == [] and rp.pareto_front([_p(1, 1)]) == [_p(1, 1)]


def test_front_comparison_on_the_shared_forgetting_range():
    a = [_p(0.1, 3.0), _p(0.3, 2.0)]
    b = [_p(0.2, 2.8), _p(0.5, 1.9)]
    assert rp.front_loss_at(a, 0.2) == pytest.approx(2.5) and rp.front_loss_at(a, 0.35) is None
    c = rp.compare_fronts(a, b)
    assert c["overlap"] == [0.2, 0.3] and [x["forgetting"] for x in c["checks"]] == [0.2, 0.3]
    # a at 0.2: 2.5 vs b 2.8; a at 0.3: 2.0 vs b 2.8 - 0.9 / 3 = 2.5
    assert c["max_diff"] == pytest.approx(-0.3) and c["met"] is True
    back = rp.compare_fronts(b, a)
    assert back["max_diff"] == pytest.approx(0.5) and back["met"] is False
    # a front point inside the overlap is a check point: there b is worse only in the middle
    d = rp.compare_fronts([_p(0.0, 3.0), _p(0.5, 2.0), _p(1.0, 1.0)], [_p(0.0, 3.0), _p(1.0, 1.0)])
    assert [x["forgetting"] for x in d["checks"]] == [0.0, 0.5, 1.0] and d["met"] is True
    e = rp.compare_fronts([_p(0.0, 3.0), _p(1.0, 1.0)], [_p(0.0, 3.0), _p(0.5, 1.9), _p(1.0, 1.0)])
    assert e["max_diff"] == pytest.approx(0.1) and e["met"] is False
    # no shared range: nothing compared
    none = rp.compare_fronts([_p(0.0, 3.0)], [_p(0.5, 2.0), _p(0.9, 1.0)])
    assert none["overlap"] is None and none["met"] is None and none["dominated"] == 0
    # dominance needs no shared range: (0.0, 1.5) is no worse than (0.5, 2.0) in both, not than (0.9, 1.0)
    assert rp.compare_fronts([_p(0.0, 1.5)], [_p(0.5, 2.0), _p(0.9, 1.0)])["dominated"] == 1
    assert c["dominated"] == 0 and back["dominated"] == 0 and back["other_points"] == 2
    single = rp.compare_fronts([_p(0.5, 2.0)], [_p(0.0, 3.0), _p(1.0, 1.0)])
    assert single["overlap"] == [0.5, 0.5] and single["max_diff"] == pytest.approx(0.0) and single["met"]


def _g(setting, lr, loss, f=0.5):
    return {"setting": setting, "lr": lr, "avg_domain_loss": {"mean": loss}, "forgetting": {"mean": f}}


def test_figure2_lr_choice_is_the_loss_closest_to_ffts_best():
    groups = {"fft": [_g("fft", 1e-4, 3.5), _g("fft", 3e-4, 3.2), _g("fft", 1e-3, 3.1)],
              "esft_gate": [_g("esft_gate", 1e-4, 3.6), _g("esft_gate", 3e-4, 3.4), _g("esft_gate", 1e-3, 3.3)],
              "esft_token": [_g("esft_token", 1e-4, 3.5), _g("esft_token", 3e-4, 3.35), _g("esft_token", 1e-3, 3.25)],
              "desmoe": [_g("desmoe", 1e-4, 3.4), _g("desmoe", 3e-4, 3.12), _g("desmoe", 1e-3, 3.05)]}
    assert rp.best_lr_group(groups["desmoe"])["lr"] == 1e-3
    assert rp.better_esft(groups) == "esft_token"
    c = rp.figure2_choice(groups)
    assert {r: (v["setting"], v["lr"]) for r, v in c.items()} == {
        "fft": ("fft", 1e-3), "esft": ("esft_token", 1e-3), "desmoe": ("desmoe", 3e-4)}
    assert c["desmoe"]["distance"] == pytest.approx(0.02)
    # a tie goes to the lower LR; without fft nothing is chosen
    assert rp.closest_lr_group([_g("d", 1e-3, 3.2), _g("d", 1e-4, 3.0)], 3.1)["lr"] == 1e-4
    assert rp.figure2_choice({"desmoe": groups["desmoe"]}) == {}
    assert rp.better_esft({"fft": groups["fft"]}) is None


def test_time_to_target_from_the_periodic_evaluation():
    r = _run("x", "desmoe", 1e-3, 1, [(2, {"a": 4.0, "b": 4.0}, 9.5), (4, {"a": 3.0, "b": 3.0}, 9.6),
                                      (6, {"a": 2.0, "b": 2.0}, 9.7)], step_time=0.5)
    curve = rp.eval_curve(r["eval"], r["metrics"], ["a", "b"])
    assert [(p["step"], p["train_s"], p["avg_loss"]) for p in curve] == [(0, 0.0, 5.0), (2, 1.0, 4.0),
                                                                         (4, 2.0, 3.0), (6, 3.0, 2.0)]
    assert rp.time_to_target(curve, 3.5) == {"step": 4, "train_s": 2.0}
    assert rp.time_to_target(curve, 5.0) == {"step": 2, "train_s": 1.0}  # step 0 (the base model) never counts
    assert rp.time_to_target(curve, 1.0) is None
    slow = _run("y", "desmoe", 1e-3, 2, [(2, {"a": 4.0, "b": 4.0}, 9.5), (4, {"a": 3.8, "b": 3.8}, 9.6),
                                         (6, {"a": 3.4, "b": 3.4}, 9.7)], step_time=1.0)
    g = rp.group_time_to_target([r, slow], 3.5)
    assert g["reached"] and g["reached_seeds"] == 2 and g["step"] == pytest.approx(5.0)
    assert g["train_s"] == pytest.approx((2.0 + 6.0) / 2)
    g = rp.group_time_to_target([r, slow], 3.2)
    assert not g["reached"] and g["reached_seeds"] == 1 and g["train_s"] == pytest.approx(2.0)
    assert rp.mean_curve(g["curves"])[1] == (2, pytest.approx(1.5), pytest.approx(4.0), 4.0, 4.0)
    assert rp.mean_curve(g["curves"])[2] == (4, pytest.approx(3.0), pytest.approx(3.4), 3.0, 3.8)
    assert rp.holdout_curve(r["eval"], r["metrics"]) == [(0, 9.0), (2, 9.5), (4, 9.6), (6, 9.7)]


def test_overhead_compares_the_same_steps_per_phase():
    fft = _rows([("a", 1.0)] * 6, step_time=0.1)
    des = _rows([("a", 1.0)] * 3, step_time=0.2, phase="warmup") + [
        dict(r, step=r["step"] + 3) for r in _rows([("a", 1.0)] * 3, step_time=0.05, phase="consolidation")]
    out = rp.overhead_stats([fft], [des], skip=1)
    assert out["steps"] == 5
    assert out["warmup"]["ratio"] == pytest.approx(2.0) and out["warmup"]["steps"] == [2, 3]
    assert out["consolidation"]["ratio"] == pytest.approx(0.5)
    # several runs pool: the median over every run's time of each step
    slow = [dict(r, step_time_s=0.3) for r in fft]
    out = rp.overhead_stats([fft, slow, slow], [des], skip=1)
    assert out["warmup"]["fft_s"] == pytest.approx(0.3) and out["warmup"]["ratio"] == pytest.approx(2 / 3)


def test_task_scores_in_percent():
    res = {"math": {"exact_match": 0.5, "loss": 1.0, "examples": []}, "summary": {"chrf": 30.0}}
    heads = rp.headline_metrics([{"domain": "math", "metrics": ["exact_match"]},
                                 {"domain": "summary", "metrics": ["chrf"]}], ["math", "summary"])
    assert heads == {"math": "exact_match", "summary": "chrf"}
    assert rp.task_scores(res, heads) == {"math": 50.0, "summary": 30.0}  # exact match x 100, chrF as it is
    assert rp.task_scores(None, heads) is None
    assert rp.task_scores({"math": {"loss": 1.0}}, heads) is None


def _sweep_runs(plan):
    """Hand-made finished runs of a 2-LR, 2-seed sweep on domains a, b (6 steps, evaluations at 2, 4, final 6).

    fft: lr 1: loss 3.0 / F 1.0 (best), lr 2: loss 3.5 / F 0.5; desmoe: lr 1: loss 3.05 / F 0.1 (within 2% of
    fft's best with F <= 0.2 x fft's), lr 2: 3.6 / 0.05; esft_gate: 3.4 / 0.3 and 3.8 / 0.08."""
    table = {"fft": {1.0: (3.0, 1.0, 6), 2.0: (3.5, 0.5, 6)}, "desmoe": {1.0: (3.05, 0.1, 2), 2.0: (3.6, 0.05, 4)},
             "esft_gate": {1.0: (3.4, 0.3, 6), 2.0: (3.8, 0.08, 6)}}
    runs = {}
    for seed, jitter in ((1, -0.01), (2, 0.01)):
        for s, by_lr in table.items():
            for lr, (loss, f, at) in by_lr.items():
                name = rp.run_name(s, lr, seed, 2)
                evals = [(st, dict.fromkeys(("a", "b"), loss + jitter if st == at else loss + 1.0), 9.0 + f)
                         for st in (2, 4, 6)]
                runs[name] = _run(name, s, lr, seed, evals, phase="warmup" if s == "desmoe" else "full")
    return runs


def test_analysis_of_a_hand_made_sweep_with_a_failed_run(tmp_path):
    plan = dict(rp.PLANS["quick"], domains=["a", "b"], domain_counts=[1, 2], modes=["fft", "desmoe", "esft_gate"],
                lrs=[1.0, 2.0], mode_lrs={}, seeds=[1, 2], variants={}, skip_steps=0)
    runs = _sweep_runs(plan)
    bad = rp.run_name("esft_gate", 2.0, 2, 2)
    runs[bad] = {k: runs[bad][k] for k in ("name", "setting", "mode", "lr", "seed", "domains", "stage", "log")}
    runs[bad].update(status="failed", error="desmoe train exited 1")
    runs["desmoe_lr2e0_s2_d2"]["status"] = "missing"
    res = rp.analyse(plan, runs)
    sw = res["sweep"]
    assert res["status"]["counts"] == {"ok": 10, "failed": 1, "missing": 1}
    assert res["status"]["failed"] == [{"name": bad, "log": f"/x/{bad}.log", "error": "desmoe train exited 1"}]
    fft = {g["lr"]: g for g in sw["by_setting"]["fft"]}
    assert fft[1.0]["avg_domain_loss"]["mean"] == pytest.approx(3.0) and fft[1.0]["seeds"] == [1, 2]
    assert fft[1.0]["avg_domain_loss"]["min"] == pytest.approx(2.99)
    assert fft[1.0]["forgetting"]["mean"] == pytest.approx(1.0)
    assert sw["fft_best"]["lr"] == 1.0 and sw["best_lr"] == {"fft": 1.0, "desmoe": 1.0, "esft_gate": 1.0}
    assert [g["seeds"] for g in sw["by_setting"]["esft_gate"]] == [[1, 2], [1]]
    assert [g["seeds"] for g in sw["by_setting"]["desmoe"]] == [[1, 2], [1]]
    assert [p["lr"] for p in sw["fronts"]["fft"]] == [2.0, 1.0]
    assert sw["figure2_choice"]["desmoe"]["lr"] == 1.0 and sw["better_esft"] == "esft_gate"
    t = {x["name"][:3]: x for x in res["targets"]}
    assert t["(a)"]["met"] is True and t["(a)"]["measured"] == pytest.approx(0.1)
    bs = [x for x in res["targets"] if x["name"].startswith("(b)")]
    # fft's F range [0.5, 1.0] and desmoe's [0.05, 0.1] do not overlap; esft_gate's [0.08, 0.3] does; no esft_token,
    # no lora
    assert [x["met"] for x in bs] == [None, True, None, None]
    c = sw["front_comparison"]["desmoe vs esft_gate"]
    assert c["overlap"] == [pytest.approx(0.08), pytest.approx(0.1)]
    # the larger difference is at F 0.08 (desmoe's lr 2 has seed 1 only: loss 3.59): 3.59 + 0.6 x (3.05 - 3.59) - 3.79
    assert c["max_diff"] == pytest.approx(3.59 + 0.6 * (3.05 - 3.59) - 3.79)
    # time to target: fft's best x 1.02 = 3.06; fft reaches it at its final step, desmoe (lr 1) at step 2
    ttt = res["time_to_target"]
    assert ttt["target_avg_loss"] == pytest.approx(3.06)
    assert ttt["settings"]["fft"]["step"] == 6 and ttt["settings"]["desmoe"]["step"] == 2
    assert ttt["settings"]["desmoe"]["time_ratio_to_fft"] == pytest.approx(2 / 6)
    assert t["(c)"]["met"] is True
    assert res["overhead"]["step_time"]["warmup"]["ratio"] == pytest.approx(1.0)
    assert res["figure2"]["forgetting"]["fft"][1]["mean"] == pytest.approx(1.0)  # all domains: the sweep's
    assert res["figure2"]["forgetting"]["fft"][0] is None  # 1 domain: not run
    # the report and the plots are written from it
    out = tmp_path / "out"
    out.mkdir()
    res.update(plan_name="test", command="x", machine={"cpus": 2, "platform": "p", "torch": "t"}, nproc=2,
               plan=plan, planned_runs=12, holdout_sequences=8, holdout={"builtin": "general"}, reused_runs=[],
               analyse_only=True, timing={"total_s": 1.0, "runs_s": 0.0, "estimate_s": 0.0},
               base_model={"dir": "d", "recipe": "r", "steps": 1, "train_rows": 1, "epochs": 1.0,
                           "pretrain_time_s": 1.0, "domain_fraction": 0.1, "holdout_rows": 8, "seq_len": 128,
                           "unigram_holdout_loss": 6.0, "holdout_loss": 5.0, "parameters": 1e6, "experts": 8,
                           "top_k": 2},
               base_model_recipe={"curve": []})
    res["plots"] = [os.path.basename(f) for f in rp.write_plots(res, str(out))]
    assert set(res["plots"]) == {"pareto.png", "domain_losses.png", "forgetting_vs_domains.png",
                                 "time_to_target.png", "step_time.png"}
    rp.write_report(res, str(out / "report.md"))
    report = (out / "report.md").read_text()
    assert "**Failed runs**" in report and bad in report and "**Incomplete**" in report
    for name in res["plots"]:
        assert f"({name})" in report


def test_aggregate_and_figure_inputs_carry_the_spread_over_seeds():
    """domain_losses.png: (seed mean, min, max) per domain, avg and holdout; time_to_target.png: (train_s, mean,
    min, max) per evaluation; step_time.png: (pooled median, min, max of the runs' own medians), ms."""
    plan = dict(rp.PLANS["quick"], domains=["a", "b"], domain_counts=[2], modes=["fft", "desmoe", "esft_gate"],
                lrs=[1.0, 2.0], mode_lrs={}, seeds=[1, 2], variants={}, skip_steps=0)
    runs = _sweep_runs(plan)
    runs[rp.run_name("fft", 1.0, 2, 2)]["eval"]["after"]["a"]["loss"] = 2.5  # seed 2's best: a 2.5, b 3.01
    res = rp.analyse(plan, runs)
    sw = res["sweep"]
    g = next(g for g in sw["by_setting"]["fft"] if g["lr"] == 1.0)
    assert g["loss"]["a"] == pytest.approx((2.99 + 2.5) / 2)
    a = g["loss_stats"]["a"]
    assert (a["mean"], a["min"], a["max"], a["n"]) == (pytest.approx(2.745), 2.5, pytest.approx(2.99), 2)
    assert a["std"] == pytest.approx(math.sqrt(2 * 0.245 ** 2))
    bars = rp.domain_loss_bars(sw, plan["domains"])
    assert bars["base"] == [5.0, 5.0, 5.0, 9.0]  # one evaluation: no spread
    fft = bars["fft @ 1e0"]
    assert fft[0] == (pytest.approx(2.745), 2.5, pytest.approx(2.99))
    assert fft[1] == (pytest.approx(3.0), pytest.approx(2.99), pytest.approx(3.01))
    assert fft[2] == (pytest.approx(2.8725), pytest.approx(2.755), pytest.approx(2.99))  # avg of a, b per seed
    assert fft[3] == (pytest.approx(10.0), pytest.approx(10.0), pytest.approx(10.0))  # holdout
    lines = rp.time_to_target_lines(res["time_to_target"])
    assert set(lines) == {"fft @ lr 1e0", "desmoe @ lr 1e0", "esft_gate @ lr 1e0"}
    # fft's curves: 5.0 before, 4.0 at steps 2 and 4, then 2.99 (seed 1) and 2.755 (seed 2) at step 6; 1 s per step
    assert lines["fft @ lr 1e0"] == [(0.0, 5.0, 5.0, 5.0), (2.0, pytest.approx(4.0), 4.0, 4.0),
                                     (4.0, pytest.approx(4.0), 4.0, 4.0),
                                     (6.0, pytest.approx(2.8725), pytest.approx(2.755), pytest.approx(2.99))]
    o = res["overhead"]["step_time"]
    assert o["all"]["fft_runs_s"] == [1.0, 1.0, 1.0, 1.0] and len(o["all"]["other_runs_s"]) == 4
    phases = [p for p in o if isinstance(o[p], dict)]
    assert rp.step_time_bars(o, phases)["fft"] == [(1000.0, 1000.0, 1000.0)] * len(phases)
    assert rp.step_time_bars({"all": {"fft_s": 0.1, "other_s": 0.2}}, ["all"]) == {"fft": [100.0], "desmoe": [200.0]}


def test_plots_are_png(tmp_path):
    from benchmarks._plots import bar_chart, line_chart, pareto_chart

    for band in (None, True):
        line_chart(str(tmp_path / "l.png"), {"fft": [(2, 0.1, 0.05, 0.2), (3, 0.3, 0.2, 0.4)],
                                             "desmoe": [(2, 0.0), (3, 0.05)]},
                   title="t", xlabel="x", ylabel="y", hlines={"zero": 0.0}, integer_x=True, band=band)
    bar_chart(str(tmp_path / "b.png"), ["a", "b"], {"fft": [1.0, (2.0, 1.5, 2.5)], "desmoe": [1.5, None]}, title="t",
              ylabel="y", xlabel="x")
    pareto_chart(str(tmp_path / "p.png"), {"fft": {"points": [(0.5, 3.0, (0.4, 0.6), (2.9, 3.1), "1e-3")],
                                                   "front": [(0.5, 3.0)]}, "none": {"points": [], "front": []}},
                 title="t", xlabel="x", ylabel="y", hlines={"target": 3.1}, extra_points={"base": (0.0, 4.0)})
    for f in ("l.png", "b.png", "p.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / f) > 1000
