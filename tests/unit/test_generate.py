"""desmoe.metrics.cached_greedy_generate (transformers' generate with a KV cache) against the
forward-only reference greedy_generate, on a tiny model of every family, in one process."""

import pytest
import torch

from desmoe.metrics import cached_greedy_generate, greedy_generate
from desmoe.models import FAMILIES, build_tiny_model

LENGTHS = (3, 11, 6, 1, 8)
NEW = 7


def _model(model_type):
    return build_tiny_model(dict(FAMILIES[model_type].tiny_defaults, model_type=model_type), seed=0).float().eval()


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS]


def _reference(model, prompts, *, eos_id, batch_size, vocab_size=None, num_batches=None):
    def forward(ids, mask, positions):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[..., :vocab_size]

    return greedy_generate(forward, prompts, max_new_tokens=NEW, eos_id=eos_id, pad_id=0, batch_size=batch_size,
                           num_batches=num_batches)


class _ForwardCount:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return _model(request.param)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_generation_equals_the_forward_only_reference(family_model, batch_size):
    model, prompts = family_model, _prompts()
    free = _reference(model, prompts, eos_id=2, batch_size=batch_size)
    assert any(len(set(row)) > 1 for row in free)  # the model is not constant, so the test means something
    # an eos the continuations do produce: the 4th token of the first row where it is new (cut to 3 there)
    eos_inside = next(row[3] for row in free if row[3] not in row[:3])
    needed = -(-len(prompts) // batch_size)
    for eos_id in (2, eos_inside):
        want = _reference(model, prompts, eos_id=eos_id, batch_size=batch_size)
        for num_batches in (None, needed + 2):  # more batches than needed: dummy batches, same result
            got = cached_greedy_generate(model, prompts, max_new_tokens=NEW, eos_id=eos_id, pad_id=0,
                                         batch_size=batch_size, num_batches=num_batches)
            assert got == want, (eos_id, num_batches)
    cut = _reference(model, prompts, eos_id=eos_inside, batch_size=batch_size)
    assert any(len(row) < NEW for row in cut)  # eos really stopped some rows early
    assert [len(row) for row in _reference(model, prompts, eos_id=2, batch_size=batch_size)].count(NEW) >= 1


def test_vocab_size_keeps_generated_ids_below_it(family_model):
    model, prompts = family_model, _prompts()
    free = _reference(model, prompts, eos_id=2, batch_size=3)
    vocab = min(max(row) for row in free)  # every row would generate an id at or past it
    want = _reference(model, prompts, eos_id=2, batch_size=3, vocab_size=vocab)
    got = cached_greedy_generate(model, prompts, max_new_tokens=NEW, eos_id=2, pad_id=0, batch_size=3,
                                 vocab_size=vocab)
    assert got == want and max(max(row) for row in got if row) < vocab


def test_forwards_are_one_prefill_and_one_per_further_token_and_stop_at_eos():
    model, prompts = _model("qwen3_moe"), _prompts()
    count = _ForwardCount(model)
    free = _reference(model, prompts, eos_id=2, batch_size=5)
    assert count.calls == NEW and all(len(row) == NEW for row in free)  # no eos: NEW full forwards
    count.calls = 0
    cached_greedy_generate(model, prompts, max_new_tokens=NEW, eos_id=2, pad_id=0, batch_size=5)
    assert count.calls == NEW  # prefill + NEW - 1 single-token steps
    eos = free[0][3]
    count.calls = 0
    got = cached_greedy_generate(model, prompts[:1], max_new_tokens=NEW, eos_id=eos, pad_id=0, batch_size=1)
    assert got == [free[0][:free[0].index(eos)]]
    assert count.calls == free[0].index(eos) + 1 < NEW  # stopped once the row produced eos


def test_the_models_own_generation_config_is_not_used_and_is_kept():
    model, prompts = _model("mixtral"), _prompts()
    want = _reference(model, prompts, eos_id=2, batch_size=2)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.do_sample = True
    model.generation_config.no_repeat_ngram_size = 1
    got = cached_greedy_generate(model, prompts, max_new_tokens=NEW, eos_id=2, pad_id=0, batch_size=2)
    assert got == want
    assert model.generation_config.repetition_penalty == 5.0


def test_same_contract_as_the_reference():
    model = _model("olmoe")
    kw = dict(eos_id=2, pad_id=0)
    assert cached_greedy_generate(model, [[5, 6]], max_new_tokens=0, batch_size=1, **kw) == [[]]
    assert cached_greedy_generate(model, [], max_new_tokens=3, batch_size=2, num_batches=2, **kw) == []
    with pytest.raises(ValueError, match="too few"):
        cached_greedy_generate(model, [[5]] * 5, max_new_tokens=1, batch_size=2, num_batches=2, **kw)
    with pytest.raises(ValueError, match="at least one token"):
        cached_greedy_generate(model, [[]], max_new_tokens=1, batch_size=1, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        cached_greedy_generate(model, [[5]], max_new_tokens=1, batch_size=0, **kw)


def test_evaluate_sets_with_the_model_gives_the_forward_only_results():
    from types import SimpleNamespace

    from desmoe.data import ByteTokenizer
    from desmoe.evaluation import evaluate_sets

    model, tok = _model("qwen2_moe"), ByteTokenizer()  # 512 embedding rows, 259 tokenizer ids

    def forward(ids, attention_mask=None, position_ids=None):
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits

    ids = torch.tensor([[1] + tok.encode("question 12 answer")] * 2)
    pairs = [("2+2=", "4"), ("the capital of france is", "paris"), ("x", "a longer reference text"), ("q", "b")]
    sets = {"s": SimpleNamespace(eval_ids=ids, eval_labels=ids.clone(), metrics=["exact_match", "chrf"],
                                 eval_pairs=pairs)}
    kw = dict(tokenizer=tok, batch_size=3, max_new_tokens=12)
    want = evaluate_sets(forward, sets, **kw)
    got = evaluate_sets(forward, sets, model=model, **kw)
    assert got == want
    assert any(x["prediction"] for x in got["s"]["examples"])
