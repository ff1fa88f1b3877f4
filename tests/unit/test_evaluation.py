"""desmoe.evaluation's pure functions, and evaluate_sets with a hand-made forward on the CPU."""

import math
from types import SimpleNamespace

import pytest
import torch

from desmoe.constants import IGNORE_INDEX
from desmoe.data import ByteTokenizer
from desmoe.evaluation import evaluate_sets, flat_metrics, is_better, markdown_table, mean_domain, select_value

X = IGNORE_INDEX
RESULTS = {"math": {"loss": 1.0, "ppl": math.e, "exact_match": 0.5, "pairs": 4},
           "code": {"loss": 3.0, "ppl": math.e ** 3, "token_accuracy": 0.25},
           "holdout": {"loss": 10.0}}


def test_mean_domain_and_select_value():
    assert mean_domain(RESULTS, ["math", "code"], "loss") == 2.0
    assert mean_domain(RESULTS, ["math", "code", "absent"], "exact_match") == 0.5  # only sets that have it
    assert mean_domain(RESULTS, ["code"], "exact_match") is None
    assert select_value(RESULTS, ["math", "code"], "loss") == 2.0  # the domains only: not the holdout
    assert select_value(RESULTS, ["math", "code"], "mean/token_accuracy") == 0.25
    assert select_value(RESULTS, ["math", "code"], "holdout/loss") == 10.0
    assert select_value(RESULTS, ["math"], "code/ppl") == math.e ** 3
    assert select_value(RESULTS, ["math"], "code/chrf") is None
    assert select_value(RESULTS, ["math"], "nope/loss") is None


@pytest.mark.parametrize("key,new,old,want", [
    ("loss", 1.0, None, True), ("loss", 1.0, 2.0, True), ("loss", 2.0, 1.0, False), ("loss", 1.0, 1.0, False),
    ("mean/ppl", 3.0, 4.0, True), ("math/exact_match", 0.6, 0.5, True), ("math/exact_match", 0.4, 0.5, False),
    ("mean/chrf", 50.0, 40.0, True), ("code/token_accuracy", 0.2, 0.3, False),
])
def test_is_better_knows_which_way_each_metric_goes(key, new, old, want):
    assert is_better(key, new, old) is want


def test_flat_metrics_keeps_the_numbers():
    results = {"math": {"loss": 1, "pairs": 4, "examples": [{"prompt": "p"}], "chrf": 12.5}}
    flat = flat_metrics(results, "eval")
    assert flat == {"eval/math/loss": 1.0, "eval/math/chrf": 12.5}
    assert all(type(v) is float for v in flat.values())


def test_markdown_table():
    after = {"math": {"loss": 1.0, "exact_match": 0.5, "pairs": 4}, "code": {"loss": 2.25}}
    assert markdown_table(None, after).splitlines() == [
        "| set | loss | exact_match |",
        "|---|---|---|",
        "| math | 1.0000 | 0.5000 |",
        "| code | 2.2500 |  |",
    ]
    before = {"math": {"loss": 1.5}}
    assert markdown_table(before, after).splitlines() == [
        "| set | loss before | loss after | exact_match before | exact_match after |",
        "|---|---|---|---|---|",
        "| math | 1.5000 | 1.0000 |  | 0.5000 |",
        "| code |  | 2.2500 |  |  |",
    ]


# ---- evaluate_sets -----------------------------------------------------------------------------

V = 4
HIT = math.log(math.e ** 2 + V - 1) - 2  # -log p of the token the forward favours
MISS = math.log(math.e ** 2 + V - 1)  # -log p of any other token


def copy_forward(ids, attention_mask=None, position_ids=None):
    """Logits [B, T, V] that favour, at position t, the token ids[t] (logit 2, others 0): the next token
    is predicted to repeat the current one."""
    return 2.0 * torch.nn.functional.one_hot(ids, V).float()


def domain(ids, labels, metrics=("token_accuracy",), pairs=()):
    return SimpleNamespace(eval_ids=torch.tensor(ids), eval_labels=torch.tensor(labels), metrics=list(metrics),
                           eval_pairs=list(pairs))


# labels[t + 1] is predicted at position t: hit when labels[t + 1] == ids[t]
ROWS = [[1, 2, 2, 3], [3, 3, 0, 0], [0, 1, 1, 1]]
LABELS = [[X, 2, 2, 3],  # 1->2 miss, 2->2 hit, 2->3 miss
          [X, 3, X, X],  # 3->3 hit
          [X, X, 1, 1]]  # 1->1 hit, 1->1 hit


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_evaluate_sets_loss_ppl_accuracy_by_hand(batch_size):
    sets = {"a": domain(ROWS, LABELS), "b": domain(ROWS[1:2], LABELS[1:2])}
    out = evaluate_sets(copy_forward, sets, batch_size=batch_size)
    loss = (4 * HIT + 2 * MISS) / 6
    assert out["a"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert out["a"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert out["a"]["token_accuracy"] == pytest.approx(4 / 6)
    assert out["b"] == pytest.approx({"loss": HIT, "ppl": math.exp(HIT), "token_accuracy": 1.0}, rel=1e-6)


def test_evaluate_sets_counts_only_this_ranks_rows():
    # rank 1 of 2 owns row 1; its second batch has no row (weight 0: not counted)
    out = evaluate_sets(copy_forward, {"a": domain(ROWS, LABELS)}, rank=1, world_size=2, batch_size=1)
    assert out["a"]["loss"] == pytest.approx(HIT, rel=1e-6) and out["a"]["token_accuracy"] == 1.0
    out = evaluate_sets(copy_forward, {"a": domain(ROWS, LABELS)}, rank=0, world_size=2, batch_size=1)
    assert out["a"]["loss"] == pytest.approx((3 * HIT + 2 * MISS) / 5, rel=1e-6)  # rows 0 and 2
    assert out["a"]["token_accuracy"] == pytest.approx(3 / 5)


A = ByteTokenizer().encode("a")[0]


def three_a_forward(ids, attention_mask=None, position_ids=None):
    """Byte-tokenizer logits: "a" while fewer than three "a" are in the sequence, then eos."""
    count = (ids == A).long().cumsum(dim=1)
    nxt = torch.where(count < 3, torch.full_like(ids, A), torch.full_like(ids, ByteTokenizer.eos_id))
    return torch.nn.functional.one_hot(nxt, ByteTokenizer.vocab_size + 5).float()  # extra rows never generated


def test_evaluate_sets_generation_metrics():
    tok = ByteTokenizer()
    ids = [[1] + tok.encode("qqqqqqq")] * 2
    labels = [[X] + tok.encode("qqqqqqq")] * 2
    pairs = [("q", "aaa"), ("qq", "bbb"), ("qqq", "aaa"), ("q", "never scored: past max_pairs")]
    sets = {"em": domain(ids, labels, ("exact_match",), pairs), "acc": domain(ids, labels, ("token_accuracy",), pairs)}
    out = evaluate_sets(three_a_forward, sets, tokenizer=tok, batch_size=2, max_pairs=3)
    assert out["em"]["exact_match"] == pytest.approx(2 / 3) and out["em"]["pairs"] == 3
    assert "chrf" not in out["em"]
    assert out["em"]["examples"] == [{"prompt": p, "reference": r, "prediction": "aaa"} for p, r in pairs[:3]]
    assert set(out["acc"]) == {"loss", "ppl", "token_accuracy"}  # no generation for a non-generation metric
    # without a tokenizer: no generation at all
    assert set(evaluate_sets(three_a_forward, sets)["em"]) == {"loss", "ppl", "token_accuracy"}
