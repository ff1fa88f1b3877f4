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


def read_jsonl(path: str, *, key: str, on_bad_line=None) -> Iterable[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line, streaming (memory bounded by one line).

    A line that is not UTF-8 or not a JSON object raises DataError naming file:line, or, when
    ``on_bad_line`` is given, is passed to it as that DataError and skipped.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{key}: cannot open {path!r}: {e.strerror}. Check that the file is readable.") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
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
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line "
                                    "must be one JSON object such as {\"domain\": \"math\", \"text\": \"...\"}."
                                    ) from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
            except DataError as e:
                if on_bad_line is None:
                    raise
                on_bad_line(e)
                continue
            yield lineno, record


Segment = tuple[str, bool]
"""A piece of an example's text and whether the model is trained to predict it."""

FORMATS = ("text", "prompt_response", "chat")


def _field(record: dict, key: str, where: str, fmt: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        what = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        shape = {"text": '{"text": "..."}', "prompt_response": '{"prompt": "...", "response": "..."}',
                 "chat": '{"messages": [{"role": "user", "content": "..."}, ...]}'}[fmt]
        raise DataError(f"{where}: the \"{key}\" field is {what}. Records of format {fmt!r} look like {shape}.")
    return value


def record_segments(record: dict, fmt: str, where: str) -> list[Segment]:
    """One record -> its segments. Loss on: all of ``text``; the response of ``prompt_response``;
    the assistant turns of ``chat`` (rendered as "<|role|>\n" headers, not trained, then the content)."""
    if fmt == "text":
        return [(_field(record, "text", where, fmt), True)]
    if fmt == "prompt_response":
        return [(_field(record, "prompt", where, fmt), False), (_field(record, "response", where, fmt), True)]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
    out: list[Segment] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}.")
        out.append((f"<|{m['role']}|>\n", False))
        out.append((m["content"] + "\n", m["role"] == "assistant"))
    if not any(trained for _, trained in out):
        raise DataError(f"{where}: no assistant message, so nothing to train on. Add an assistant turn.")
    return out


def example_text(segments: list[Segment]) -> str:
    return "".join(t for t, _ in segments)


def _records(path: str, key: str, on_bad_line=None):
    """(location, record) from a jsonl file (streamed), a parquet file or a save_to_disk folder (datasets)."""
    if os.path.isdir(path) or path.endswith(".parquet"):
        try:
            import datasets

            if os.path.isdir(path):
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    if "train" not in ds:
                        raise DataError(f"{key}: {path} holds splits {list(ds)} but no 'train' split.")
                    ds = ds["train"]
            else:
                ds = datasets.Dataset.from_parquet(path)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types for unreadable input
            raise DataError(f"{key}: cannot read {path} with the datasets library ({type(e).__name__}: {e}). "
                            "Point it at a .parquet file or a folder written by Dataset.save_to_disk().") from e
        for i, record in enumerate(ds):
            yield f"{path}[row {i}]", record
        return
    for lineno, record in read_jsonl(path, key=key, on_bad_line=on_bad_line):
        yield f"{path}:{lineno}", record


def expand_sources(pattern: str, *, key: str) -> list[str]:
    """Like expand_paths, but a folder (a save_to_disk dataset) is a source too."""
    if os.path.isdir(pattern):
        return [pattern]
    return expand_paths(pattern, key=key)


@dataclasses.dataclass
class ScanReport:
    """What reading one domain found (printed before training and saved as data_summary.json)."""

    skipped: int = 0
    first_skip: str | None = None


