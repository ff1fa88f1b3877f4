"""Evaluation: per-domain loss, perplexity, next-token accuracy and task metrics (exact match, chrF).

Works on any ``forward(input_ids, attention_mask=None, position_ids=None) -> logits``: the training
engine on every rank (expert parallelism: every rank runs the same number of forwards) or an
exported Hugging Face model in one process (``desmoe eval``: desmoe.eval_checkpoint). Given the
Hugging Face ``model`` too (under DeepSpeed ``engine.module``), the greedy generation of exact match /
chrF runs through its KV-cached ``generate`` (desmoe.metrics.cached_greedy_generate) instead of one
full forward per new token; the tokens are the same.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from desmoe import dist
from desmoe.constants import GENERATION_METRICS, IGNORE_INDEX
from desmoe.data import DomainData, prompt_ids
from desmoe.metrics import cached_greedy_generate, chrf, exact_match, greedy_generate, token_accuracy_counts

HIGHER_IS_BETTER = {"loss": False, "ppl": False, "token_accuracy": True, "exact_match": True, "chrf": True}


@torch.no_grad()
def evaluate_sets(forward: Callable, sets: dict[str, DomainData], *, tokenizer=None, rank: int = 0,
                  world_size: int = 1, batch_size: int = 4, max_new_tokens: int = 32, max_pairs: int = 32,
                  device="cpu", model=None) -> dict[str, dict[str, float]]:
    """{set name: {"loss", "ppl", "token_accuracy", and the set's generation metrics}}, over every rank.

    Loss and accuracy come from the held-out rows (``eval_ids``); exact match / chrF from greedy
    continuations of up to ``max_pairs`` (prompt, reference) pairs per set, cut at eos, at most
    ``max_new_tokens`` (or the longest reference + 1) new tokens: through ``model.generate`` with a KV
    cache when ``model`` (the Hugging Face model ``forward`` runs, in eval mode) is given, else
    through ``forward`` (one full forward per new token). Every rank passes a model or none does.
    """
    names = list(sets)
    sums = torch.zeros(len(names), 4, dtype=torch.float64)  # loss sum, tokens, correct, counted
    for j, name in enumerate(names):
        d = sets[name]
        mine = list(range(rank, d.eval_ids.shape[0], world_size))
        per_rank = math.ceil(d.eval_ids.shape[0] / world_size)
        for start in range(0, per_rank, batch_size):
            rows = mine[start:start + batch_size]
            weight = 1.0 if rows else 0.0  # a rank short of rows repeats one with weight 0
            idx = torch.tensor(rows or [0], dtype=torch.long)
            ids, labels = d.eval_ids[idx].to(device), d.eval_labels[idx].to(device)
            logits = forward(ids).float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            correct, counted = token_accuracy_counts(logits, labels)
            sums[j] += weight * torch.tensor([loss.item(), (targets != IGNORE_INDEX).sum().item(), correct, counted],
                                             dtype=torch.float64)
    dist.all_reduce_sum(sums)
    out = {}
    for j, name in enumerate(names):
        loss = float(sums[j, 0] / sums[j, 1].clamp(min=1))
        out[name] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                     "token_accuracy": float(sums[j, 2] / sums[j, 3].clamp(min=1))}
    if tokenizer is None:
        return out
    for name in names:
        d = sets[name]
        wanted = [m for m in d.metrics if m in GENERATION_METRICS]
        if not wanted or not d.eval_pairs:
            continue
        pairs = d.eval_pairs[:max_pairs]
        preds = _generate(forward, pairs, tokenizer, rank=rank, world_size=world_size, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, seq_len=d.eval_ids.shape[1], device=device, model=model)
        refs = [ref for _, ref in pairs]
        if "exact_match" in wanted:
            out[name]["exact_match"] = sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(refs)
        if "chrf" in wanted:
            out[name]["chrf"] = chrf(preds, refs)
        out[name]["pairs"] = len(refs)
        out[name]["examples"] = [{"prompt": p[-200:], "reference": r, "prediction": x}
                                 for (p, r), x in list(zip(pairs, preds))[:3]]
    return out


def _generate(forward, pairs, tokenizer, *, rank, world_size, batch_size, max_new_tokens, seq_len, device,
              model=None) -> list[str]:
    """Greedy predictions of every pair (each rank generates its share; all ranks get all of them)."""
    budget = min(max_new_tokens, max(len(tokenizer.encode(ref)) for _, ref in pairs) + 1)
    keep = max(1, seq_len - budget)
    prompts = [prompt_ids(p, tokenizer)[-keep:] for p, _ in pairs]  # long prompts keep their end
    mine = list(range(rank, len(prompts), world_size))
    num_batches = math.ceil(math.ceil(len(prompts) / world_size) / batch_size)
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else tokenizer.eos_id

    vocab = tokenizer.vocab_size
    common = dict(max_new_tokens=budget, eos_id=tokenizer.eos_id, pad_id=pad, batch_size=batch_size,
                  num_batches=num_batches, device=device)
    if model is not None:
        # NOTE: synced (transformers' synced_gpus): every rank keeps running forwards until all ranks'
        # batches have stopped at eos, so the expert all-to-alls match.
        outs = cached_greedy_generate(model, [prompts[i] for i in mine], synced=world_size > 1, vocab_size=vocab,
                                      **common)
    else:
        def fwd(ids, mask, positions):
            # the embedding may have more rows than the tokenizer has ids: never generate one of those
            return forward(ids, attention_mask=mask, position_ids=positions)[..., :vocab]

        outs = greedy_generate(fwd, [prompts[i] for i in mine], **common)
    texts = {i: tokenizer.decode(o) for i, o in zip(mine, outs)}
    if world_size > 1:
        merged = {}
        for part in dist.all_gather_objects(texts):
            merged.update(part)
        texts = merged
    return [texts[i] for i in range(len(prompts))]


def mean_domain(results: dict[str, dict[str, float]], domains: list[str], metric: str) -> float | None:
    vals = [results[d][metric] for d in domains if d in results and metric in results[d]]
    return sum(vals) / len(vals) if vals else None


def select_value(results: dict, domains: list[str], key: str) -> float | None:
    """The value of ``eval.best_metric``: "loss" (mean domain loss), "mean/<metric>" or "<set>/<metric>"."""
    if key == "loss":
        return mean_domain(results, domains, "loss")
    scope, _, metric = key.partition("/")
    if scope == "mean":
        return mean_domain(results, domains, metric)
    return results.get(scope, {}).get(metric)


def is_better(key: str, new: float, old: float | None) -> bool:
    metric = key.rpartition("/")[2]
    if old is None:
        return True
    return new > old if HIGHER_IS_BETTER.get(metric, False) else new < old


def flat_metrics(results: dict, prefix: str) -> dict[str, float]:
    """{"<prefix>/<set>/<metric>": value} of the numeric results (for MLflow)."""
    return {f"{prefix}/{s}/{m}": float(v) for s, ms in results.items() for m, v in ms.items()
            if isinstance(v, (int, float)) and m != "pairs"}


def markdown_table(before: dict | None, after: dict) -> str:
    """A markdown table: one row per set, each metric after (and before, when given)."""
    metrics = []
    for ms in after.values():
        for m in ms:
            if m in HIGHER_IS_BETTER and m not in metrics:
                metrics.append(m)
    head = ["set"] + [f"{m} {w}" for m in metrics for w in (("before", "after") if before else ("",))]
    lines = ["| " + " | ".join(h.strip() for h in head) + " |", "|" + "---|" * len(head)]
    for s, ms in after.items():
        cells = [s]
        for m in metrics:
            vals = ([before.get(s, {}).get(m)] if before else []) + [ms.get(m)]
            cells += ["" if v is None else f"{v:.4f}" for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
