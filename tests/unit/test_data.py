import json
import os

import pytest
import torch

from desmoe.config import DataSection, DomainSection
from desmoe.data import (IGNORE_INDEX, ByteTokenizer, DataError, DomainData, DomainSampler, build_domain_data,
                         encode_example, example_text, load_domain_examples, load_domain_texts, pack_sequences)
from desmoe.data.builtin import PARENT_DOMAINS, builtin_examples


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(domains, **kw):
    return DataSection(domains={k: DomainSection(**v) for k, v in domains.items()}, **kw)


def test_per_domain_files_and_mixed_file(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two", "domain": "a"}])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [{"domain": "b", "text": "bee"}, {"domain": "a", "text": "three"}])
    texts = load_domain_texts(_data({"a": {"train": a}, "b": {}}, train=mixed))
    assert texts == {"a": ["one", "two", "three"], "b": ["bee"]}


def test_glob_and_max_examples(tmp_path):
    _write_jsonl(tmp_path / "x1.jsonl", [{"text": "1"}, {"text": "2"}])
    _write_jsonl(tmp_path / "x2.jsonl", [{"text": "3"}])
    texts = load_domain_texts(_data({"x": {"train": str(tmp_path / "x*.jsonl"), "max_examples": 2}}))
    assert texts == {"x": ["1", "2"]}


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: malformed JSON"),
    ('{"txt": "no"}\n', r"bad\.jsonl:1: the \"text\" field is missing"),
    ('["a"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('{"text": "x", "domain": "other"}\n', r"bad\.jsonl:1: record labelled domain 'other'"),
])
def test_bad_records_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_domain_texts(_data({"d": {"train": str(p)}}))


def test_non_utf8_is_reported_with_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_domain_texts(_data({"d": {"train": str(p)}}))