def load_domain_examples(data_cfg) -> tuple[dict[str, list[list[Segment]]], dict[str, ScanReport]]:
    """Read every configured domain's examples (as segments), in config order.

    With ``data.on_bad_record: skip`` a malformed record is counted and skipped instead of
    stopping the run; unreadable files, unknown domains and empty domains are always errors.
    """
    from desmoe.data.builtin import builtin_examples

    names = list(data_cfg.domains)
    examples: dict[str, list[list[Segment]]] = {n: [] for n in names}
    report = {n: ScanReport() for n in names}
    if data_cfg.train is not None:
        report["data.train"] = ScanReport()  # unreadable lines of the mixed file belong to no domain
    skip = data_cfg.on_bad_record == "skip"

    def note_skip(domain: str, err: DataError) -> None:
        report[domain].skipped += 1
        report[domain].first_skip = report[domain].first_skip or str(err)

    def take(domain: str, record_fn) -> None:
        try:
            examples[domain].append(record_fn())
        except DataError as e:
            if not skip:
                raise
            note_skip(domain, e)

    def own_record(record: dict, where: str, name: str, fmt: str) -> list[Segment]:
        label = record.get("domain", name)
        if label != name:
            raise DataError(f"{where}: record labelled domain {label!r} in the file of domain {name!r}. Move it "
                            "to its own domain's file or fix the label.")
        return record_segments(record, fmt, where)

    for name, dom in data_cfg.domains.items():
        key = f"data.domains.{name}"
        if dom.builtin is not None:
            examples[name].extend([(ex[0], False), (ex[1], True)] if isinstance(ex, tuple) else [(ex, True)]
                                  for ex in builtin_examples(dom.builtin))
        elif dom.train is not None:
            on_bad = (lambda e, n=name: note_skip(n, e)) if skip else None
            for path in expand_sources(dom.train, key=f"{key}.train"):
                for where, record in _records(path, f"{key}.train", on_bad):
                    take(name, lambda r=record, w=where: own_record(r, w, name, dom.format))
    if data_cfg.train is not None:
        unknown: dict[str, str] = {}
        for path in expand_sources(data_cfg.train, key="data.train"):
            on_bad = (lambda e: note_skip("data.train", e)) if skip else None
            for where, record in _records(path, "data.train", on_bad):
                label = record.get("domain")
                if not isinstance(label, str) or not label:
                    raise DataError(f"{where}: missing \"domain\" label. Every record of the mixed file "
                                    "data.train needs {\"domain\": NAME, \"text\": ...}.")
                if label not in examples:
                    unknown.setdefault(label, where)
                    continue
                fmt = data_cfg.domains[label].format
                take(label, lambda r=record, w=where, f=fmt: record_segments(r, f, w))
        if unknown:
            listed = ", ".join(f"{d!r} (first at {w})" for d, w in sorted(unknown.items()))
            raise DataError(f"data.train has domains that data.domains does not list: {listed}. Add them to "
                            f"data.domains (e.g. data.domains.{sorted(unknown)[0]}: {{}}) or remove those records.")
    for name, dom in data_cfg.domains.items():
        if dom.max_examples is not None:
            examples[name] = examples[name][:dom.max_examples]
        examples[name] = [ex for ex in examples[name] if example_text(ex).strip()]
    empty = [n for n in names if not examples[n]]
    if empty:
        raise DataError(f"domain(s) {', '.join(empty)} have no examples (no record with non-empty text). Add "
                        "data for them or remove them from data.domains.")
    return examples, report


def load_domain_texts(data_cfg, examples: dict[str, list[list[Segment]]] | None = None) -> dict[str, list[str]]:
    """Every domain's examples as plain text (segments joined); reads the data unless given ``examples``."""
    if examples is None:
        examples, _ = load_domain_examples(data_cfg)
    return {n: [example_text(ex) for ex in exs] for n, exs in examples.items()}


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


class SentencePieceTokenizer:
    """A sentencepiece model file (ids: 0 pad, 1 bos, 2 eos, 3 unk when desmoe trained it)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer: cannot load the sentencepiece model {path!r}: {e}. Point it at a "
                            ".model file written by sentencepiece, or set data.tokenizer: sentencepiece to train "
                            "one on the configured domains.") from e
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = max(self.sp.pad_id(), 0)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.pad_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))


def spm_cache_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get("DESMOE_CACHE", os.path.join(root, ".cache", "desmoe"))


def train_sentencepiece(data_cfg, examples: dict[str, list[list[Segment]]] | None = None) -> str:
    """Train (once) a sentencepiece model on every configured domain's text and cache it.

    The cache key is the corpus and the vocabulary size, so the same data reuses the same
    file; the model is written to a temporary name and renamed, so a reader never sees half
    a file. ``examples`` (from load_domain_examples) avoids reading the data again. Returns the
    model path.
    """
    import hashlib
    import tempfile

    import sentencepiece as spm

    texts = [t for exs in load_domain_texts(data_cfg, examples).values() for t in exs]
    digest = hashlib.sha256(f"{data_cfg.spm_vocab_size}\0".encode())
    for t in texts:
        digest.update(t.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    path = os.path.join(spm_cache_dir(), f"spm-{data_cfg.spm_vocab_size}-{digest.hexdigest()[:16]}.model")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(" ".join(t.split("\n")) + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=data_cfg.spm_vocab_size,
                                       model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2,
                                       unk_id=3, byte_fallback=True, input_sentence_size=200000,
                                       shuffle_input_sentence=True, num_threads=1, minloglevel=2)
        os.replace(prefix + ".model", path)
    return path


def build_tokenizer(data_cfg, model_cfg, examples: dict[str, list[list[Segment]]] | None = None):
    """``data.tokenizer`` -> tokenizer; default: the model directory's tokenizer if it has one, else bytes.

    ``sentencepiece`` trains (or reuses from the cache) a model on the configured domains; a path
    ending in ``.model`` loads a sentencepiece file; any other path, a transformers tokenizer folder.
    """
    choice = data_cfg.tokenizer
    if choice == "byte":
        return ByteTokenizer()
    if choice == "sentencepiece":
        return SentencePieceTokenizer(train_sentencepiece(data_cfg, examples))
    if choice is not None and choice.endswith(".model"):
        return SentencePieceTokenizer(choice)
    if choice is not None:
        return HFTokenizer(choice)
    if model_cfg.path is not None and any(
            os.path.isfile(os.path.join(model_cfg.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(model_cfg.path)
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def encode_example(segments: list[Segment], tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: labels are the ids on trained segments, IGNORE_INDEX elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def pack_sequences(examples: Iterable, *, seq_len: int, bos_id: int | None, eos_id: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples (bos + tokens + eos) and cut them into rows of ``seq_len``.

    ``examples`` yields token lists, or (ids, labels) pairs from encode_example. Returns
    (input_ids, labels), both int64 [N, seq_len]. Labels: a token's label is itself where it is
    trained, IGNORE_INDEX on prompts, on each example's bos (never predicted from the previous
    example) and on the padding of the last row. Every token is kept: long examples continue
    into the next row.
    """
    stream: list[int] = []
    targets: list[int] = []
    for ex in examples:
        ids, labels = ex if isinstance(ex, tuple) else (ex, ex)
        if bos_id is not None:
            stream.append(bos_id)
            targets.append(IGNORE_INDEX)
        stream.extend(ids)
        targets.extend(labels)
        stream.append(eos_id)
        targets.append(eos_id if (not labels or labels[-1] != IGNORE_INDEX) else IGNORE_INDEX)
    n_full, rest = divmod(len(stream), seq_len)
    rows = n_full + (1 if rest else 0)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    out_labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    if stream:
        input_ids.view(-1)[:len(stream)] = torch.tensor(stream, dtype=torch.long)
        out_labels.view(-1)[:len(targets)] = torch.tensor(targets, dtype=torch.long)
    return input_ids, out_labels


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
    trained_tokens: int = 0


