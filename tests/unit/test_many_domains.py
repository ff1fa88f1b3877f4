"""Many domains: the built-in sub-domains (desmoe.data.builtin_many, MANY_DOMAINS) are real, distinct and each
has a held-out split and its parent's metric; and nothing in desmoe assumes few domains: the affinity
counts, EMA, selection and state at 64 domains x 64 experts, the heatmaps, the ``desmoe affinity`` report,
the MLflow metric names and count per step, the method's checkpoint state and the sampler at 64
(synthetic) domains d00..d63. benchmarks/many_domains_cost.py has the timings."""

import ast
import hashlib
import io
import json
import os
import pathlib
import random
import re
import time

import pytest
import torch
from PIL import Image

import desmoe.data.builtin_many as many
from desmoe import checkpoint, cli, rundir
from desmoe.affinity_report import FULL_OVERLAP_UP_TO, evolution_summary, format_report, load_latest_selection
from desmoe.config import ConfigError, config_from_dict, validate
from desmoe.data import (MANY_DOMAINS, ByteTokenizer, DomainData, DomainSampler, build_domain_data, builtin_parent,
                         builtin_source, domain_metrics)
from desmoe.data.builtin import (BUILTIN_DOMAINS, PARENT_DOMAINS, TASK_METRICS, _LOCALES, builtin_examples,
                                  builtin_segments)
from desmoe.method import DesMoE
from desmoe.models import build_tiny_model, moe_layer_indices
from desmoe.routing.affinity import DomainAffinity, compute_window_affinity, select_relative
from desmoe.steplog import StepLog, StepRecord
from desmoe.tracking import clean_key

PARENTS = ("math", "code", "law", "summary", "translation", "intent", "general")
D64 = [f"d{i:02d}" for i in range(64)]


@pytest.fixture(scope="module")
def subs():
    """Every sub-domain's examples (computed once)."""
    return {name: builtin_examples(name) for name in many.SEAMS}


# ---- the built-in sub-domains ------------------------------------------------------------------


def test_many_domains_is_a_fixed_interleaving_of_every_sub_domain():
    assert len(MANY_DOMAINS) >= 32 and len(set(MANY_DOMAINS)) == len(MANY_DOMAINS)
    assert set(MANY_DOMAINS) == set(many.SEAMS) and set(many.SEAMS) <= set(BUILTIN_DOMAINS)
    assert list(BUILTIN_DOMAINS)[:len(PARENTS)] == list(PARENTS) == list(PARENT_DOMAINS)  # the parents stay, first
    for name in MANY_DOMAINS:
        assert re.fullmatch(r"[a-z0-9_]+", name) and name.startswith(builtin_parent(name) + "_")
    # round-robin over the parents in first-appearance order, each in its own order
    order = list(dict.fromkeys(builtin_parent(n) for n in MANY_DOMAINS))
    queues = {p: [n for n in MANY_DOMAINS if builtin_parent(n) == p] for p in order}
    robin = []
    while any(queues.values()):
        robin += [queues[p].pop(0) for p in order if queues[p]]
    assert tuple(robin) == MANY_DOMAINS
    for n in (2, 4, 8, 16, 32):
        assert len({builtin_parent(d) for d in MANY_DOMAINS[:n]}) == min(n, 6)
    assert {s.parent for s in many.SEAMS.values()} == set(PARENTS) - {"general"}
    assert {k for n, s in many.SEAMS.items() if s.parent == "translation" for k in s.keys} == set(_LOCALES)


def test_sub_domains_are_parts_of_their_parents_disjoint_and_deterministic(subs):
    parents = {p: builtin_examples(p) for p in ("math", "intent", "translation", "law", "summary")}
    seen = {}
    for name, exs in subs.items():
        parent = builtin_parent(name)
        assert len(exs) >= many.MIN_EXAMPLES, (name, len(exs))
        assert TASK_METRICS[name] == TASK_METRICS[parent]
        assert builtin_source(name) and "\n" not in builtin_source(name)
        shape = str if parent in ("code", "law", "math") else tuple  # the parent's record shape
        assert all(type(e) is shape for e in exs), name
        if parent in parents:
            assert set(exs) <= set(parents[parent]), name  # a part of the parent corpus
        for e in exs:
            assert seen.setdefault(e, name) == name, (e, name, seen[e])  # no example in two sub-domains
    for parent in ("math", "translation"):  # these seams cut the whole parent (each example once)
        assert sum(len(subs[n]) for n in subs if builtin_parent(n) == parent) == len(set(parents[parent]))
    assert builtin_examples("code_argparse") == subs["code_argparse"]  # deterministic
    assert all(builtin_source(p) for p in PARENTS)


