"""desmoe export's tokenizer: ``AutoTokenizer.from_pretrained(DIR)`` encodes and decodes as training did.

For the byte tokenizer and for a sentencepiece model desmoe trained on the built-in corpora, on
examples of every built-in domain (the segments training encodes, the prompts evaluation generates
from), non-ASCII text and code with tabs, newlines and runs of spaces.
"""

import json
import os

import pytest

from desmoe import export
from desmoe.config import config_from_dict
from desmoe.data import (ByteTokenizer, SentencePieceTokenizer, build_tokenizer, encode_example, eval_pair,
                         load_domain_examples, prompt_ids)
from desmoe.data.builtin import BUILTIN_DOMAINS
from desmoe.export import EXPORT_META, HF_TOKENIZER_FILES, SPM_FILE, export_run, save_tokenizer
from desmoe.rundir import load_run_config
from tests.unit.test_export import make_run

EXTRA = ["é, 中文, 😀 — naïve café", "def add(a, b):\n\tif a:\n\t\treturn a  +   b\n\n    return  b\n",
         "  two  spaces\tand a tab  ", "<s> literal </s> <pad> <unk>", "ﬁ Ｈｅｌｌｏ ① x\u00a0y\u3000z", "", " \n\t "]
PER_DOMAIN = 40


def _cfg(**data):
    return config_from_dict({"model": {"tiny": {"model_type": "qwen3_moe"}},
                             "data": {"domains": {d: {"builtin": d} for d in BUILTIN_DOMAINS}, **data}})


@pytest.fixture(scope="module")
def examples():
    """PER_DOMAIN examples of every built-in domain, spread over each corpus."""
    exs, _ = load_domain_examples(_cfg().data)
    assert set(exs) == set(BUILTIN_DOMAINS)
    return {d: e[::max(1, len(e) // PER_DOMAIN)] for d, e in exs.items()}


@pytest.fixture(scope="module")
def spm_cfg(tmp_path_factory):
    """A config whose tokenizer is desmoe's sentencepiece model of the built-in corpora (small vocabulary,
    trained into a cache of this module's own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DESMOE_CACHE", str(tmp_path_factory.mktemp("spm_cache")))
    yield _cfg(tokenizer="sentencepiece", spm_vocab_size=512)
    mp.undo()


def _export_tokenizer(cfg, out):
    from transformers import AutoTokenizer

    out.mkdir()
    desc = save_tokenizer(cfg, str(out))
    return desc, AutoTokenizer.from_pretrained(out), build_tokenizer(cfg.data, cfg.model)


def _assert_same_ids(hf, tok, examples, *, exact_decode):
    """Segment by segment, example by example and prompt by prompt, ``hf`` gives training's ids; decoding
    gives training's text (``exact_decode``: the original text)."""
    for domain, exs in examples.items():
        for ex in exs:
            ids = []
            for text, _ in ex:
                got = hf.encode(text, add_special_tokens=False)
                assert got == tok.encode(text), (domain, text)
                assert hf.decode(got, skip_special_tokens=True) == tok.decode(got), (domain, text)
                if exact_decode:
                    assert hf.decode(got) == text
                ids += got
            assert ids == encode_example(ex, tok)[0], domain
            pair = eval_pair(ex, tok)
            if pair is not None:
                assert hf(pair[0])["input_ids"] == prompt_ids(pair[0], tok), (domain, pair[0])
    for text in EXTRA:
        got = hf(text)["input_ids"]
        assert got == [tok.bos_id] + tok.encode(text) == prompt_ids(text, tok), text
        assert hf.decode(got, skip_special_tokens=True) == tok.decode(got[1:]), text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)


def test_byte_tokenizer_export_encodes_and_decodes_as_training(tmp_path, examples):
    desc, hf, tok = _export_tokenizer(_cfg(tokenizer="byte"), tmp_path / "out")
    assert isinstance(tok, ByteTokenizer) and desc["kind"] == "byte" and "259" in desc["note"]
    assert desc["transformers"] and desc["files"] == list(HF_TOKENIZER_FILES)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(HF_TOKENIZER_FILES)
    assert len(hf) == hf.vocab_size == 259
    assert hf.encode("def add(a, b):", add_special_tokens=False) == [b + 3 for b in b"def add(a, b):"]
    _assert_same_ids(hf, tok, examples, exact_decode=True)
    for text in EXTRA:
        ids = hf(text)["input_ids"]
        assert hf.decode(ids[1:]) == text and hf.decode(ids, skip_special_tokens=True) == text
    assert hf.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<pad>", "<s>", "</s>", "<0x00>", "<0xFF>"]


def test_sentencepiece_export_encodes_and_decodes_as_training(tmp_path, examples, spm_cfg):
    desc, hf, tok = _export_tokenizer(spm_cfg, tmp_path / "out")
    assert isinstance(tok, SentencePieceTokenizer) and tok.sp.get_piece_size() == 512
    assert desc["kind"] == "sentencepiece" and desc["file"] == SPM_FILE and desc["transformers"]
    assert (desc["pad_id"], desc["bos_id"], desc["eos_id"]) == (0, 1, 2)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([SPM_FILE, *HF_TOKENIZER_FILES])
    assert (tmp_path / "out" / SPM_FILE).read_bytes() == open(tok.path, "rb").read()
    _assert_same_ids(hf, tok, examples, exact_decode=False)
    # byte fallback: characters the model has no piece for are their UTF-8 bytes, decoded back
    text = "é, 中文, 😀"
    ids = hf.encode(text, add_special_tokens=False)
    assert "<0xF0>" in hf.convert_ids_to_tokens(ids) and hf.decode(ids) == tok.decode(ids) == text
    # sentencepiece's nmt_nfkc normalisation, as in training: tabs and newlines are spaces, runs of them one
    code = "def f(x):\n\treturn  x"
    assert hf.decode(hf.encode(code, add_special_tokens=False)) == tok.decode(tok.encode(code)) == "def f(x): return x"


def test_other_sentencepiece_models_unigram_and_without_byte_fallback(tmp_path, examples):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(t.split()) for exs in examples.values() for ex in exs for t, _ in ex
                                if t.strip()))
    for model_type, byte_fallback in (("unigram", True), ("bpe", False)):
        prefix = tmp_path / f"{model_type}_{byte_fallback}"
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=400,
                                       model_type=model_type, byte_fallback=byte_fallback, pad_id=0, bos_id=1,
                                       eos_id=2, unk_id=3, minloglevel=2)
        cfg = _cfg(tokenizer=f"{prefix}.model")
        desc, hf, tok = _export_tokenizer(cfg, tmp_path / f"out_{model_type}_{byte_fallback}")
        assert desc["transformers"], desc
        for text in [t for exs in examples.values() for ex in exs for t, _ in ex] + EXTRA:
            assert hf(text)["input_ids"] == prompt_ids(text, tok), (model_type, byte_fallback, text)


