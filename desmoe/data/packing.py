"""Packing: encoded examples framed (bos + ids + eos) and packed into fixed-length rows per domain.

Holds frame_example, pack_positions, pack_framed, pack_sequences, real_token_mask, fitting an example
to data.seq_len (fit_example, FittedExample), the held-out eval draw (choose_eval_examples), and
DomainData with what builds it: build_domain_data for the domains, build_holdout for data.holdout,
domain_metrics for a domain's task metrics.
"""

from __future__ import annotations

import dataclasses
import random
import typing
from typing import Iterable

import torch

from desmoe.constants import GENERATION_METRICS, IGNORE_INDEX
from desmoe.data.builtin import TASK_METRICS
from desmoe.data.sources import DataError, ScanReport, Segment, load_domain_examples
from desmoe.data.tokenizers import encode_example, eval_pair


LONG_EXAMPLES = ("split", "truncate")


def frame_example(ids: list[int], labels: list[int], *, bos_id: int | None, eos_id: int) -> tuple[list[int], list[int]]:
    """bos + ids + eos and their targets: bos is never one (it would be predicted from the previous
    example); eos is trained when the example's last token is."""
    tokens = ([bos_id] if bos_id is not None else []) + list(ids) + [eos_id]
    targets = ([IGNORE_INDEX] if bos_id is not None else []) + list(labels)
    targets.append(eos_id if (not labels or labels[-1] != IGNORE_INDEX) else IGNORE_INDEX)
    return tokens, targets


def pack_positions(lengths: list[int], *, seq_len: int, truncate: bool) -> tuple[list[int], int]:
    """(start offset of each example in the packed stream, total stream length incl. row padding).

    'split' (truncate False) concatenates: an example goes on in the next row. 'truncate' never lets
    an example cross a row boundary: one that does not fit in the room left starts a new row (the
    rest of the row is padding); lengths must then be <= seq_len.
    """
    starts = []
    offset = 0
    for n in lengths:
        if truncate:
            assert n <= seq_len, "truncate examples to seq_len before packing"
            if offset % seq_len and offset % seq_len + n > seq_len:
                offset += seq_len - offset % seq_len
        starts.append(offset)
        offset += n
    return starts, offset


