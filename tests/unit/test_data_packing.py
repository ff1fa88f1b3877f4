"""Long examples (split / truncate), label masking at row boundaries, and the train/eval split by example."""

import json
import re

import pytest

from desmoe.config import DataSection, DomainSection
from desmoe.data import (IGNORE_INDEX, ByteTokenizer, DataError, build_domain_data, choose_eval_examples,
                         encode_example, example_text, pack_sequences, real_token_mask)

I = IGNORE_INDEX
TOK = ByteTokenizer()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(domains, **kw):
    return DataSection(domains={k: DomainSection(**v) for k, v in domains.items()}, **kw)


def test_truncate_cuts_long_examples_and_keeps_each_example_in_one_row():
    ids, labels = pack_sequences([list(range(10, 20)), [20, 21], [30, 31, 32]], seq_len=6, bos_id=1, eos_id=2,
                                 pad_id=0, long_examples="truncate")
    # 1 10..19 2 is cut to 6 tokens (no eos: it did not end); 1 20 21 2 and 1 30 31 32 2 do not share a row
    assert ids.tolist() == [[1, 10, 11, 12, 13, 14], [1, 20, 21, 2, 0, 0], [1, 30, 31, 32, 2, 0]]
    assert labels.tolist() == [[I, 10, 11, 12, 13, 14], [I, 20, 21, 2, I, I], [I, 30, 31, 32, 2, I]]


def test_real_token_mask_marks_only_the_row_padding():
    # the second example's prompt (unlabelled) is real; only the trailing pad run of each row is padding
    ids, labels = pack_sequences([list(range(10, 20)), ([20, 21, 22], [I, I, 22]), [30, 31, 32]], seq_len=6,
                                 bos_id=1, eos_id=2, pad_id=0, long_examples="truncate")
    assert real_token_mask(ids, labels, pad_id=0).tolist() == [[True] * 6, [True] * 5 + [False],
                                                               [True] * 5 + [False]]
    ids, labels = pack_sequences([[5, 0, 6]], seq_len=8, bos_id=1, eos_id=2, pad_id=0, long_examples="split")
    assert real_token_mask(ids, labels, pad_id=0).tolist() == [[True] * 5 + [False] * 3]  # a pad id inside is real


def test_split_masks_a_prompt_that_continues_into_the_next_row():
    prompt, response = list(range(100, 110)), list(range(200, 210))
    ids, labels = pack_sequences([(prompt + response, [I] * 10 + response)], seq_len=8, bos_id=1, eos_id=2,
                                 pad_id=0)
    # stream: bos p0..p9 r0..r9 eos = 22 tokens -> 3 rows; the prompt's tail opens row 1, still masked
    assert ids.tolist()[1] == [107, 108, 109, 200, 201, 202, 203, 204]
    assert labels.tolist() == [[I] * 8, [I, I, I, 200, 201, 202, 203, 204], [205, 206, 207, 208, 209, 2, I, I]]


def test_truncate_keeps_the_prompt_masked_and_cuts_the_response():
    prompt, response = list(range(100, 105)), list(range(200, 220))
    ids, labels = pack_sequences([(prompt + response, [I] * 5 + response)], seq_len=16, bos_id=1, eos_id=2,
                                 pad_id=0, long_examples="truncate")
    assert ids.tolist() == [[1] + prompt + response[:10]]
    assert labels.tolist() == [[I] * 6 + response[:10]]  # no eos target: the response was cut