def test_missing_empty_and_unlisted_domains(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_domain_texts(_data({"d": {"train": str(tmp_path / "nope.jsonl")}}))
    with pytest.raises(DataError, match="matches no files"):
        load_domain_texts(_data({"d": {"train": str(tmp_path / "*.none")}}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"domain\(s\) d have no examples"):
        load_domain_texts(_data({"d": {"train": str(empty)}}))
    mixed = _write_jsonl(tmp_path / "m.jsonl", [{"domain": "zzz", "text": "t"}, {"domain": "d", "text": "t"}])
    with pytest.raises(DataError, match=r"domains that data.domains does not list: 'zzz' \(first at .*m.jsonl:1\)"):
        load_domain_texts(_data({"d": {}}, train=mixed))
    nolabel = _write_jsonl(tmp_path / "n.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match=r"n.jsonl:1: missing \"domain\" label"):
        load_domain_texts(_data({"d": {}}, train=nolabel))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ∑")
    assert min(ids) >= 3 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo ∑"


def test_packing_keeps_every_token_and_masks_padding():
    ids, labels = pack_sequences([[10, 11, 12], [20, 21]], seq_len=4, bos_id=1, eos_id=2, pad_id=0)
    # stream: 1 10 11 12 2 | 1 20 21 2  -> 9 tokens -> 3 rows of 4
    assert ids.tolist() == [[1, 10, 11, 12], [2, 1, 20, 21], [2, 0, 0, 0]]
    # bos is never a target (it would be predicted from the previous example); padding is masked
    I = IGNORE_INDEX
    assert labels.tolist() == [[I, 10, 11, 12], [2, I, 20, 21], [2, I, I, I]]


def test_domain_data_holds_out_eval_rows(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 50} for _ in range(20)])
    dd = build_domain_data(_data({"d": {"train": p}}, seq_len=16, eval_sequences=3), ByteTokenizer())[0]["d"]
    assert dd.eval_ids.shape[0] == 3
    # one whole example (52 tokens with bos and eos) fills the 3 eval rows; the other 19 are all trained on
    assert len(dd.eval_examples) == 1 and dd.examples == 20
    assert dd.train_ids.shape[0] == -(-19 * 52 // 16)
    assert (dd.train_ids == ByteTokenizer().encode("x")[0]).sum() == 19 * 50


def _domain(name, n, weight=1.0):
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    return DomainData(name=name, weight=weight, examples=n, tokens=4 * n, train_ids=ids, train_labels=ids.clone(),
                      eval_ids=ids[:1], eval_labels=ids[:1])


def test_sampler_same_domain_on_every_rank_different_rows():
    # sizes are multiples of world x micro-batch, so no global batch straddles two epochs
    domains = {"a": _domain("a", 12), "b": _domain("b", 8)}
    samplers = [DomainSampler(domains, micro_batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        (d0, x0, _), (d1, x1, _) = samplers[0].next_batch(), samplers[1].next_batch()
        assert d0 == d1
        assert set(x0[:, 0].tolist()).isdisjoint(x1[:, 0].tolist())


def test_sampler_covers_each_epoch_and_follows_weights():
    domains = {"a": _domain("a", 8, weight=3.0), "b": _domain("b", 8, weight=1.0)}
    s = DomainSampler(domains, micro_batch_size=2, seed=0, rank=0, world_size=1)
    seen = {"a": [], "b": []}
    for _ in range(400):
        d, x, _ = s.next_batch()
        seen[d] += x[:, 0].tolist()
    assert 2.3 < len(seen["a"]) / len(seen["b"]) < 3.9
    assert sorted(seen["a"][:8]) == list(range(8))  # first epoch is a permutation


def test_sampler_is_deterministic_and_resumable():
    domains = {"a": _domain("a", 9), "b": _domain("b", 5)}
    ref = DomainSampler(domains, micro_batch_size=3, seed=7, rank=1, world_size=2)
    stream = [ref.next_batch() for _ in range(12)]
    s = DomainSampler(domains, micro_batch_size=3, seed=7, rank=1, world_size=2)
    for _ in range(5):
        s.next_batch()
    resumed = DomainSampler(domains, micro_batch_size=3, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(s.state_dict())
    for want in stream[5:]:
        got = resumed.next_batch()
        assert got[0] == want[0] and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", sorted(PARENT_DOMAINS))
def test_builtin_domains_are_real_and_deterministic(name):
    a, b = builtin_examples(name), builtin_examples(name)
    assert a == b and len(a) >= 100
    chars = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in a)
    assert chars > 100_000


def test_builtin_pairs_train_on_the_answer_only():
    cfg = _data({"intent": {"builtin": "intent"}, "translation": {"builtin": "translation"},
                 "summary": {"builtin": "summary"}})
    examples, _ = load_domain_examples(cfg)
    for name in ("intent", "translation", "summary"):
        (prompt, p_trained), (answer, a_trained) = examples[name][0]
        assert not p_trained and a_trained and answer.strip()
    import json as _json

    for (prompt, _), (answer, _) in examples["intent"][:200]:
        label = _json.loads(answer)
        assert label["intent"] in {"book_table", "weather", "set_timer", "order_food"}
        if label["intent"] == "weather":
            assert label["city"] in prompt
    assert any(a.strip() == "Allemagne" for (p, _), (a, _) in examples["translation"] if "Germany" in p
               and "French" in p)


def test_holdout_is_evaluated_not_trained(tmp_path):
    from desmoe.config import DomainSection
    from desmoe.data import build_holdout

    cfg = _data({"d": {"builtin": "math"}}, seq_len=64, holdout_sequences=5)
    cfg.holdout = DomainSection(builtin="general")
    h = build_holdout(cfg, ByteTokenizer())
    assert h.eval_ids.shape == (5, 64) and h.train_ids.shape[0] == 0


def test_builtin_math_answers_are_correct():
    import re

    for text in builtin_examples("math")[:500]:
        q, ans = text.split("\nAnswer: ")
        m = re.search(r"What is (\d+) ([+\-]|times) (\d+)\?", q)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert int(ans) == {"+": a + b, "-": a - b, "times": a * b}[op]


def test_prompt_response_and_chat_train_only_on_answers(tmp_path):
    pr = _write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}])
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}])
    cfg = _data({"pr": {"train": pr, "format": "prompt_response"}, "chat": {"train": chat, "format": "chat"}},
                seq_len=64, eval_sequences=1)
    examples, _ = load_domain_examples(cfg)
    assert examples["pr"] == [[("Q: 2+2?", False), (" 4", True)]]
    assert examples["chat"][0][-1] == ("yo\n", True) and examples["chat"][0][1] == ("hi\n", False)
    tok = ByteTokenizer()
    ids, labels = encode_example(examples["pr"][0], tok)
    trained = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(trained) == " 4"
    packed_ids, packed_labels = pack_sequences([encode_example(examples["pr"][0], tok)], seq_len=64, bos_id=1,
                                               eos_id=2, pad_id=0)
    targets = [t for t in packed_labels[0].tolist() if t != IGNORE_INDEX]
    assert tok.decode(targets) == " 4" and targets[-1] == 2  # the answer and its end-of-example


