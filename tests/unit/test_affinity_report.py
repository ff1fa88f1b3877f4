"""desmoe.affinity_report's figures (heatmaps of one affinity update, the evolution over a run) and
desmoe.rundir's FigureWriter, which draws the heatmaps in a child process during training."""

import io
import json
import os

import pytest
from PIL import Image

from desmoe import rundir
from desmoe.affinity_report import (EVOLUTION_FILE, evolution_summary, figure_worker, jaccard, load_records,
                                    plot_evolution, save_affinity_heatmaps)

PNG = b"\x89PNG\r\n\x1a\n"


def _record(step=20, n_layers=2, n_domains=2, n_experts=8):
    """A synthetic desmoe.method record: affinity in [0, 1) with one "no estimate" row (-1), and experts
    selected where the affinity is at least 0.5."""
    aff = [[[-1.0 if (li, d) == (0, 1) else ((li + 3 * d + 5 * e) % 10) / 10 for e in range(n_experts)]
            for d in range(n_domains)] for li in range(n_layers)]
    return {"step": step, "domains": [f"domain{d}" for d in range(n_domains)],
            "layers": [2 * li + 1 for li in range(n_layers)], "affinity": aff,
            "masks": [[[int(a >= 0.5) for a in row] for row in layer] for layer in aff]}


def _size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


# ---- heatmaps of one update --------------------------------------------------------------------


def test_heatmaps_grow_with_the_grid(tmp_path):
    sizes = {}
    for n_domains, n_experts in ((2, 8), (2, 64), (32, 8), (32, 64)):
        path = str(tmp_path / f"d{n_domains}_e{n_experts}.png")
        save_affinity_heatmaps(_record(n_domains=n_domains, n_experts=n_experts), path)
        sizes[n_domains, n_experts] = _size(path)
    assert os.listdir(tmp_path) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    w, h = zip(*sizes.values())
    assert sizes[2, 64][0] > sizes[2, 8][0] and sizes[32, 64][0] > sizes[32, 8][0]  # more experts: wider
    assert sizes[32, 8][1] > sizes[2, 8][1] and sizes[32, 64][1] > sizes[2, 64][1]  # more domains: taller
    assert sizes[32, 64][0] * sizes[32, 64][1] == max(a * b for a, b in zip(w, h))


def test_heatmaps_of_a_record_without_any_estimate(tmp_path):
    rec = _record(n_layers=1)
    rec["affinity"] = [[[-1.0] * 8, [float("nan")] * 8]]
    save_affinity_heatmaps(rec, str(tmp_path / "none.png"))
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG


# ---- the background writer ---------------------------------------------------------------------


def test_writer_writes_every_submitted_figure_and_close_waits_for_them(tmp_path):
    figures = rundir.FigureWriter()
    for step in (5, 10, 15):
        rundir.write_affinity(str(tmp_path), _record(step=step), figures)
    folder = tmp_path / rundir.AFFINITY_DIR
    # write_affinity returned with the JSON written; the child process is still importing matplotlib
    assert sorted(os.listdir(folder)) == ["step000005.json", "step000010.json", "step000015.json"]
    assert figures.close() == []
    assert sorted(f for f in os.listdir(folder) if f.endswith(".png")) == [
        "step000005.png", "step000010.png", "step000015.png"]
    assert all((folder / f"step{s:06d}.png").read_bytes()[:8] == PNG for s in (5, 10, 15))
    assert figures.close() == []  # again: nothing to do
    rundir.write_affinity(str(tmp_path), _record(step=20), figures)  # usable after close (a new child)
    rundir.write_affinity(str(tmp_path), _record(step=20), figures)  # the same step again (a resumed run)
    figures.join()
    assert (folder / "step000020.png").read_bytes()[:8] == PNG
    figures.close()


def test_a_figure_that_fails_is_reported_once_and_training_goes_on(tmp_path):
    warnings = []
    figures = rundir.FigureWriter(warn=warnings.append)
    for step in (5, 10):
        bad = _record(step=step)
        bad["affinity"] = [[["not a number"]]]
        rundir.write_affinity(str(tmp_path), bad, figures)  # does not raise
    rundir.write_affinity(str(tmp_path), _record(step=15), figures)
    failures = figures.close()
    folder = tmp_path / rundir.AFFINITY_DIR
    assert [os.path.basename(p) for p, _ in failures] == ["step000005.png", "step000010.png"]
    assert failures[1][1].startswith("ValueError: could not convert string to float")
    assert len(warnings) == 1 and "step000005.png" in warnings[0] and "its JSON record is complete" in warnings[0]
    assert sorted(os.listdir(folder)) == ["step000005.json", "step000010.json", "step000015.json",
                                          "step000015.png"]
    assert json.loads((folder / "step000010.json").read_text())["step"] == 10


def test_a_figure_process_that_dies_fails_its_pending_figures(tmp_path):
    warnings = []
    figures = rundir.FigureWriter(warn=warnings.append)
    rundir.write_affinity(str(tmp_path), _record(step=5), figures)
    figures._proc.kill()
    figures.join()  # returns: the reader saw the child end
    rundir.write_affinity(str(tmp_path), _record(step=10), figures)  # the child is gone: fails, does not raise
    failures = figures.close()
    assert [os.path.basename(p) for p, _ in failures] == ["step000005.png", "step000010.png"]
    assert "ended (exit code -9)" in failures[0][1] and "not running" in failures[1][1] and len(warnings) == 1
    rundir.write_affinity(str(tmp_path), _record(step=15), figures)  # close() then a new child
    assert len(figures.close()) == 2 and (tmp_path / rundir.AFFINITY_DIR / "step000015.png").is_file()


