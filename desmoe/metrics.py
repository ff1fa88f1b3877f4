"""Task metrics of the domains, and the greedy generation they score.

Pure functions: strings in, numbers out; ``greedy_generate`` is told how to run the model (a
``forward`` callable), ``cached_greedy_generate`` is handed the Hugging Face model (KV-cached
``generate``); neither touches engines, and only the latter's ``synced`` mode talks to other ranks.

Metric names (what ``DomainData.metrics`` and ``data.domains.<name>.metric`` hold):

- ``exact_match`` — the generated answer equals the reference after whitespace normalisation.
- ``chrf`` — corpus chrF (character n-grams 1..6, beta 2, whitespace removed), sacrebleu's CHRF
  defaults without word n-grams; 0..100.
- ``token_accuracy`` — next-token accuracy on the held-out rows' trained tokens (no generation).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from desmoe.constants import IGNORE_INDEX


def normalize_answer(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when ``pred`` equals ``ref`` after whitespace normalisation, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def char_ngrams(text: str, max_order: int) -> list[Counter]:
    """Counters of the character n-grams of ``text`` with whitespace removed, for n = 1..max_order."""
    s = "".join(text.split())
    return [Counter(s[i:i + n] for i in range(len(s) - n + 1)) for n in range(1, max_order + 1)]


def chrf_statistics(pred: str, ref: str, *, char_order: int = 6) -> list[tuple[int, int, int]]:
    """Per order n: (n-grams in pred, n-grams in ref, matching n-grams, clipped). Sum these over a corpus."""
    return [(sum(h.values()), sum(r.values()), sum((h & r).values()))
            for h, r in zip(char_ngrams(pred, char_order), char_ngrams(ref, char_order))]


def compute_chrf(stats: Sequence[tuple[int, int, int]], *, beta: float = 2.0) -> float:
    """chrF (0..100) from summed statistics: precision and recall averaged over the orders that
    both sides have n-grams of (sacrebleu's effective order), then their F-beta."""
    prec = rec = 0.0
    orders = 0
    for n_hyp, n_ref, n_match in stats:
        if n_hyp > 0 and n_ref > 0:
            prec += n_match / n_hyp
            rec += n_match / n_ref
            orders += 1
    if orders == 0:
        return 0.0
    prec, rec = prec / orders, rec / orders
    if prec + rec == 0:
        return 0.0
    factor = beta ** 2
    return 100.0 * (1 + factor) * prec * rec / (factor * prec + rec)


def chrf(preds: Sequence[str], refs: Sequence[str], *, char_order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF of ``preds`` against one reference each (n-gram counts summed over the corpus)."""
    if len(preds) != len(refs):
        raise ValueError(f"chrf: {len(preds)} predictions but {len(refs)} references")
    total = [[0, 0, 0] for _ in range(char_order)]
    for p, r in zip(preds, refs):
        for acc, st in zip(total, chrf_statistics(p, r, char_order=char_order)):
            for k in range(3):
                acc[k] += st[k]
    return compute_chrf([tuple(t) for t in total], beta=beta)


def token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) next-token predictions: logits [B, L, V] at position t predict labels[:, t + 1];
    positions labelled IGNORE_INDEX are not counted. Sum both over batches and ranks, then divide."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    pred = logits[:, :-1].argmax(-1).to(targets.device)
    return int(((pred == targets) & keep).sum()), int(keep.sum())


def _check_generate_args(prompts, *, max_new_tokens: int, batch_size: int, num_batches: int | None) -> int:
    """The number of batches to run (ValueError on what cannot be generated)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    needed = -(-len(prompts) // batch_size)
    if num_batches is None:
        return needed
    if num_batches < needed:
        raise ValueError(f"num_batches={num_batches} is too few for {len(prompts)} prompts in batches of "
                         f"{batch_size} (needs {needed})")
    return num_batches


def _left_padded_batches(prompts, *, batch_size: int, num_batches: int, pad_id: int, extra: int, device):
    """(input_ids, attention_mask, dummy) of each batch: the prompts left-padded to the batch's longest
    and ``extra`` more columns (pad ids, mask 1) for the new tokens; a batch past the prompts is one
    dummy one-token row (``dummy`` True) that only keeps the forward count."""
    for b in range(num_batches):
        batch = [list(p) for p in prompts[b * batch_size:(b + 1) * batch_size]]
        dummy = not batch
        if dummy:
            batch = [[pad_id]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width + extra), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width + extra), dtype=torch.long, device=device)
        for i, p in enumerate(batch):
            ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long, device=device)
            mask[i, width - len(p):width] = 1
        mask[:, width:] = 1
        yield ids, mask, dummy