@pytest.mark.parametrize("record,match", [
    ({"prompt": "x"}, r"the \"response\" field is missing"),
    ({"messages": []}, r"\"messages\" must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
])
def test_format_errors_name_the_record(tmp_path, record, match):
    fmt = "chat" if "messages" in record else "prompt_response"
    p = _write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=r"x\.jsonl:1: " + match):
        load_domain_examples(_data({"d": {"train": p, "format": fmt}}))


def test_parquet_and_save_to_disk_go_through_datasets(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "from parquet"}, {"text": "second"}])
    ds.to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).save_to_disk(str(tmp_path / "saved"))
    examples, _ = load_domain_examples(_data({"a": {"train": str(tmp_path / "a.parquet")},
                                              "b": {"train": str(tmp_path / "saved"), "format": "prompt_response"}}))
    assert examples["a"] == [[("from parquet", True)], [("second", True)]]
    assert examples["b"] == [[("p", False), ("r", True)]]
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*junk.parquet with the datasets library"):
        load_domain_examples(_data({"a": {"train": str(tmp_path / "junk.parquet")}}))


def test_on_bad_record_skip_counts_and_keeps_going(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "good 1"}\n{"text": broken}\n\xff\xfe\n{"txt": "no text"}\n{"text": "good 2"}\n')
    examples, report = load_domain_examples(_data({"d": {"train": str(p)}}, on_bad_record="skip"))
    assert [example_text(e) for e in examples["d"]] == ["good 1", "good 2"]
    assert report["d"].skipped == 3 and "d.jsonl:2: malformed JSON" in report["d"].first_skip
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_domain_examples(_data({"d": {"train": str(p)}}))


def test_sentencepiece_is_trained_once_cached_and_round_trips(tmp_path, monkeypatch):
    from desmoe.config import ModelSection
    from desmoe.data import SentencePieceTokenizer, build_tokenizer, train_sentencepiece

    monkeypatch.setenv("DESMOE_CACHE", str(tmp_path / "cache"))
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"the number {i} is {'even' if i % 2 == 0 else 'odd'}"}
                                            for i in range(400)])
    cfg = _data({"d": {"train": p}}, tokenizer="sentencepiece", spm_vocab_size=300)
    path = train_sentencepiece(cfg)
    mtime = os.path.getmtime(path)
    assert train_sentencepiece(cfg) == path and os.path.getmtime(path) == mtime  # cached, not retrained
    tok = build_tokenizer(cfg, ModelSection())
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "the number 7 is odd — ünïcode"
    assert tok.decode(tok.encode(text)) == text  # byte fallback keeps unseen characters
    assert len(tok.encode("the number 12 is even")) < len("the number 12 is even")
    (tmp_path / "broken.model").write_text("nope")
    with pytest.raises(DataError, match="cannot load the sentencepiece model"):
        SentencePieceTokenizer(str(tmp_path / "broken.model"))