def test_sub_domains_cut_along_their_seams(subs):
    assert all("to German:" in p for p, _ in subs["translation_de"])
    assert all(json.loads(a)["intent"] == "order_food" for _, a in subs["intent_order_food"])
    assert all(" times " in t for t in subs["math_multiplication"])
    assert all(t.lstrip().startswith(("def ", "async def ")) for t in subs["code_ipaddress"])
    assert any("GNU General Public License" in t for t in subs["law_gpl"])
    assert not any("Lesser" in t for t in subs["law_gpl"][:20])


def test_generated_parents_stay_byte_for_byte():
    """math and intent depend on no installed file: their corpora are pinned (the seams only label them)."""
    digest = {n: hashlib.sha256(json.dumps(builtin_segments(n)).encode()).hexdigest() for n in ("math", "intent")}
    assert digest == {"math": "03ee0ebc02731cb0b9302672ea64e3e8672d380946875c50d5eae190fe69524d",
                      "intent": "2cff2f7ae30f4209ccae7884efadb99d6b8e919974760cec320d4c4aa414b317"}


def test_math_sub_domains_keep_the_answer_segment():
    for name in ("math", "math_word", "math_addition"):
        segs = builtin_segments(name)
        assert all(len(s) == 2 and s[0][0].endswith("\nAnswer:") and s[1][1] for s in segs[:50]), name
    assert builtin_segments("code_pprint")[0] == [(builtin_examples("code_pprint")[0], True)]


def test_every_real_sub_domain_holds_out_eval_rows_with_its_metric():
    names = MANY_DOMAINS
    cfg = config_from_dict({"model": {"tiny": {"model_type": "qwen3_moe"}},
                            "data": {"seq_len": 128, "domains": {n: {"builtin": n} for n in names}}})
    data, _ = build_domain_data(cfg.data, ByteTokenizer())
    for n in names:
        d = data[n]
        assert d.eval_ids.shape[0] == cfg.data.eval_sequences == 8, n  # the full default eval split
        assert d.train_ids.shape[0] >= 4 * d.eval_ids.shape[0], n
        assert d.metrics == TASK_METRICS[n] == domain_metrics(cfg.data.domains[n])
        assert d.metric == "token_accuracy" or d.eval_pairs, n


def test_unknown_or_missing_sub_domains_are_clear_errors(monkeypatch, tmp_path):
    def cfg(domains):
        return config_from_dict({"model": {"tiny": {"model_type": "qwen3_moe"}}, "data": {"domains": domains}})

    validate(cfg({n: {"builtin": n} for n in MANY_DOMAINS}))
    with pytest.raises(ConfigError, match="'translation_xx' is not a built-in corpus"):
        validate(cfg({"a": {"builtin": "translation_xx"}}))
    with pytest.raises(ValueError, match="'law_gpl' has 3 examples"):
        many.check_size("law_gpl", [1, 2, 3], "here")
    monkeypatch.setattr("desmoe.data.builtin._stdlib", lambda: str(tmp_path))
    monkeypatch.setattr("desmoe.data.builtin._LICENCES", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="argparse.py"):
        builtin_examples("code_argparse")
    with pytest.raises(FileNotFoundError, match="GPL-3"):
        builtin_examples("law_gpl")


def test_builtin_many_imports_nothing_of_desmoe():
    tree = ast.parse(pathlib.Path(many.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("desmoe")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("desmoe") for a in node.names)


# ---- affinity at 4 layers x 64 domains x 64 experts ----------------------------------------------


def _routing(seed, n_tokens=2048, n_domains=64, n_experts=64, k=8):
    """Synthetic routing where domain d prefers experts d .. d+7 (mod E)."""
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, n_domains, (n_tokens,), generator=g)
    near = (dom.unsqueeze(1) + torch.randint(0, 8, (n_tokens, k), generator=g)) % n_experts
    anywhere = torch.randint(0, n_experts, (n_tokens, k), generator=g)
    sel = torch.where(torch.rand(n_tokens, k, generator=g) < 0.8, near, anywhere)
    return sel, dom, torch.rand(n_tokens, k, generator=g)