def test_figure_worker_answers_each_line(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_record()))
    bad.write_text("{")
    out = io.StringIO()
    figure_worker([json.dumps([str(good), str(tmp_path / "good.png")]) + "\n",
                   json.dumps([str(bad), str(tmp_path / "bad.png")]) + "\n"], out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert answers[0] == [str(tmp_path / "good.png"), None] and answers[1][0] == str(tmp_path / "bad.png")
    assert answers[1][1].startswith("JSONDecodeError") and not (tmp_path / "bad.png").exists()


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def disk_full(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(PNG[:4])
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_affinity_heatmaps(_record(), str(tmp_path / "step000020.png"))
    assert os.listdir(tmp_path) == []


# ---- evolution over a run ----------------------------------------------------------------------


def _write_run(run_dir, selections, steps=(10, 20, 30), n_experts=4):
    """affinity/step*.json of a run with 1 layer, domains a, b, c: selections[s][d] = experts selected."""
    folder = run_dir / rundir.AFFINITY_DIR
    folder.mkdir(parents=True)
    for step, sets in zip(steps, selections):
        masks = [[[int(e in s) for e in range(n_experts)] for s in sets]]
        rec = {"step": step, "domains": ["a", "b", "c"], "layers": [3], "masks": masks,
               "affinity": [[[0.5] * n_experts for _ in sets]]}
        (folder / f"step{step:06d}.json").write_text(json.dumps(rec))


SELECTIONS = [
    [{0, 1}, {1, 2}, {3}],      # step 10
    [{0, 1, 2}, {2}, {3}],      # step 20
    [{0}, {2, 3}, {3}],         # step 30: the final sets
]


def _flat(rows):
    return [v for row in rows for v in row]


def test_evolution_summary_by_hand(tmp_path):
    _write_run(tmp_path, SELECTIONS)
    s = evolution_summary(str(tmp_path))
    assert s["steps"] == [10, 20, 30] and s["domains"] == ["a", "b", "c"] and s["layers"] == [3]
    assert s["num_experts"] == 4 and len(s["records"]) == 3
    assert s["selected"][0] == [[[0, 1], [0, 1, 2], [0]], [[1, 2], [2], [2, 3]], [[3], [3], [3]]]
    assert s["set_size"][0] == [[2, 3, 1], [2, 1, 2], [1, 1, 1]]
    # Jaccard with the final set: a {0}: {0,1} 1/2, {0,1,2} 1/3; b {2,3}: {1,2} 1/3, {2} 1/2; c always {3}
    assert _flat(s["jaccard_to_final"][0]) == pytest.approx(_flat([[1 / 2, 1 / 3, 1], [1 / 3, 1 / 2, 1], [1, 1, 1]]))
    # step 10: a-b 1/3, a-c 0, b-c 0; step 20: a-b 1/3, a-c 0, b-c 0; step 30: a-b 0, a-c 0, b-c 1/2
    assert _flat(s["mean_jaccard_to_others"][0]) == pytest.approx(_flat([[1 / 6, 1 / 6, 0], [1 / 6, 1 / 6, 1 / 4],
                                                                         [0, 0, 1 / 4]]))
    assert all(v == 1.0 for layer in s["jaccard_to_final"] for dom in layer for v in dom[-1:])


def test_plot_evolution_writes_the_figure_beside_the_records(tmp_path):
    _write_run(tmp_path, SELECTIONS)
    path = plot_evolution(str(tmp_path))
    assert path == str(tmp_path / rundir.AFFINITY_DIR / EVOLUTION_FILE)
    w, h = _size(path)
    assert w > 800 and h > 300
    other = plot_evolution(str(tmp_path), str(tmp_path / "evo.png"))
    assert other == str(tmp_path / "evo.png") and (tmp_path / "evo.png").read_bytes()[:8] == PNG
    assert load_records(str(tmp_path))[-1]["step"] == 30  # evolution.png is not taken for a record


def test_plot_evolution_of_one_update_and_one_domain(tmp_path):
    folder = tmp_path / rundir.AFFINITY_DIR
    folder.mkdir()
    rec = {"step": 5, "domains": ["math"], "layers": [0], "affinity": [[[0.2, 0.8]]], "masks": [[[0, 1]]]}
    (folder / "step000005.json").write_text(json.dumps(rec))
    s = evolution_summary(str(tmp_path))
    assert s["jaccard_to_final"] == [[[1.0]]] and s["mean_jaccard_to_others"] == [[[None]]]
    assert _size(plot_evolution(str(tmp_path)))[0] > 0


def test_jaccard_of_empty_sets():
    assert jaccard(set(), set()) == 1.0 and jaccard({1}, set()) == 0.0 and jaccard({1, 2}, {2, 3}) == 1 / 3


def test_evolution_of_a_run_without_records(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no affinity/step\\*.json"):
        plot_evolution(str(tmp_path))
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"run directory {missing} does not exist"):
        evolution_summary(missing)


def test_evolution_of_records_that_do_not_belong_together(tmp_path):
    _write_run(tmp_path, SELECTIONS)
    bad = tmp_path / rundir.AFFINITY_DIR / "step000040.json"
    bad.write_text(json.dumps({"step": 40, "domains": ["a", "b"], "layers": [3], "masks": [[[1, 0, 0, 0]] * 2]}))
    with pytest.raises(ValueError, match="step000040.json has domains \\['a', 'b'\\]") as e:
        evolution_summary(str(tmp_path))
    assert "\n" not in str(e.value)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"step000040.json is not an affinity record of {tmp_path}"):
        plot_evolution(str(tmp_path))
    bad.write_text(json.dumps({"step": 40, "domains": ["a"]}))
    with pytest.raises(ValueError, match="KeyError"):
        evolution_summary(str(tmp_path))