def test_truncate_drops_an_example_whose_prompt_alone_exceeds_seq_len(tmp_path):
    records = [{"prompt": "P" * 40, "response": " long"}] + [{"prompt": f"q{i}", "response": f" a{i}"}
                                                               for i in range(30)]
    p = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = _data({"d": {"train": p, "format": "prompt_response"}}, seq_len=16, eval_sequences=2,
                long_examples="truncate")
    d = build_domain_data(cfg, TOK)[0]["d"]
    assert d.truncated == 1 and d.split == 0 and d.dropped_tokens == 45  # the whole example: 40 + 5 tokens
    assert d.examples == 31
    # trained: the responses of the examples not held out (" a0".." a9" 3 tokens, " a10".." a29" 4)
    assert d.trained_tokens == 10 * 3 + 20 * 4 - sum(len(e[1][0]) for e in d.eval_examples)
    rows = [d.train_ids[i].tolist() for i in range(d.train_ids.shape[0])]
    assert not any(TOK.encode("PPPP")[0] in r for r in rows)
    # every row has something to learn, and every target is a response byte or eos
    for ids, labels in ((d.train_ids, d.train_labels), (d.eval_ids, d.eval_labels)):
        assert ((labels != I).sum(dim=1) > 0).all()
        targets = [t for t in labels.flatten().tolist() if t != I]
        assert set(TOK.decode([t for t in targets if t != TOK.eos_id])) <= set(" a0123456789")
    # in truncate mode no example crosses a row: every row starts with bos
    assert (d.train_ids[:, 0] == TOK.bos_id).all() and (d.eval_ids[:, 0] == TOK.bos_id).all()


def test_split_counts_long_examples_and_drops_nothing(tmp_path):
    records = [{"text": "x" * 40}] * 3 + [{"text": "y" * 5}] * 20
    p = _write_jsonl(tmp_path / "d.jsonl", records)
    d = build_domain_data(_data({"d": {"train": p}}, seq_len=16, eval_sequences=2), TOK)[0]["d"]
    assert d.split == 3 and d.truncated == 0 and d.dropped_tokens == 0
    assert d.tokens == 3 * 40 + 20 * 5
    held_x = sum(example_text(e).count("x") for e in d.eval_examples)
    assert (d.train_ids == TOK.encode("x")[0]).sum() == 120 - held_x  # every token of the trained examples
    assert d.trained_tokens == d.tokens - sum(len(example_text(e)) for e in d.eval_examples)


def _numbered(n, width=30):
    return [{"text": f"<{i:03d}>" + "abcdefghij"[i % 10] * (width - 5 - i % 7)} for i in range(n)]


def _markers(ids):
    return set(re.findall(r"<(\d{3})", TOK.decode(ids.flatten().tolist())))


@pytest.mark.parametrize("long_examples", ["split", "truncate"])
def test_eval_rows_are_whole_examples_never_trained(tmp_path, long_examples):
    p = _write_jsonl(tmp_path / "d.jsonl", _numbered(120))
    cfg = _data({"d": {"train": p}}, seq_len=32, eval_sequences=5, long_examples=long_examples)
    d = build_domain_data(cfg, TOK)[0]["d"]
    assert d.eval_ids.shape[0] == 5
    train, evaluated = _markers(d.train_ids), _markers(d.eval_ids)
    held = {example_text(e)[1:4] for e in d.eval_examples}
    assert evaluated <= held and train.isdisjoint(held)
    assert train | held == {f"{i:03d}" for i in range(120)}  # nothing lost but the eval rows' overflow
    # the held-out examples fill the eval rows (the last one may run past them)
    assert (d.eval_labels != I).sum(dim=1).min() > 0
    # the draw is fixed per domain name: same data, same eval examples, whatever else changes
    again = build_domain_data(_data({"d": {"train": p}}, seq_len=32, eval_sequences=5,
                                    long_examples=long_examples, sync_domains=False), TOK)[0]["d"]
    assert again.eval_examples == d.eval_examples


def test_eval_examples_are_a_seeded_draw_not_the_tail():
    lengths = [10] * 100
    a = choose_eval_examples(lengths, rows=3, seq_len=32, truncate=False, seed="math")
    assert a == choose_eval_examples(lengths, rows=3, seq_len=32, truncate=False, seed="math")
    assert a != choose_eval_examples(lengths, rows=3, seq_len=32, truncate=False, seed="code")
    assert len(a) == 10 and a != list(range(90, 100))  # 96 tokens: the 10th example starts in row 3
    assert choose_eval_examples([100, 100], rows=8, seq_len=32, truncate=False, seed="x") != [0, 1]
    assert len(choose_eval_examples([100, 100], rows=8, seq_len=32, truncate=False, seed="x")) == 1


