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


def test_every_planned_run_config_is_a_valid_desmoe_config(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    for plan_name, plan in rp.PLANS.items():
        runs = rp.plan_runs(plan)
        names = [n for n, _, _ in runs]
        assert len(names) == len(set(names))
        n_all = len(plan["domains"])
        assert {rp.run_name(m, n_all) for m in rp.TABLE_MODES} <= set(names)
        assert {rp.run_name(m, n) for m in plan["forgetting_modes"] for n in plan["domain_counts"]} <= set(names)
        repeats = {rp.repeat_name(m, n_all, r) for m in rp.CURVE_MODES for r in range(2, plan["repeats"] + 1)}
        assert set(names[len(names) - len(repeats):]) == repeats  # the repeats run last
        assert len(names) == len(rp.TABLE_MODES) + len(plan["forgetting_modes"]) * (
            len(plan["domain_counts"]) - 1) + len(rp.CURVE_MODES) * (plan["repeats"] - 1)
        base = {"dir": str(tmp_path), "info": {"finetune": {"seq_len": 128, "holdout_sequences": 32,
                                                            "max_examples": {d: 100 for d in pb.DOMAINS}}}}
        for name, mode, domains in runs:
            cfg = config_from_dict(rp.run_config(plan, base, name=name, mode=mode, domains=domains,
                                                 out_dir=str(tmp_path / name), nproc=2))
            validate(cfg, world_size=2)
            assert cfg.train.max_steps == plan["steps_per_domain"] * len(domains)
            assert cfg.data.holdout.builtin == "general" and list(cfg.data.domains) == domains


def _rows(losses_by_step, step_time=1.0, phase="full"):
    return [{"step": s, "domain": d, "loss": l, "elapsed_s": s * step_time + 100, "step_time_s": step_time,
             "phase": phase} for s, (d, l) in enumerate(losses_by_step, start=1)]


def test_smoothed_curve_and_time_to_target():
    rows = _rows([("a", 4.0), ("b", 6.0), ("a", 2.0), ("b", 4.0), ("a", 2.0)])
    curve = rp.smoothed_curve(rows, ["a", "b"], k=2)
    assert [p["step"] for p in curve] == [2, 3, 4, 5]  # from the step every domain has a loss
    assert curve[0]["avg_loss"] == pytest.approx(5.0)  # (4 + 6) / 2
    assert curve[1]["avg_loss"] == pytest.approx((3.0 + 6.0) / 2)
    assert curve[3]["avg_loss"] == pytest.approx((2.0 + 5.0) / 2)
    # training seconds are the summed step times, not elapsed_s (which counts evaluations too)
    assert rp.time_to_target(curve, 4.5) == {"step": 3, "train_s": 3.0}
    assert rp.time_to_target(curve, 1.0) is None


def test_eval_curve_reads_before_history_and_after():
    rows = _rows([("a", 1.0)] * 4, step_time=0.5)

    def res(a, b):
        return {"a": {"loss": a}, "b": {"loss": b}, "holdout": {"loss": 9.0}}

    ev = {"before": res(4.0, 6.0), "history": [{"step": 2, "results": res(3.0, 5.0)}], "after": res(2.0, 2.0)}
    assert rp.eval_curve(ev, rows, ["a", "b"]) == [{"step": 0, "train_s": 0.0, "avg_loss": 5.0},
                                                   {"step": 2, "train_s": 1.0, "avg_loss": 4.0},
                                                   {"step": 4, "train_s": 2.0, "avg_loss": 2.0}]
    assert rp.eval_curve(None, rows, ["a"]) == []
    assert rp.holdout_curve(ev, rows) == [(0, 9.0), (2, 9.0), (4, 9.0)]


def test_overhead_compares_the_same_steps_per_phase():
    fft = _rows([("a", 1.0)] * 6, step_time=0.1)
    des = _rows([("a", 1.0)] * 3, step_time=0.2, phase="warmup") + [
        dict(r, step=r["step"] + 3) for r in _rows([("a", 1.0)] * 3, step_time=0.05, phase="consolidation")]
    out = rp.overhead_stats([fft], [des], skip=1)
    assert out["steps"] == 5
    assert out["warmup"]["ratio"] == pytest.approx(2.0) and out["warmup"]["steps"] == [2, 3]
    assert out["consolidation"]["ratio"] == pytest.approx(0.5)
    # repeats pool: the median over both runs' times of each step
    slow = [dict(r, step_time_s=0.3) for r in fft]
    out = rp.overhead_stats([fft, slow, slow], [des], skip=1)
    assert out["warmup"]["fft_s"] == pytest.approx(0.3) and out["warmup"]["ratio"] == pytest.approx(2 / 3)


def test_forgetting_and_task_scores():
    summary = {"eval_loss_before": {"holdout": 3.0}, "eval_loss_after": {"holdout": 3.25}}
    assert rp.forgetting(summary) == pytest.approx(0.25)
    ev = {"before": {"math": {"exact_match": 0.0}, "summary": {"chrf": 10.0}},
          "after": {"math": {"exact_match": 0.5, "loss": 1.0, "examples": []}, "summary": {"chrf": 30.0}}}
    heads = rp.headline_metrics([{"domain": "math", "metrics": ["exact_match"]},
                                 {"domain": "summary", "metrics": ["chrf"]}], ["math", "summary"])
    assert heads == {"math": "exact_match", "summary": "chrf"}
    # in percent: exact match x 100, chrF as it is
    assert rp.task_scores(ev, "after", heads) == {"math": 50.0, "summary": 30.0}
    assert rp.task_scores(ev, "before", heads) == {"math": 0.0, "summary": 10.0}
    assert rp.task_scores(None, "after", heads) is None
    assert rp.task_scores({"after": {"math": {"loss": 1.0}}}, "after", heads) is None


def test_plots_are_png(tmp_path):
    from benchmarks._plots import bar_chart, line_chart

    line_chart(str(tmp_path / "l.png"), {"fft": [(2, 0.1), (3, 0.3)], "desmoe": [(2, 0.0), (3, 0.05)]},
               title="t", xlabel="x", ylabel="y", hlines={"zero": 0.0})
    bar_chart(str(tmp_path / "b.png"), ["a", "b"], {"fft": [1.0, 2.0], "desmoe": [1.5, None]}, title="t", ylabel="y")
    for f in ("l.png", "b.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / f) > 1000