def _cut_at_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def greedy_generate(forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                    prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                    batch_size: int, num_batches: int | None = None,
                    device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy continuation of each prompt; returns the new tokens, cut before the first ``eos_id``.

    ``forward(input_ids, attention_mask, position_ids) -> logits`` takes int64 [B, T] tensors on
    ``device`` and returns [B, T, V]. Prompts are left-padded in batches of ``batch_size`` (mask 0
    on the padding, positions counted from each prompt's first token), so a prompt's result does
    not depend on what it is batched with.

    The reference path (no KV cache: every new token re-runs the whole sequence); evaluation uses
    ``cached_greedy_generate``, which gives the same tokens.

    NOTE: expert parallelism needs every rank to run the same number of forwards (each is a
    series of all-to-alls). This runs exactly ``num_batches x max_new_tokens`` forwards whatever
    the tokens: no early stop at eos. ``num_batches`` defaults to ceil(len(prompts) / batch_size);
    a rank with fewer prompts than the others passes the largest count, and runs dummy one-token
    batches to make it up.
    """
    num_batches = _check_generate_args(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       num_batches=num_batches)
    out: list[list[int]] = []
    for ids, mask, dummy in _left_padded_batches(prompts, batch_size=batch_size, num_batches=num_batches,
                                                 pad_id=pad_id, extra=max_new_tokens, device=device):
        width = ids.shape[1] - max_new_tokens
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for t in range(width, ids.shape[1]):
            logits = forward(ids[:, :t], mask[:, :t], positions[:, :t])
            ids[:, t] = logits[:, -1].argmax(-1).to(device)
        if not dummy:
            out += _cut_at_eos(ids[:, width:].tolist(), eos_id)
    return out


@torch.no_grad()
def cached_greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                           pad_id: int, batch_size: int, num_batches: int | None = None,
                           device: torch.device | str = "cpu", synced: bool = False,
                           vocab_size: int | None = None) -> list[list[int]]:
    """``greedy_generate``'s contract (same batches, left padding, dummy batches, result cut before the
    first ``eos_id``), through ``model.generate`` with a KV cache: one prefill forward per batch, then
    one single-token forward per new token, and a batch stops once each of its rows has produced eos.

    ``model`` is a Hugging Face causal LM (under DeepSpeed: ``engine.module``, whose MoE blocks AutoEP
    replaced), in eval mode. ``vocab_size``: never generate an id at or past it (an embedding with
    more rows than the tokenizer has ids). The model's own ``generation_config`` (sampling,
    repetition penalty, ...) is ignored: plain greedy decoding.

    NOTE: ``synced=True`` (needs torch.distributed initialised; every rank of the world calls this
    with the same ``num_batches``) is transformers' ``synced_gpus``: each decoding step all-reduces
    a "this rank has finished" flag over the default group, and a finished rank keeps running
    forwards (results discarded) until every rank has finished, so every rank runs the same number
    of forwards per batch (its all-to-alls match) while still stopping at eos once all have.
    """
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class _BelowVocab(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(-1, torch.arange(vocab_size, scores.shape[-1], device=scores.device),
                                     float("-inf"))

    num_batches = _check_generate_args(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       num_batches=num_batches)
    if max_new_tokens == 0:
        return [[] for _ in prompts]  # no forwards, as the reference
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                              eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
                              return_dict_in_generate=False)
    processors = LogitsProcessorList([_BelowVocab()] if vocab_size is not None else [])
    out: list[list[int]] = []
    saved = model.generation_config
    model.generation_config = GenerationConfig()  # NOTE: generate fills unset fields from it: no model defaults
    try:
        for ids, mask, dummy in _left_padded_batches(prompts, batch_size=batch_size, num_batches=num_batches,
                                                     pad_id=pad_id, extra=0, device=device):
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=processors, synced_gpus=synced)[:, ids.shape[1]:]
            if not dummy:
                out += _cut_at_eos(new.tolist(), eos_id)
    finally:
        model.generation_config = saved
    return out