def test_eval_file_gives_the_eval_rows_and_nothing_is_held_out(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Q{i}:", "response": f" A{i}"} for i in range(40)])
    ev = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"EQ{i}:", "response": f" EA{i}"} for i in range(50)])
    cfg = _data({"d": {"train": train, "eval": ev, "format": "prompt_response"}}, seq_len=32, eval_sequences=2)
    d = build_domain_data(cfg, TOK)[0]["d"]
    train_text = TOK.decode(d.train_ids.flatten().tolist())
    assert all(f"Q{i}:" in train_text for i in range(40)) and "EQ" not in train_text
    assert d.eval_ids.shape[0] == 2 and "EQ0:" in TOK.decode(d.eval_ids.flatten().tolist())
    # the eval examples are those that start in the eval rows, in file order: 10 tokens each
    # (bos EQi: EAi eos), so 7 of them start within 2 x 32 tokens
    assert d.eval_pairs == [(f"EQ{i}:", f" EA{i}") for i in range(7)]
    assert d.metric == "exact_match" and d.metrics == ("exact_match",)


def test_eval_pairs_and_metrics_of_builtin_domains():
    cfg = _data({"math": {"builtin": "math", "max_examples": 300}, "translation": {"builtin": "translation"},
                 "code": {"builtin": "code", "max_examples": 60}}, seq_len=64, eval_sequences=4)
    domains = build_domain_data(cfg, TOK)[0]
    math = domains["math"]
    assert math.metrics == ("exact_match",) and math.eval_pairs
    for prompt, ref in math.eval_pairs:
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:") and ref.strip().isdigit()
    # math still trains on the whole text, question included (as before the answer was its own segment)
    ids, labels = encode_example(math.eval_examples[0], TOK)
    assert labels == ids
    assert domains["translation"].metrics == ("chrf", "exact_match") and domains["translation"].metric == "chrf"
    assert all(p.startswith("Translate") for p, _ in domains["translation"].eval_pairs)
    assert domains["code"].metrics == ("token_accuracy",) and domains["code"].eval_pairs == []


def test_generation_metric_needs_reference_answers(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"plain text number {i}"} for i in range(50)])
    cfg = _data({"d": {"train": p, "metric": "chrf"}}, seq_len=16)
    with pytest.raises(DataError, match=r"data.domains.d.metric: chrf compares generated answers"):
        build_domain_data(cfg, TOK)


def test_a_single_example_cannot_be_split_into_train_and_eval(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "z" * 200}])
    with pytest.raises(DataError, match=r"domain 'd' has only one example.*data.domains.d.eval"):
        build_domain_data(_data({"d": {"train": p}}, seq_len=16), TOK)


def test_data_summary_shows_truncated_and_split(tmp_path):
    from desmoe.rundir import data_summary

    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 40}] * 2 + [{"text": "y" * 5}] * 20)
    cfg = _data({"d": {"train": p}}, seq_len=16, eval_sequences=1, long_examples="truncate")
    domains, scan = build_domain_data(cfg, TOK)
    table, rows = data_summary(domains, scan)
    header = table.splitlines()[0].split()
    assert header[:5] == ["domain", "examples", "tokens", "trained", "truncated"] and "skipped" in header
    assert rows[0]["truncated"] == 2 and rows[0]["split"] == 0 and rows[0]["dropped_tokens"] == 2 * (40 - 15)
    assert rows[0]["examples"] == 22 and rows[0]["skipped"] == 0 and rows[0]["metrics"] == ["token_accuracy"]
    assert "dropped 50 token(s) of 2 example(s)" in table
    json.dumps(rows)  # data_summary.json