def test_a_tokenizer_that_would_not_encode_as_training_is_not_written(tmp_path, monkeypatch, caplog):
    from tokenizers import Tokenizer, models

    monkeypatch.setattr(export, "byte_tokenizer_backend",
                        lambda: Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "?": 3}, unk_token="?")))
    (tmp_path / "out").mkdir()
    desc = save_tokenizer(_cfg(tokenizer="byte"), str(tmp_path / "out"))
    assert desc["kind"] == "byte" and desc["transformers"] is None
    assert "would not encode as training did" in desc["transformers_note"]
    assert os.listdir(tmp_path / "out") == []
    assert "no Hugging Face tokenizer written" in caplog.text


def test_export_run_writes_tokenizers_automodel_directories_load(tmp_path, monkeypatch):
    """Through desmoe export: the directory (config.json of a model family beside it) gives the tokenizer
    desmoe wrote, not one of the family's tokenizer classes."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("DESMOE_CACHE", str(tmp_path / "cache"))
    model_files = ["config.json", EXPORT_META, "generation_config.json", "model.safetensors"]
    for kind, data, extra in (("byte", None, []),
                              ("sentencepiece", {"tokenizer": "sentencepiece", "spm_vocab_size": 512}, [SPM_FILE])):
        run_dir, _ = make_run(tmp_path, name=kind, data=data)
        out = tmp_path / f"{kind}_out"
        meta = export_run(run_dir, str(out))
        assert sorted(os.listdir(out)) == sorted(model_files + extra + list(HF_TOKENIZER_FILES))
        assert json.loads((out / EXPORT_META).read_text())["tokenizer"] == meta["tokenizer"]
        assert meta["tokenizer"]["kind"] == kind and meta["tokenizer"]["transformers"]
        hf = AutoTokenizer.from_pretrained(out)
        cfg = load_run_config(run_dir)
        tok = build_tokenizer(cfg.data, cfg.model)
        for text in EXTRA + ["def add(a, b):", "Question: 3 + 4?\nAnswer: 7"]:
            assert hf(text)["input_ids"] == prompt_ids(text, tok), (kind, text)
        assert hf.encode("def add(a, b):", add_special_tokens=False) == tok.encode("def add(a, b):") != []