@pytest.mark.parametrize("selection", DomainAffinity.SELECTIONS)
def test_affinity_at_64_domains_is_correct_and_fast(selection):
    n_layers, n_domains, n_experts = 4, 64, 64
    aff = DomainAffinity(n_layers, n_domains, n_experts, beta=0.3, selection=selection)
    t = time.perf_counter()
    for window in range(5):
        for li in range(n_layers):
            sel, dom, scores = _routing(100 * window + li)
            aff.count(li, scores, sel, dom, gates=aff.counts_gates)
        if window == 4:
            hits, tokens = aff.counts.hits.clone(), aff.counts.tokens.clone()
        masks = aff.update(lambda x: x)
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0, elapsed  # loose: ~20 ms here (benchmarks/many_domains_cost.py)
    assert masks.shape == (n_layers, n_domains, n_experts) and masks.dtype == torch.bool
    assert bool(masks.any(-1).all())  # every domain selects some expert
    # the counts of the last window, by a plain loop over one layer's tokens
    sel, dom, _ = _routing(403)
    ref = torch.zeros(n_domains, n_experts, dtype=torch.float64)
    for d, row in zip(dom.tolist(), sel.tolist()):
        for e in row:
            ref[d, e] += 1
    assert torch.equal(hits[3], ref) and torch.equal(tokens[3], torch.bincount(dom, minlength=64).double())
    if selection == "relative":
        window = compute_window_affinity(hits, tokens)
        assert torch.equal(select_relative(window, 0.5)[3, 7], window[3, 7] >= 0.5 * window[3, 7].max())
        top = aff.estimate.argmax(-1)  # each domain's busiest expert is one of its preferred d .. d+7
        assert bool((((top - torch.arange(64)) % 64) < 8).all())
    state = aff.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = DomainAffinity(n_layers, n_domains, n_experts, beta=0.3, selection=selection)
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back.estimate, aff.estimate) and torch.equal(back.counts.as_tensor(), aff.counts.as_tensor())


def test_method_state_at_64_domains_round_trips_through_a_checkpoint_file(tmp_path):
    cfg = config_from_dict({"model": {"tiny": {"model_type": "qwen3_moe"}}, "method": {"mode": "desmoe"}})
    model = build_tiny_model(cfg.model.tiny, seed=0)
    layers = moe_layer_indices(model.config)

    def method():
        m = DesMoE(cfg, model, layers, list(D64))
        m.affinity = DomainAffinity(len(layers), 64, 64, beta=cfg.method.affinity_beta)
        return m

    a = method()
    for li in range(len(layers)):
        sel, dom, _ = _routing(li)
        a.affinity.counts.add(li, sel, dom)
    record = a.update_affinity(step=20)
    for li in range(len(layers)):
        sel, dom, _ = _routing(10 + li)
        a.affinity.counts.add(li, sel, dom)  # a window in progress: saved too
    a.phase, a.step = "stabilization", 21
    assert record["domains"] == D64 and len(record["masks"][0]) == 64 and len(record["masks"][0][0]) == 64
    path = checkpoint.state_file(str(tmp_path), 0)
    torch.save({"method": a.state_dict()}, path)
    b = method()
    b.load_state_dict(checkpoint.load_state(str(tmp_path), 0)["method"])
    assert (b.phase, b.step) == ("stabilization", 21) and torch.equal(b.masks, a.masks)
    assert torch.equal(b.affinity.estimate, a.affinity.estimate)
    assert torch.equal(b.affinity.counts.as_tensor(), a.affinity.counts.as_tensor())
    assert os.path.getsize(path) < 400_000  # [L, 64, 64] masks, float64 EMA and counts: ~200 KB at L = 2


# ---- heatmaps and the report ---------------------------------------------------------------------


def _record(step, n_layers=4, domains=D64, n_experts=64, seed=0):
    r = random.Random(seed + step)
    aff = [[[r.random() * (1.0 if (e - d) % n_experts < 8 else 0.2) for e in range(n_experts)]
            for d in range(len(domains))] for _ in range(n_layers)]
    masks = [[[int(a >= 0.5 * max(row)) for a in row] for row in layer] for layer in aff]
    return {"step": step, "domains": list(domains), "layers": [2 * i + 1 for i in range(n_layers)], "affinity": aff,
            "masks": masks}


