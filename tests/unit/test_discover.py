"""desmoe.discover: routing signatures of a real tiny model, k-means / silhouette, relabelling, every bad input,
labelled and unlabelled records mixed, and the records.jsonl round trip through resolve_labels."""

import json
import os

import numpy as np
import pytest
import torch

from desmoe import discover
from desmoe.config import DataSection, DiscoverSection, config_from_dict
from desmoe.data import ByteTokenizer, load_domain_examples
from desmoe.data.builtin import builtin_segments
from desmoe.data.sources import example_text
from desmoe.models import build_tiny_model, get_family
from desmoe.launch import preflight

TINY = {"model_type": "qwen3_moe", "vocab_size": 320}


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_model(TINY, seed=0)
    return model, get_family("qwen3_moe")


def _texts(*domains, n=12):
    return [(d, example_text(ex)) for d in domains for ex in builtin_segments(d)[:n]]


def _write_records(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _cfg(tmp_path, train, **discover_keys):
    return config_from_dict({
        "run": {"name": "d", "seed": 3, "output_dir": str(tmp_path / "run")},
        "model": {"tiny": dict(TINY)}, "train": {"micro_batch_size": 4},
        "data": {"train": train, "tokenizer": "byte", "seq_len": 32, "discover": discover_keys}})


# ---- signatures ------------------------------------------------------------------------------


def test_share_counts_the_routers_own_top_k_choices(tiny):
    model, family = tiny
    tok = ByteTokenizer()
    segs = [[("Question: What is 2 + 3? Answer: 5", True)]]
    chosen = []
    gates = [family.moe_block(family.decoder_layers(model)[i]).gate for i in (0, 1)]
    handles = [g.register_forward_hook(lambda m, a, out: chosen.append(out[2].clone())) for g in gates]
    ids = discover.example_ids(segs[0], tok, max_tokens=64)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    sig = discover.compute_signatures(model, family, tok, segs, max_tokens=64)
    assert sig.shape == (1, 2 * 8)
    for layer, idx in enumerate(chosen):
        expected = torch.bincount(idx.flatten(), minlength=8).double() / (len(ids) * 2)
        np.testing.assert_allclose(sig[0, layer * 8:(layer + 1) * 8], expected.numpy(), atol=1e-12)


def test_signatures_ignore_padding_and_split_over_ranks_exactly(tiny):
    model, family = tiny
    tok = ByteTokenizer()
    exs = [[(t, True)] for _, t in _texts("math", "law", n=5)]
    mode = model.training
    together = discover.compute_signatures(model, family, tok, exs, max_tokens=48, features="share_gate", batch_size=4)
    alone = np.concatenate([discover.compute_signatures(model, family, tok, [e], max_tokens=48, features="share_gate")
                            for e in exs])
    np.testing.assert_allclose(together, alone, atol=1e-6)  # padding of shorter examples is not counted
    assert together.shape == (10, 2 * 2 * 8)
    np.testing.assert_allclose(together.reshape(10, 2, 2, 8).sum(-1), 1.0, atol=1e-6)  # share and gate sum to 1
    # rank r routes examples r::2; without a process group each rank's rows are its own
    parts = [discover.compute_signatures(model, family, tok, exs, max_tokens=48, features="share_gate",
                                         batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert not parts[0][1::2].any() and not parts[1][0::2].any()
    np.testing.assert_allclose(parts[0] + parts[1], together, atol=1e-6)
    assert model.training == mode  # the model's mode is restored


# ---- clustering ------------------------------------------------------------------------------


def _blobs(k, n=30, dim=10, seed=0, spread=0.02):
    rng = np.random.default_rng(seed)
    centres = rng.random((k, dim)) * 4
    truth = np.repeat(np.arange(k), n)
    rng.shuffle(truth)
    return centres[truth] + rng.normal(0, spread, (len(truth), dim)), truth


def test_kmeans_recovers_planted_clusters_and_numbers_them_by_first_appearance():
    x, truth = _blobs(5)
    c = discover.compute_clusters(x, clusters=5, seed=0)
    assert discover.adjusted_rand(truth.tolist(), c.labels.tolist()) == 1.0
    first = [int(np.flatnonzero(c.labels == i)[0]) for i in range(5)]
    assert c.labels[0] == 0 and first == sorted(first)
    assert c.centroids.shape == (5, 10) and c.chosen_by == "data.discover.clusters"
    np.testing.assert_allclose(c.centroids[0], x[c.labels == 0].mean(0), atol=1e-9)
    again = discover.compute_clusters(x, clusters=5, seed=0)
    assert np.array_equal(again.labels, c.labels)
    labels, order = discover.relabel_by_first_appearance(np.array([7, 7, 2, 9, 2]))
    assert labels.tolist() == [0, 0, 1, 2, 1] and order == [7, 2, 9]


def test_silhouette_chooses_the_planted_k():
    x, _ = _blobs(4, seed=1)
    c = discover.compute_clusters(x, min_clusters=2, max_clusters=9, seed=0)
    assert c.k == 4 and c.chosen_by == "silhouette"
    assert sorted(c.silhouette) == list(range(2, 10))
    assert max(c.silhouette, key=c.silhouette.get) == 4
    # the range is capped at N - 1
    small = discover.compute_clusters(x[:5], min_clusters=2, max_clusters=12, seed=0)
    assert max(small.silhouette) == 4


def test_bad_clusterings_say_what_and_what_to_do():
    x, _ = _blobs(3, n=2)
    with pytest.raises(discover.DiscoveryError, match=r"data.discover.clusters: 8 but data.train has 6 example"):
        discover.compute_clusters(x, clusters=8)
    with pytest.raises(discover.DiscoveryError, match=r"all 6 examples of data.train have the same routing"):
        discover.compute_clusters(np.ones((6, 4)), clusters=2)
    with pytest.raises(discover.DiscoveryError, match=r"only 2 distinct routing signatures"):
        discover.compute_clusters(np.repeat(np.eye(4)[:2], 3, axis=0), clusters=3)
    with pytest.raises(discover.DiscoveryError, match=r"no examples to cluster"):
        discover.compute_clusters(np.zeros((0, 4)), clusters=2)
    with pytest.raises(discover.DiscoveryError, match=r"choosing K by silhouette in \[3, 12\]"):
        discover.compute_clusters(x[:3], min_clusters=3)
    g = DiscoverSection(clusters=8)
    with pytest.raises(discover.DiscoveryError, match=r"clusters: 8 but data.train has 5 example.*at most 5"):
        discover.check_clusterable(5, g)
    with pytest.raises(discover.DiscoveryError, match=r"needs more examples than data.discover.min_clusters"):
        discover.check_clusterable(2, DiscoverSection())


def test_unreadable_or_empty_input_is_reported(tmp_path):
    empty = _write_records(tmp_path / "empty.jsonl", [])
    data = DataSection(train=empty, discover=DiscoverSection(clusters=2))
    with pytest.raises(discover.DiscoveryError, match=r"has nothing to cluster \(no records\)"):
        discover.read_examples(data)
    blank = _write_records(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    data = DataSection(train=blank, discover=DiscoverSection(clusters=2))
    with pytest.raises(discover.DiscoveryError, match=r"2 record\(s\) read, 0 skipped as bad, 2 without text"):
        discover.read_examples(data)
    wrong = _write_records(tmp_path / "wrong.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(discover.DataError, match=r"wrong.jsonl:1: the \"text\" field is missing"):
        discover.read_examples(DataSection(train=wrong, discover=DiscoverSection()))
    mixed = _write_records(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"}, {"text": "x"}, {"text": "y"}])
    got = discover.read_examples(DataSection(train=mixed, on_bad_record="skip", discover=DiscoverSection()))
    assert (got.records, got.skipped, len(got.examples)) == (3, 1, 2) and "mixed.jsonl:1" in got.first_skip
    limited = discover.read_examples(DataSection(train=mixed, on_bad_record="skip",
                                                 discover=DiscoverSection(max_examples=2)))
    assert limited.records == 2 and len(limited.examples) == 1


def test_preflight_reads_a_discover_config_without_running_a_model(tmp_path):
    train = _write_records(tmp_path / "u.jsonl", [{"text": t} for _, t in _texts("math", n=4)])
    preflight(_cfg(tmp_path, train, clusters=3))
    with pytest.raises(discover.DiscoveryError, match=r"clusters: 8 but data.train has 4"):
        preflight(_cfg(tmp_path, train, clusters=8))


# ---- the whole discovery, labelled records mixed in, and the round trip -----------------------


def test_mixed_labels_are_counted_kept_and_scored_and_the_labels_round_trip(tmp_path, tiny):
    model, family = tiny
    rows = []
    for i, (d, t) in enumerate(_texts("math", "law", "translation", n=10)):
        rows.append({"text": t, "domain": d, "id": i} if i % 3 == 0 else {"text": t, "id": i})
    train = _write_records(tmp_path / "u.jsonl", rows)
    cfg = _cfg(tmp_path, train, clusters=3, name_prefix="grp")
    unlabelled = discover.read_examples(cfg.data)
    assert len(unlabelled.examples) == 30 and unlabelled.labelled == 10
    found = discover.run_discovery(cfg, model, family, ByteTokenizer(), unlabelled)
    assert found.names == ["grp_0", "grp_1", "grp_2"] and found.domain_of[0] == "grp_0"
    given = found.given_agreement()
    assert given["examples"] == 10 and -1 <= given["ari"] <= 1
    assert sum(map(sum, given["confusion"]["counts"])) == 10
    line = discover.label_summary(found)
    assert line.startswith("data.discover: 10 of 30 records carry a domain label; labels are ignored for training "
                           "(kept as given_domain; ARI against them: ")
    files = discover.write_discovery(str(tmp_path / "out"), found)
    with open(files["records"]) as f:
        written = [json.loads(line) for line in f]
    assert [r["id"] for r in written] == list(range(30))  # file order, every field kept
    assert [r["domain"] for r in written] == found.domain_of
    assert all(r.get("given_domain") == rows[i].get("domain") for i, r in enumerate(written))
    report = json.load(open(files["report"]))
    assert report["k"] == 3 and report["labelled"] == 10 and report["unlabelled"] == 20
    assert sum(c["size"] for c in report["clusters"]) == 30
    assert all(1 <= len(c["representatives"]) <= 3 and len(c["representatives"][0]["text"]) <= 200
               for c in report["clusters"])
    assert "adjusted Rand index" in open(files["report_md"]).read()
    assert os.path.getsize(files["figure"]) > 1000
    # a config naming the labels trains on them: the domains are the file's, in order
    labelled = config_from_dict({"model": {"tiny": dict(TINY)}, "data": {
        "tokenizer": "byte", "discover": {"labels": files["records"], "format": "text"}}})
    discover.resolve_labels(labelled)
    assert list(labelled.data.domains) == found.names and labelled.data.train == files["records"]
    discover.resolve_labels(labelled)  # idempotent
    assert list(labelled.data.domains) == found.names
    from_file, _ = load_domain_examples(labelled.data)
    in_memory, report_mem = found.domain_examples(labelled.data)
    assert {n: [example_text(e) for e in v] for n, v in from_file.items()} == \
        {n: [example_text(e) for e in v] for n, v in in_memory.items()}
    assert "data.train" in report_mem


def test_labels_file_must_name_a_domain_everywhere(tmp_path):
    bad = _write_records(tmp_path / "r.jsonl", [{"text": "a", "domain": "x"}, {"text": "b"}])
    with pytest.raises(discover.DiscoveryError, match=r"r.jsonl:2: no \"domain\" field"):
        discover.label_names(bad, max_record_bytes=1 << 20)


def test_out_dir_with_labels_is_refused_without_overwrite(tmp_path):
    (tmp_path / "o").mkdir()
    discover.check_out_dir(str(tmp_path / "o"), overwrite=False)
    (tmp_path / "o" / "records.jsonl").write_text("{}\n")
    with pytest.raises(discover.DiscoveryError, match=r"already holds discovered labels.*--overwrite"):
        discover.check_out_dir(str(tmp_path / "o"), overwrite=False)
    discover.check_out_dir(str(tmp_path / "o"), overwrite=True)


def test_a_singleton_cluster_cannot_be_trained_on():
    found = discover.Discovery(unlabelled=discover.Unlabelled(examples=[], records=0), features=np.zeros((3, 2)),
                               clustering=discover.Clustering(labels=np.array([0, 0, 1]), k=2, silhouette={2: None},
                                                              centroids=np.zeros((2, 2)), chosen_by="silhouette"),
                               names=["cluster_0", "cluster_1"], settings={}, seconds={})
    with pytest.raises(discover.DiscoveryError, match=r"cluster_1 \(1\) hold fewer than 2 examples"):
        discover.check_trainable(found)


def test_benchmark_quick_runs_end_to_end(tmp_path):
    from benchmarks import discovery as bench

    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.load(open(tmp_path / "results.json"))
    assert results["runs"] and all(-1 <= r["ari"] <= 1 for r in results["runs"])
    assert (tmp_path / "report.md").exists() and (tmp_path / "discovery.png").exists()
