"""benchmarks/scaling.py's analysis on hand-made run directories."""

import json

import pytest

from benchmarks import scaling


def _run(tmp_path, name, *, before, after, masks=None, esft=None):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"eval_before": before, "eval_after": after, "train_time_s": 1.0}))
    if masks is not None:
        (d / "affinity").mkdir()
        (d / "affinity" / "step000010.json").write_text(json.dumps({"masks": [[[1, 1, 0, 0], [0, 0, 1, 1]]]}))
        (d / "affinity" / "step000020.json").write_text(json.dumps({"masks": masks}))
    if esft is not None:
        (d / "esft_selection.json").write_text(json.dumps({"selected": esft}))
    return str(d)


def _evals(loss_a, loss_b, holdout):
    return {"a": {"loss": loss_a}, "b": {"loss": loss_b}, "holdout": {"loss": holdout}}


def test_points_read_losses_forgetting_and_the_last_selection(tmp_path):
    # the last record counts: domain a has experts {0, 1, 2}, b {2, 3} -> Jaccard 1/4
    d = _run(tmp_path, "desmoe", before=_evals(3.0, 4.0, 2.0), after=_evals(2.0, 3.0, 2.5),
             masks=[[[1, 1, 1, 0], [0, 0, 1, 1]]])
    p = scaling.run_point(d, ["a", "b"])
    assert p["avg_domain_loss_before"] == 3.5 and p["avg_domain_loss"] == 2.5 and p["forgetting"] == 0.5
    assert p["selection"] == {"experts_per_domain_mean": 2.5, "experts_per_domain_max": 3,
                              "overlap_jaccard_mean": 0.25}
    e = _run(tmp_path, "esft", before=_evals(3.0, 4.0, 2.0), after=_evals(2.0, 3.0, 2.1),
             esft={"a": [[0, 1]], "b": [[0, 1]]})
    assert scaling.run_point(e, ["a", "b"])["selection"]["overlap_jaccard_mean"] == 1.0
    f = _run(tmp_path, "fft", before=_evals(3.0, 4.0, 2.0), after=_evals(2.0, 3.0, 3.0))
    assert scaling.run_point(f, ["a", "b"])["selection"] is None


def test_flatness_is_the_ratio_of_the_last_count_to_the_first():
    rows = []
    for mode, fs in (("fft", {2: [0.1, 0.1], 8: [0.3, 0.3]}), ("desmoe", {2: [0.10, 0.12], 8: [0.115, 0.115]})):
        for n, vals in fs.items():
            for s, v in enumerate(vals):
                rows.append({"mode": mode, "n": n, "seed": s, "point": {"forgetting": v, "avg_domain_loss": 1.0,
                                                                       "selection": None}})
    rows.append({"mode": "fft", "n": 8, "seed": 9, "error": "failed"})  # a failed run counts for nothing
    res = scaling.analyse(rows, [2, 8], ["fft", "desmoe"])
    assert res["table"]["fft"][8]["forgetting"]["n"] == 2
    assert res["flat"]["fft"] == {"ratio_last_to_first": pytest.approx(3.0), "flat": False}
    assert res["flat"]["desmoe"]["ratio_last_to_first"] == pytest.approx(0.115 / 0.11)
    assert res["flat"]["desmoe"]["flat"] is True


def test_best_lrs_come_from_the_committed_sweep():
    lrs = scaling.best_lrs()
    assert list(lrs) == ["fft", "esft_token", "desmoe"] and lrs == {"fft": 3e-4, "esft_token": 3e-3, "desmoe": 3e-3}


def test_steps_per_domain_grows_the_run_with_the_domain_count():
    import argparse

    fixed = argparse.Namespace(steps=150, steps_per_domain=None)
    fig2 = argparse.Namespace(steps=150, steps_per_domain=25)
    assert [scaling.steps_for(fixed, n) for n in (2, 32)] == [150, 150]
    assert [scaling.steps_for(fig2, n) for n in (2, 4, 32)] == [50, 100, 800]
    text = scaling.steps_text({"steps": 150, "steps_per_domain": 25, "counts": [2, 32]})
    assert "25 steps per domain (2: 50, 32: 800 steps" in text
    assert scaling.steps_text({"steps": 150, "steps_per_domain": None, "counts": [2]}).startswith("150 steps at every")
