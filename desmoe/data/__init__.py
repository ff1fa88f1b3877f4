"""Domain-labelled text: reading, tokenising, packing, and a domain-synchronised sampler.

Pure of ranks and files beyond reading its inputs: the sampler is told its rank and world
size, it does not ask torch.distributed.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import random
from typing import Iterable

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A user-facing problem with the training data."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def expand_paths(pattern: str, *, key: str) -> list[str]:
    """A file path or glob -> sorted list of files; DataError when nothing matches."""
    if any(ch in pattern for ch in "*?["):
        files = sorted(p for p in _glob.glob(pattern) if os.path.isfile(p))
        if not files:
            raise DataError(f"{key}: the glob {pattern!r} matches no files. Check the path and pattern.")
        return files
    if not os.path.exists(pattern):
        raise DataError(f"{key}: data file {pattern!r} does not exist. Fix the path (relative paths in a YAML "
                        "are resolved against the YAML file's folder).")
    if not os.path.isfile(pattern):
        raise DataError(f"{key}: {pattern!r} is not a file. Point it at a .jsonl file or a glob such as "
                        "data/*.jsonl.")
    return [pattern]


def read_jsonl(path: str, *, key: str) -> Iterable[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; DataError names file:line on bad input."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{key}: cannot open {path!r}: {e.strerror}. Check that the file is readable.") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}). "
                                "Re-encode the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line must "
                                "be one JSON object such as {\"domain\": \"math\", \"text\": \"...\"}.") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
            yield lineno, record


def _text_of(record: dict, path: str, lineno: int) -> str:
    text = record.get("text")
    if not isinstance(text, str):
        what = "missing" if "text" not in record else f"a {type(text).__name__}, not a string"
        raise DataError(f"{path}:{lineno}: the \"text\" field is {what}. Each record needs "
                        "{\"text\": \"...\"} (and \"domain\" in a mixed file).")
    return text


def load_domain_texts(data_cfg) -> dict[str, list[str]]:
    """Read every configured domain's examples, in config order; DataError on any problem.

    ``data_cfg`` is the ``data`` section of the run config.
    """
    from desmoe.data.builtin import builtin_examples

    names = list(data_cfg.domains)
    texts: dict[str, list[str]] = {n: [] for n in names}
    for name, dom in data_cfg.domains.items():
        key = f"data.domains.{name}"
        if dom.builtin is not None:
            texts[name].extend(builtin_examples(dom.builtin))
        elif dom.train is not None:
            for path in expand_paths(dom.train, key=f"{key}.train"):
                for lineno, record in read_jsonl(path, key=f"{key}.train"):
                    label = record.get("domain", name)
                    if label != name:
                        raise DataError(f"{path}:{lineno}: record labelled domain {label!r} in the file of domain "
                                        f"{name!r}. Move it to its own domain's file or fix the label.")
                    texts[name].append(_text_of(record, path, lineno))
    if data_cfg.train is not None:
        unknown: dict[str, str] = {}
        for path in expand_paths(data_cfg.train, key="data.train"):
            for lineno, record in read_jsonl(path, key="data.train"):
                label = record.get("domain")
                if not isinstance(label, str) or not label:
                    raise DataError(f"{path}:{lineno}: missing \"domain\" label. Every record of the mixed file "
                                    "data.train needs {\"domain\": NAME, \"text\": ...}.")
                if label not in texts:
                    unknown.setdefault(label, f"{path}:{lineno}")
                    continue
                texts[label].append(_text_of(record, path, lineno))
        if unknown:
            listed = ", ".join(f"{d!r} (first at {w})" for d, w in sorted(unknown.items()))
            raise DataError(f"data.train has domains that data.domains does not list: {listed}. Add them to "
                            f"data.domains (e.g. data.domains.{sorted(unknown)[0]}: {{}}) or remove those records.")
    for name, dom in data_cfg.domains.items():
        if dom.max_examples is not None:
            texts[name] = texts[name][:dom.max_examples]
    empty = [n for n in names if not any(t.strip() for t in texts[n])]
    if empty:
        raise DataError(f"domain(s) {', '.join(empty)} have no examples (no non-empty \"text\"). Add data for "
                        "them or remove them from data.domains.")
    return texts


# ---------------------------------------------------------------------------------------------
# Tokenisers
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0 pad, 1 bos, 2 eos, byte b -> b + 3 (vocab 259). Needs no files."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local transformers tokenizer with the same small interface as ByteTokenizer."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: cannot load a tokenizer from {path!r}: {e}. Point data.tokenizer at "
                            "a folder written by tokenizer.save_pretrained(), or set data.tokenizer: byte.") from e
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.bos_id = self.tok.bos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


def build_tokenizer(data_cfg, model_cfg):
    """``data.tokenizer`` -> tokenizer; default: the model directory's tokenizer if it has one, else bytes."""
    choice = data_cfg.tokenizer
    if choice == "byte":
        return ByteTokenizer()
    if choice is not None:
        return HFTokenizer(choice)
    if model_cfg.path is not None and any(
            os.path.isfile(os.path.join(model_cfg.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(model_cfg.path)
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def pack_sequences(token_lists: Iterable[list[int]], *, seq_len: int, bos_id: int | None, eos_id: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples (bos + tokens + eos) and cut them into rows of ``seq_len``.

    Returns (input_ids, labels), both int64 [N, seq_len]. The last partial row is padded
    with ``pad_id`` and its padding labelled IGNORE_INDEX, so no token is lost.
    """
    stream: list[int] = []
    for ids in token_lists:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(ids)
        stream.append(eos_id)
    n_full, rest = divmod(len(stream), seq_len)
    rows = n_full + (1 if rest else 0)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    if stream:
        flat = torch.tensor(stream, dtype=torch.long)
        input_ids.view(-1)[:len(stream)] = flat
        labels.view(-1)[:len(stream)] = flat
    return input_ids, labels


@dataclasses.dataclass
class DomainData:
    """One domain's packed rows: ``train_*`` for training, ``eval_*`` held out (never trained on)."""

    name: str
    weight: float
    examples: int
    tokens: int
    train_ids: torch.Tensor
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor


def build_domain_data(data_cfg, tokenizer) -> dict[str, DomainData]:
    """Read, tokenise and pack every domain; the last ``data.eval_sequences`` rows are held out."""
    texts = load_domain_texts(data_cfg)
    out = {}
    for name, examples in texts.items():
        token_lists = [tokenizer.encode(t) for t in examples if t.strip()]
        ids, labels = pack_sequences(token_lists, seq_len=data_cfg.seq_len, bos_id=tokenizer.bos_id,
                                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        n = ids.shape[0]
        if n < 2:
            raise DataError(f"domain {name!r} has {sum(len(t) for t in token_lists)} tokens, less than two "
                            f"sequences of data.seq_len={data_cfg.seq_len}. Add data or lower data.seq_len.")
        n_eval = min(data_cfg.eval_sequences, max(1, n // 5))
        out[name] = DomainData(name=name, weight=data_cfg.domains[name].weight, examples=len(token_lists),
                               tokens=sum(len(t) for t in token_lists), train_ids=ids[:n - n_eval],
                               train_labels=labels[:n - n_eval], eval_ids=ids[n - n_eval:],
                               eval_labels=labels[n - n_eval:])
    return out


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class DomainSampler:
    """Domain-homogeneous micro-batches, the same domain on every rank at each micro-step.

    At micro-step k every rank draws the domain from ``Random((seed, k))`` with the
    configured weights, so all ranks (and so every expert-parallel group) agree without
    communicating; with ``sync_domains=False`` each rank draws its own (``Random((seed, k, rank))``). Within a domain, rows follow a seeded permutation per epoch, shared by
    all ranks; rank r takes the r-th slice of each global batch, so ranks see different
    rows. Deterministic given (seed, rank, world size); ``state_dict`` resumes it.
    """

    def __init__(self, domains: dict[str, DomainData], *, micro_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, sync_domains: bool = True):
        if not domains:
            raise ValueError("DomainSampler needs at least one domain")
        self.domains = domains
        self.names = list(domains)
        self.weights = [domains[n].weight for n in self.names]
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sync_domains = sync_domains
        self.micro_step = 0
        self.cursor = {n: 0 for n in self.names}  # global row position, across epochs
        self._orders: dict[tuple[str, int], list[int]] = {}

    def _order(self, name: str, epoch: int) -> list[int]:
        key = (name, epoch)
        if key not in self._orders:
            order = list(range(self.domains[name].train_ids.shape[0]))
            random.Random(f"{self.seed}:{name}:{epoch}").shuffle(order)
            if len(self._orders) > 4 * len(self.names):
                self._orders.clear()
            self._orders[key] = order
        return self._orders[key]

    def domain_of(self, rank: int, micro_step: int) -> str:
        """The domain rank ``rank`` trains on at ``micro_step`` (any rank can compute any rank's)."""
        key = f"{self.seed}:domain:{micro_step}" + ("" if self.sync_domains else f":rank{rank}")
        return random.Random(key).choices(self.names, self.weights)[0]

    def next_domain(self) -> str:
        return self.domain_of(self.rank, self.micro_step)

    def next_batch(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(domain, input_ids [B, L], labels [B, L]) for this rank's next micro-step."""
        name = self.next_domain()
        data = self.domains[name]
        n = data.train_ids.shape[0]
        start = self.cursor[name] + self.rank * self.micro_batch_size
        rows = []
        for pos in range(start, start + self.micro_batch_size):
            epoch, i = divmod(pos, n)
            rows.append(self._order(name, epoch)[i])
        self.cursor[name] += self.micro_batch_size * self.world_size
        self.micro_step += 1
        idx = torch.tensor(rows, dtype=torch.long)
        return name, data.train_ids[idx], data.train_labels[idx]

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "cursor": dict(self.cursor), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
        self.cursor = {n: int(state["cursor"].get(n, 0)) for n in self.names}