def real_token_mask(input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """bool [B, S]: True for real tokens, False for the row padding ``pack_framed`` leaves at the end of a
    row (the trailing run of ``pad_id`` inputs with IGNORE_INDEX labels). Prompt tokens, also unlabelled,
    stay real: they are routed like any other."""
    pad = (input_ids == pad_id) & (labels == IGNORE_INDEX)
    trailing = torch.flip(torch.cumprod(torch.flip(pad, dims=[-1]).to(torch.int8), dim=-1), dims=[-1])
    return trailing == 0


def pack_framed(framed: list[tuple[list[int], list[int]]], *, seq_len: int, pad_id: int,
                truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Framed examples (tokens, targets) -> (input_ids, labels), int64 [N, seq_len]; padding is IGNORE_INDEX.

    With ``truncate`` an example longer than seq_len keeps its first seq_len tokens and no
    example crosses a row boundary; otherwise examples are concatenated and cut into rows.
    """
    if truncate:
        framed = [(t[:seq_len], g[:seq_len]) for t, g in framed]
    starts, total = pack_positions([len(t) for t, _ in framed], seq_len=seq_len, truncate=truncate)
    rows = -(-total // seq_len)
    flat_ids = [pad_id] * (rows * seq_len)
    flat_labels = [IGNORE_INDEX] * (rows * seq_len)
    for (tokens, targets), s in zip(framed, starts):
        flat_ids[s:s + len(tokens)] = tokens
        flat_labels[s:s + len(targets)] = targets
    return (torch.tensor(flat_ids, dtype=torch.long).view(rows, seq_len),
            torch.tensor(flat_labels, dtype=torch.long).view(rows, seq_len))


def pack_sequences(examples: Iterable, *, seq_len: int, bos_id: int | None, eos_id: int,
                   pad_id: int, long_examples: str = "split") -> tuple[torch.Tensor, torch.Tensor]:
    """Frame examples (bos + tokens + eos) and pack them into rows of ``seq_len``.

    ``examples`` yields token lists, or (ids, labels) pairs from encode_example. Returns
    (input_ids, labels), both int64 [N, seq_len]. Labels: a token's label is itself where it is
    trained, IGNORE_INDEX on prompts, on each example's bos (never predicted from the previous
    example) and on padding. ``long_examples``: 'split' keeps every token (examples are
    concatenated; a long one continues into the next row); 'truncate' cuts an example to its
    first seq_len tokens (a cut example has no eos) and starts an example that does not fit in
    the room left on a new row, so no example crosses rows.
    """
    if long_examples not in LONG_EXAMPLES:
        raise ValueError(f"long_examples must be one of {LONG_EXAMPLES}, got {long_examples!r}")
    framed = []
    for ex in examples:
        ids, labels = ex if isinstance(ex, tuple) else (ex, ex)
        framed.append(frame_example(ids, labels, bos_id=bos_id, eos_id=eos_id))
    return pack_framed(framed, seq_len=seq_len, pad_id=pad_id, truncate=long_examples == "truncate")


class FittedExample(typing.NamedTuple):
    """One example encoded and framed for packing, with what fitting it into seq_len did."""

    tokens: list[int]
    targets: list[int]
    example_tokens: int
    """Tokens of the example itself (no bos/eos), before any truncation."""
    long: bool
    """Framed, it was longer than seq_len (split across rows, or truncated)."""
    dropped_tokens: int
    """Tokens of the example cut off by truncation."""
    trained_tokens: int
    """Tokens of the example (no bos/eos) that are trained on and packed."""


def fit_example(ids: list[int], labels: list[int], *, seq_len: int, bos_id: int | None, eos_id: int,
                long_examples: str) -> FittedExample:
    """Frame one encoded example; with 'truncate', cut it to ``seq_len`` tokens (tokens empty when no
    trained token is left: the example is dropped whole rather than packed as an all-masked row)."""
    tokens, targets = frame_example(ids, labels, bos_id=bos_id, eos_id=eos_id)
    long = len(tokens) > seq_len
    if long and long_examples == "truncate":
        kept = seq_len - (1 if bos_id is not None else 0)
        trained = sum(1 for t in labels[:kept] if t != IGNORE_INDEX)
        if trained == 0:
            return FittedExample([], [], len(ids), True, len(ids), 0)
        return FittedExample(tokens[:seq_len], targets[:seq_len], len(ids), True, len(ids) - kept, trained)
    return FittedExample(tokens, targets, len(ids), long, 0, sum(1 for t in labels if t != IGNORE_INDEX))


def choose_eval_examples(lengths: list[int], *, rows: int, seq_len: int, truncate: bool, seed: str) -> list[int]:
    """Indices of the examples held out for evaluation, in the order they are packed.

    Examples are drawn in a fixed order (a shuffle seeded by ``seed``, not by the run's seed, so
    runs with different seeds evaluate the same examples) until they fill ``rows`` packed rows;
    at least one example is always left for training.
    """
    order = list(range(len(lengths)))
    random.Random(f"desmoe-eval:{seed}").shuffle(order)
    starts, _ = pack_positions([lengths[i] for i in order], seq_len=seq_len, truncate=truncate)
    k = sum(1 for s in starts if s < rows * seq_len)
    return order[:min(k, len(lengths) - 1)]


@dataclasses.dataclass
class DomainData:
    """One domain's packed rows: ``train_*`` for training, ``eval_*`` held out (never trained on).

    Eval rows are made of whole examples that no training row contains: drawn from the domain's
    data (choose_eval_examples), or from ``data.domains.<name>.eval`` when set. ``eval_examples``
    keeps them as segments and ``eval_pairs`` as (prompt, reference) texts for generation metrics.
    """

    name: str
    weight: float
    examples: int
    tokens: int
    train_ids: torch.Tensor
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor
    trained_tokens: int = 0
    """Tokens with a loss in the training rows (the examples' own tokens: bos/eos not counted)."""
    truncated: int = 0
    """Examples longer than data.seq_len cut to it (data.long_examples: truncate)."""
    split: int = 0
    """Examples longer than data.seq_len continued over several rows (data.long_examples: split)."""
    dropped_tokens: int = 0
    """Tokens cut off by truncation (a truncated example left with no trained token is dropped whole)."""
    eval_examples: list = dataclasses.field(default_factory=list)
    """The evaluation examples (segments), none of them in a training row."""
    eval_pairs: list = dataclasses.field(default_factory=list)
    """(prompt, reference) texts of the evaluation examples that have a reference answer (eval_pair)."""
    metrics: tuple = ("token_accuracy",)
    """Task metrics (desmoe.constants.METRICS), headline first."""

    @property
    def metric(self) -> str:
        """The headline task metric."""
        return self.metrics[0]


def domain_metrics(dom) -> tuple[str, ...]:
    """A domain's task metrics: ``metric`` if set; a built-in corpus's own (builtin.TASK_METRICS);
    exact_match for prompt_response files; next-token accuracy for text and chat."""
    if dom.metric is not None:
        return (dom.metric,)
    if dom.builtin is not None:
        return TASK_METRICS[dom.builtin]
    return ("exact_match",) if dom.format == "prompt_response" else ("token_accuracy",)


def _fit_all(examples: list[list[Segment]], data_cfg, tokenizer, on_bad=None) -> list[FittedExample | None]:
    """Encode and fit every example; with ``on_bad`` an example the tokenizer cannot render (a chat
    template error) is passed to it as DataError and left as None."""
    out = []
    for ex in examples:
        try:
            ids, labels = encode_example(ex, tokenizer, chat_template=data_cfg.chat_template)
        except DataError as e:
            if on_bad is None:
                raise
            on_bad(e)
            out.append(None)
            continue
        out.append(fit_example(ids, labels, seq_len=data_cfg.seq_len, bos_id=tokenizer.bos_id,
                               eos_id=tokenizer.eos_id, long_examples=data_cfg.long_examples))
    return out


def _pack_fitted(fitted: list[FittedExample], data_cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_framed([(f.tokens, f.targets) for f in fitted], seq_len=data_cfg.seq_len, pad_id=tokenizer.pad_id,
                       truncate=data_cfg.long_examples == "truncate")


def _rows(fitted: list[FittedExample], data_cfg) -> int:
    _, total = pack_positions([len(f.tokens) for f in fitted], seq_len=data_cfg.seq_len,
                              truncate=data_cfg.long_examples == "truncate")
    return -(-total // data_cfg.seq_len)


def build_domain_data(data_cfg, tokenizer, loaded=None) -> tuple[dict[str, DomainData], dict[str, ScanReport]]:
    """Tokenise and pack every domain, train and eval apart: no example is in both.

    Eval rows (``data.eval_sequences`` of them) come from ``data.domains.<name>.eval`` when set,
    its examples in file order; otherwise whole examples are held out of the domain's data
    (choose_eval_examples; at most a fifth of the domain's rows). ``loaded`` is
    load_domain_examples' result when the caller already read the data. Returns the domains and
    the scan report (per domain, plus "data.train" for the mixed file).
    """
    examples, report = loaded if loaded is not None else load_domain_examples(data_cfg)
    seq_len = data_cfg.seq_len
    truncate = data_cfg.long_examples == "truncate"
    out = {}
    for name, exs in examples.items():
        dom = data_cfg.domains[name]

        def note_skip(err: DataError, r=report[name]) -> None:
            r.skipped += 1
            r.first_skip = r.first_skip or str(err)

        on_bad = note_skip if data_cfg.on_bad_record == "skip" else None
        fitted = _fit_all(exs, data_cfg, tokenizer, on_bad)
        read = [f for f in fitted if f is not None]
        kept = [i for i, f in enumerate(fitted) if f is not None and f.tokens]
        eval_file = report[name].eval_examples
        if eval_file is not None:
            eval_source, eval_fitted = eval_file, _fit_all(eval_file, data_cfg, tokenizer, on_bad)
            usable = [i for i, f in enumerate(eval_fitted) if f is not None and f.tokens]
            if not kept or not usable:
                which = f"data.domains.{name}.eval" if kept else f"domain {name!r}"
                raise DataError(f"{which}: no example left to pack (every one was skipped or lost all its "
                                f"trained tokens to truncation at data.seq_len={seq_len}). Raise data.seq_len, "
                                "use data.long_examples: split, or fix the data.")
            n_eval = data_cfg.eval_sequences
            starts, _ = pack_positions([len(eval_fitted[i].tokens) for i in usable], seq_len=seq_len,
                                       truncate=truncate)
            eval_idx = usable[:sum(1 for s in starts if s < n_eval * seq_len)]
            train_idx = kept
            read += [eval_fitted[i] for i in eval_idx]
        else:
            n_rows = _rows([fitted[i] for i in kept], data_cfg)
            if n_rows < 2:
                raise DataError(f"domain {name!r} has {sum(f.example_tokens for f in read)} tokens, less than two "
                                f"sequences of data.seq_len={seq_len}. Add data or lower data.seq_len.")
            if len(kept) < 2:
                raise DataError(f"domain {name!r} has only one example, which cannot be both trained on and held "
                                f"out for evaluation. Add examples, or set data.domains.{name}.eval to an eval file.")
            eval_source, eval_fitted = exs, fitted
            n_eval = min(data_cfg.eval_sequences, max(1, n_rows // 5))
            chosen = choose_eval_examples([len(fitted[i].tokens) for i in kept], rows=n_eval, seq_len=seq_len,
                                          truncate=truncate, seed=name)
            eval_idx = [kept[j] for j in chosen]
            held = set(eval_idx)
            train_idx = [i for i in kept if i not in held]
        train_ids, train_labels = _pack_fitted([fitted[i] for i in train_idx], data_cfg, tokenizer)
        eval_ids, eval_labels = _pack_fitted([eval_fitted[i] for i in eval_idx], data_cfg, tokenizer)
        eval_examples = [eval_source[i] for i in eval_idx]
        pairs = [p for p in (eval_pair(ex, tokenizer, chat_template=data_cfg.chat_template) for ex in eval_examples)
                 if p is not None]
        metrics = domain_metrics(dom)
        _check_metrics(name, metrics, pairs)
        # counts cover every example read for the domain (those truncation dropped too) and the eval file's used
        n_long = sum(f.long for f in read)
        out[name] = DomainData(
            name=name, weight=dom.weight, examples=len(read), tokens=sum(f.example_tokens for f in read),
            train_ids=train_ids, train_labels=train_labels, eval_ids=eval_ids[:n_eval],
            eval_labels=eval_labels[:n_eval], trained_tokens=sum(fitted[i].trained_tokens for i in train_idx),
            truncated=n_long if truncate else 0, split=0 if truncate else n_long,
            dropped_tokens=sum(f.dropped_tokens for f in read), eval_examples=eval_examples, eval_pairs=pairs,
            metrics=metrics)
    return out, report


def _check_metrics(name: str, metrics: tuple[str, ...], pairs: list) -> None:
    needs_pairs = [m for m in metrics if m in GENERATION_METRICS]
    if needs_pairs and not pairs:
        raise DataError(f"data.domains.{name}.metric: {needs_pairs[0]} compares generated answers with reference "
                        f"answers, but domain {name!r} has no eval example with one (plain text). Use metric "
                        "token_accuracy, or prompt_response / chat records.")


def build_holdout(data_cfg, tokenizer) -> DomainData | None:
    """``data.holdout`` packed for evaluation only (never sampled for training); None when unset."""
    if data_cfg.holdout is None:
        return None
    # the holdout as the one domain of a copy of data_cfg (its on_bad_record and max_record_bytes), no mixed file
    one = dataclasses.replace(data_cfg, domains={"holdout": data_cfg.holdout}, train=None)
    examples, _ = load_domain_examples(one)
    skip = (lambda e: None) if data_cfg.on_bad_record == "skip" else None
    fitted = [f for f in _fit_all(examples["holdout"], data_cfg, tokenizer, skip) if f is not None and f.tokens]
    ids, labels = _pack_fitted(fitted, data_cfg, tokenizer)
    n = min(ids.shape[0], data_cfg.holdout_sequences)
    return DomainData(name="holdout", weight=0.0, examples=len(fitted), tokens=sum(f.example_tokens for f in fitted),
                      train_ids=ids[:0], train_labels=labels[:0], eval_ids=ids[:n], eval_labels=labels[:n],
                      trained_tokens=0, metrics=("token_accuracy",))