def _pack(examples: list[list[Segment]], data_cfg, tokenizer):
    """Encode and pack one corpus: (ids, labels, example count, tokens, trained tokens)."""
    encoded = [encode_example(ex, tokenizer) for ex in examples]
    ids, labels = pack_sequences(encoded, seq_len=data_cfg.seq_len, bos_id=tokenizer.bos_id,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tokens = sum(len(e[0]) for e in encoded)
    trained = sum(sum(1 for t in e[1] if t != IGNORE_INDEX) for e in encoded)
    return ids, labels, len(encoded), tokens, trained


def build_domain_data(data_cfg, tokenizer, loaded=None) -> tuple[dict[str, DomainData], dict[str, ScanReport]]:
    """Tokenise and pack every domain; the last ``data.eval_sequences`` rows are held out.

    ``loaded`` is load_domain_examples' result when the caller already read the data. Returns
    the domains and the scan report (per domain, plus "data.train" for the mixed file).
    """
    examples, report = loaded if loaded is not None else load_domain_examples(data_cfg)
    out = {}
    for name, exs in examples.items():
        ids, labels, n_examples, tokens, trained = _pack(exs, data_cfg, tokenizer)
        n = ids.shape[0]
        if n < 2:
            raise DataError(f"domain {name!r} has {tokens} tokens, less than two "
                            f"sequences of data.seq_len={data_cfg.seq_len}. Add data or lower data.seq_len.")
        n_eval = min(data_cfg.eval_sequences, max(1, n // 5))
        out[name] = DomainData(name=name, weight=data_cfg.domains[name].weight, examples=n_examples,
                               tokens=tokens, train_ids=ids[:n - n_eval], train_labels=labels[:n - n_eval],
                               eval_ids=ids[n - n_eval:], eval_labels=labels[n - n_eval:], trained_tokens=trained)
    return out, report


def build_holdout(data_cfg, tokenizer) -> DomainData | None:
    """``data.holdout`` packed for evaluation only (never sampled for training); None when unset."""
    if data_cfg.holdout is None:
        return None
    from desmoe.config import DataSection

    one = DataSection(domains={"holdout": data_cfg.holdout}, on_bad_record=data_cfg.on_bad_record)
    examples, _ = load_domain_examples(one)
    ids, labels, n_examples, tokens, trained = _pack(examples["holdout"], data_cfg, tokenizer)
    n = min(ids.shape[0], data_cfg.holdout_sequences)
    return DomainData(name="holdout", weight=0.0, examples=n_examples, tokens=tokens, train_ids=ids[:0],
                      train_labels=labels[:0], eval_ids=ids[:n], eval_labels=labels[:n], trained_tokens=trained)


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
