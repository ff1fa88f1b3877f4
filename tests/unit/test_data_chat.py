"""Chat records through a Hugging Face tokenizer's own chat template (built offline here)."""

import json

import pytest

from desmoe.config import DataSection, DomainSection, ModelSection
from desmoe.data import (IGNORE_INDEX, DataError, HFTokenizer, build_domain_data, build_tokenizer, encode_example,
                         eval_pair, load_domain_examples, record_segments)

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine"}]


def _save_tokenizer(path, chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there how are you", "be brief, fine"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML)


def _trained_text(tok, example, **kw):
    ids, labels = encode_example(example, tok, **kw)
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_chat_template_renders_and_trains_on_assistant_turns_only(chatml_dir):
    tok = build_tokenizer(DataSection(tokenizer=chatml_dir), ModelSection())
    assert isinstance(tok, HFTokenizer) and tok.chat_template == CHATML
    example = record_segments({"messages": CONVERSATION}, "chat", "c.jsonl:1")
    ids, _ = encode_example(example, tok)
    assert tok.decode(ids) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                               "<|im_start|>assistant\nhi there<|im_end|>\n<|im_start|>user\nhow are you<|im_end|>\n"
                               "<|im_start|>assistant\nfine<|im_end|>\n")
    assert ids[0] == tok.tok.convert_tokens_to_ids("<|im_start|>")  # one special token, and no bos (packing adds it)
    assert tok.bos_id not in ids
    assert _trained_text(tok, example) == "hi there<|im_end|>\nfine<|im_end|>\n"
    prompt, reference = eval_pair(example, tok)
    assert prompt.endswith("<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")
    assert reference == "fine"


def test_desmoe_rendering_without_a_template_or_when_asked(chatml_dir, tmp_path):
    example = record_segments({"messages": CONVERSATION}, "chat", "c.jsonl:1")
    plain = HFTokenizer(_save_tokenizer(tmp_path / "plain", None))
    assert plain.chat_template is None
    assert _trained_text(plain, example) == "hi there\nfine\n"
    assert eval_pair(example, plain) == (
        "<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\nhi there\n<|user|>\nhow are you\n<|assistant|>\n",
        "fine")
    assert _trained_text(HFTokenizer(chatml_dir), example, chat_template="desmoe") == "hi there\nfine\n"


def test_packed_chat_domain_masks_everything_but_assistant_turns(chatml_dir, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(40)))
    cfg = DataSection(domains={"c": DomainSection(train=str(path), format="chat")}, seq_len=32, eval_sequences=2,
                      tokenizer=chatml_dir)
    tok = build_tokenizer(cfg, ModelSection())
    d = build_domain_data(cfg, tok)[0]["c"]
    targets = [t for t in d.train_labels.flatten().tolist() if t != IGNORE_INDEX]
    text = tok.decode(targets)
    assert "question" not in text and "user" not in text and text.count("answer") == 40 - len(d.eval_examples)
    assert d.metric == "token_accuracy"
    assert d.eval_pairs[0][0].endswith("<|im_start|>assistant\n") and d.eval_pairs[0][1].startswith("answer ")


def test_a_template_that_rewrites_earlier_turns_is_reported(tmp_path):
    rewriting = "{% for m in messages %}{{ m['content'] }}{% endfor %}[{{ messages|length }}]"
    tok = HFTokenizer(_save_tokenizer(tmp_path / "rw", rewriting))
    example = record_segments({"messages": CONVERSATION}, "chat", "c.jsonl:7")
    with pytest.raises(DataError, match=r"c\.jsonl:7: the tokenizer's chat template does not render the "
                                        r"conversation incrementally \(messages\[:2\].*data\.chat_template: desmoe"):
        encode_example(example, tok)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}x"
    tok = HFTokenizer(_save_tokenizer(tmp_path / "strict", strict))
    with pytest.raises(DataError, match=r"c\.jsonl:7: the tokenizer's chat template cannot render .*must start"):
        encode_example(example, tok)


def test_chat_records_still_load_as_segments(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    examples, _ = load_domain_examples(DataSection(domains={"c": DomainSection(train=str(path), format="chat")}))
    assert examples["c"][0] == [("<|user|>\n", False), ("hello\n", False), ("<|assistant|>\n", False),
                                ("hi there\n", True)]
    assert examples["c"][0].messages == CONVERSATION[1:3]


def test_template_errors_follow_on_bad_record(tmp_path):
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
              "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok_dir = _save_tokenizer(tmp_path / "strict", strict)
    path = tmp_path / "c.jsonl"
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(30)]
    records.insert(3, {"messages": CONVERSATION})  # starts with a system message: the template refuses it
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataSection(domains={"c": DomainSection(train=str(path), format="chat")}, seq_len=32, eval_sequences=1,
                      tokenizer=tok_dir)
    tok = build_tokenizer(cfg, ModelSection())
    with pytest.raises(DataError, match=r"c\.jsonl:4: the tokenizer's chat template cannot render"):
        build_domain_data(cfg, tok)
    cfg.on_bad_record = "skip"
    domains, report = build_domain_data(cfg, tok)
    assert report["c"].skipped == 1 and "c.jsonl:4" in report["c"].first_skip
    assert domains["c"].examples == 30