def test_heatmaps_of_64_domains_name_every_domain_and_stay_drawable(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    t = time.perf_counter()
    rundir.write_affinity(str(run), _record(20))  # the JSON and its PNG, synchronously
    elapsed = time.perf_counter() - t
    with Image.open(run / "affinity" / "step000020.png") as img:
        w, h = img.size
    assert 1500 < w < 4000 and 1500 < h < 4000, (w, h)  # readable: ~11 px per domain row per panel
    assert elapsed < 60, elapsed  # a few seconds here, drawn off the loop in training (FigureWriter)


def test_report_at_64_domains_summarises_overlap_per_domain(tmp_path):
    run = tmp_path / "run"
    (run / "affinity").mkdir(parents=True)
    for step in (20, 40, 60):
        with open(run / "affinity" / f"step{step:06d}.json", "w") as f:
            json.dump(_record(step), f)
    rec = load_latest_selection(str(run))
    t = time.perf_counter()
    text = format_report(rec)
    assert time.perf_counter() - t < 2.0
    lines = text.splitlines()
    assert len(lines) == 2 + 4 * (1 + 64 + 1)  # header, then per layer: its name, a line per domain, a summary
    assert "overlap d00 / d01" not in text and max(map(len, lines)) < 400
    d05 = next(line for line in lines if line.startswith("  d05 "))
    assert "closest: d04" in d05 or "closest: d06" in d05  # neighbours share most of their experts
    assert lines[-1].startswith("  summary: ") and "4032" not in text and "2016 pairs" in text
    summary = evolution_summary(str(run))
    assert summary["steps"] == [20, 40, 60] and len(summary["mean_jaccard_to_others"][0]) == 64
    few = format_report({**_record(20, domains=D64[:FULL_OVERLAP_UP_TO]), "source": "x"})
    assert "overlap d00 / d01" in few and "closest" not in few


def test_desmoe_affinity_command_on_a_64_domain_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "affinity").mkdir(parents=True)
    with open(run / "affinity" / "step000020.json", "w") as f:
        json.dump(_record(20, n_layers=2), f)
    assert cli.main(["affinity", str(run)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 + 2 * 66 and "  d63 " in out


# ---- MLflow metric names and count, the sampler --------------------------------------------------


def test_metric_names_are_valid_and_per_step_count_grows_with_the_domains_trained():
    names = list(MANY_DOMAINS) + D64
    for name in names:
        for key in (f"loss/{name}", f"kd_loss/{name}", f"eval/{name}/chrf"):
            assert clean_key(key) == key
    log = StepLog(names, mode="desmoe", master=True, metrics_file=io.StringIO())
    stats = torch.zeros(len(names), 4, dtype=torch.float64)
    stats[:, 0], stats[:, 2], stats[:, 3] = 2.0, 1.0, 100.0  # every domain trained this step (worst case)
    values = log._write(StepRecord(1, 0.5, 1.0, 1e-3, {"phase": "warmup", "lambda": 1.0}, stats), stats)
    assert len(values) == 6 + 2 * len(names)  # 6 per step, + loss and kd_loss of each domain trained in it
    stats[2:, 2] = 0  # the usual step: only the domains of its micro-batches
    values = log._write(StepRecord(2, 0.5, 1.0, 1e-3, {"phase": "warmup", "lambda": 1.0}, stats), stats)
    assert len(values) == 6 + 4 and all(clean_key(k) == k for k in values)


def _domain(name, n, weight):
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return DomainData(name=name, weight=weight, examples=n, tokens=4 * n, train_ids=ids, train_labels=ids,
                      eval_ids=ids[:1], eval_labels=ids[:1])


def test_sampler_with_64_domains_of_very_different_sizes_and_weights():
    r = random.Random(0)
    domains = {n: _domain(n, r.choice([1, 2, 7, 50, 3000]), r.choice([0.01, 0.1, 1.0, 10.0, 100.0])) for n in D64}
    total = sum(d.weight for d in domains.values())
    s = DomainSampler(domains, micro_batch_size=3, seed=1)
    t = time.perf_counter()
    counts, rows = {n: 0 for n in D64}, {n: [] for n in D64}
    steps = 20000
    for _ in range(steps):
        name, ids, _ = s.next_batch()
        counts[name] += 1
        rows[name] += ids[:, 0].tolist()
    assert time.perf_counter() - t < 10  # ~1 s here
    for n, d in domains.items():
        expected = steps * d.weight / total
        assert abs(counts[n] - expected) < 5 * expected ** 0.5 + 3, (n, counts[n], expected)
        size = d.train_ids.shape[0]
        for start in range(0, len(rows[n]) - size + 1, size):  # each epoch visits every row once
            assert sorted(rows[n][start:start + size]) == list(range(size)), n
    resumed = DomainSampler(domains, micro_batch_size=3, seed=1)
    resumed.load_state_dict(s.state_dict())
    assert [resumed.next_batch()[0] for _ in range(50)] == [s.next_batch()[0] for _ in range(50)]
    assert len(s._orders) <= 4 * 64 + 1  # the permutation cache stays bounded
