import pytest
import torch

from desmoe.data import IGNORE_INDEX
from desmoe.constants import METRICS
from desmoe.metrics import (chrf, chrf_statistics, exact_match, greedy_generate,
                            token_accuracy_counts)


def test_exact_match_normalises_whitespace_only():
    assert exact_match(" 42\n", "42") == 1.0
    assert exact_match('{"intent":  "weather",\n "city": "Oslo"}', '{"intent": "weather", "city": "Oslo"}') == 1.0
    assert exact_match("42.", "42") == 0.0
    assert exact_match("Allemagne", "allemagne") == 0.0


def test_chrf_by_hand():
    # "ab" vs "abc": 1-grams 2 hyp / 3 ref / 2 match, 2-grams 1 / 2 / 1, no 3-grams in the hypothesis, so
    # two effective orders: P = (2/2 + 1/1) / 2 = 1, R = (2/3 + 1/2) / 2 = 7/12,
    # F2 = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11
    assert chrf_statistics("ab", "abc")[:3] == [(2, 3, 2), (1, 2, 1), (0, 1, 0)]
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 7 / 11)
    assert chrf(["a b"], ["ab"]) == pytest.approx(100.0)  # whitespace is removed
    assert chrf(["same text"], ["same text"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0 and chrf([""], [""]) == 0.0 and chrf([], []) == 0.0


@pytest.mark.parametrize("preds,refs,expected", [
    # values from sacrebleu 2.x: CHRF().corpus_score(preds, [refs]).score (char order 6, beta 2, no word n-grams)
    (["The cat sat on the mat."], ["The cat is on the mat."], 67.17273492330233),
    (["a bird is on a stone"], ["a bird behind the stone"], 31.64938921981662),
    (["Allemagne", "janvier", "Espagne"], ["Allemagne", "Janvier", "l'Espagne"], 83.19803617525123),
    (["abc", "xyz"], ["abcd", "uvw"], 40.55851063829787),
    (["Die Katze sitzt auf der Matte.", "Heute ist es sonnig", "ein"],
     ["Die Katze saß auf der Matte.", "Es ist heute sonnig.", "eins"], 62.24147771603317),
])
def test_chrf_matches_sacrebleu(preds, refs, expected):
    assert chrf(preds, refs) == pytest.approx(expected, abs=1e-9)


def test_chrf_is_a_corpus_score_not_a_mean_of_sentences():
    preds, refs = ["abc", "xyz"], ["abcd", "uvw"]
    mean = (chrf(preds[:1], refs[:1]) + chrf(preds[1:], refs[1:])) / 2
    assert chrf(preds, refs) != pytest.approx(mean)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        chrf(preds, refs[:1])


def test_token_accuracy_counts_shift_and_skip_ignored():
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 3] = 1  # predicts labels[1] = 3: right
    logits[0, 1, 2] = 1  # predicts labels[2] = 1: wrong
    logits[0, 2, 0] = 1  # predicts labels[3]: ignored
    assert token_accuracy_counts(logits, labels) == (1, 2)
    assert set(METRICS) == {"exact_match", "chrf", "token_accuracy"}


class _Counting:
    """A fake model: next token = (last real token + 1) mod V; eos (2) after token 7. Counts its forwards."""

    def __init__(self):
        self.calls = 0

    def __call__(self, ids, mask, positions):
        self.calls += 1
        nxt = torch.where(ids[:, -1] == 7, torch.full_like(ids[:, -1], 2), (ids[:, -1] + 1) % 10)
        return torch.nn.functional.one_hot(nxt, 10).float().unsqueeze(1).expand(-1, ids.shape[1], -1)


def test_generation_runs_a_fixed_number_of_forwards_and_cuts_at_eos():
    fwd = _Counting()
    out = greedy_generate(fwd, [[5], [3, 4], [9], [0, 1, 2, 3], [6]], max_new_tokens=4, eos_id=2, pad_id=0,
                          batch_size=2)
    assert out == [[6, 7], [5, 6, 7], [0, 1], [4, 5, 6, 7], [7]]
    assert fwd.calls == 3 * 4  # ceil(5 / 2) batches x 4 steps, although every row hit eos early
    fwd = _Counting()
    assert greedy_generate(fwd, [[5]], max_new_tokens=3, eos_id=2, pad_id=0, batch_size=4, num_batches=3) == [[6, 7]]
    assert fwd.calls == 3 * 3  # a rank with fewer prompts runs dummy batches to match the others
    with pytest.raises(ValueError, match="too few"):
        greedy_generate(fwd, [[5]] * 5, max_new_tokens=1, eos_id=2, pad_id=0, batch_size=2, num_batches=2)


def test_batched_greedy_generation_equals_one_by_one_on_a_moe_model():
    from desmoe.models import build_tiny_model

    model = build_tiny_model({"model_type": "qwen3_moe"}, seed=0).eval()

    def forward(ids, mask, positions):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 11, 6, 1, 8)]
    alone = [greedy_generate(forward, [p], max_new_tokens=6, eos_id=2, pad_id=0, batch_size=1)[0] for p in prompts]
    batched = greedy_generate(forward, prompts, max_new_tokens=6, eos_id=2, pad_id=0, batch_size=3)
    assert batched == alone
    assert any(len(set(a)) > 1 for a in alone)  # the model is not constant, so the test means something
