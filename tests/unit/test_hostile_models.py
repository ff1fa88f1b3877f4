"""Model directories that ship their own code: never imported unless model.trust_remote_code is true."""

import json

import pytest

from desmoe.models import ModelError, build_tiny_model, load_pretrained_config, load_pretrained_model

TINY = {"model_type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "vocab_size": 64}


def _model_dir_with_code(tmp_path, model_type):
    d = tmp_path / "model"
    build_tiny_model(TINY, seed=0).save_pretrained(d)
    marker = tmp_path / "code_ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    (d / "configuration_evil.py").write_text(code)
    (d / "modeling_evil.py").write_text(code)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


def test_known_family_with_shipped_code_loads_the_stock_class_and_runs_nothing(tmp_path):
    d, marker = _model_dir_with_code(tmp_path, "qwen3_moe")
    model = load_pretrained_model(str(d))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert not marker.exists()


def test_unknown_family_that_needs_its_own_code_is_refused(tmp_path):
    d, marker = _model_dir_with_code(tmp_path, "evil")
    with pytest.raises(ModelError) as e:
        load_pretrained_config(str(d))
    assert "evil" in str(e.value)
    assert not marker.exists()


def test_a_bare_sentencepiece_model_in_model_path_is_its_tokenizer(tmp_path):
    from desmoe.config import DataSection, ModelSection
    from desmoe.data import ByteTokenizer, SentencePieceTokenizer, build_tokenizer

    import sentencepiece as spm

    d = tmp_path / "model"
    d.mkdir()
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a small corpus for a tokenizer" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tokenizer"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = build_tokenizer(DataSection(), ModelSection(path=str(d)))
    assert isinstance(tok, SentencePieceTokenizer)
    (d / "tokenizer.model").unlink()
    assert isinstance(build_tokenizer(DataSection(), ModelSection(path=str(d))), ByteTokenizer)
