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
import typing
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


DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 1 << 20


def read_lines(f, *, max_bytes: int, chunk_size: int = _READ_CHUNK) -> Iterable[tuple[int, bytes | None]]:
    """Yield (line number, line bytes without the newline) from a binary file, in bounded memory.

    The file is read in chunks of ``chunk_size``; a line longer than ``max_bytes`` is yielded as
    None and its bytes are dropped as they are read, so it is never held whole.
    """
    lineno = 0
    pieces: list[bytes] = []  # the current line, so far
    size = 0
    too_long = False
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            if not too_long:
                size += len(part)
                if size > max_bytes:
                    too_long, pieces = True, []
                else:
                    pieces.append(part)
            if i == len(parts) - 1:
                break  # no newline after it: the line goes on in the next chunk
            lineno += 1
            yield lineno, None if too_long else b"".join(pieces)
            pieces, size, too_long = [], 0, False
    if size or too_long:
        yield lineno + 1, None if too_long else b"".join(pieces)


def read_jsonl(path: str, *, key: str, on_bad_line=None,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterable[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line, streaming (memory bounded by one record).

    A line longer than ``max_record_bytes``, not UTF-8 or not a JSON object raises DataError
    naming file:line, or, when ``on_bad_line`` is given, is passed to it as that DataError and
    skipped.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{key}: cannot open {path!r}: {e.strerror}. Check that the file is readable.") from e
    with f:
        for lineno, raw in read_lines(f, max_bytes=max_record_bytes):
            try:
                if raw is None:
                    raise DataError(f"{path}:{lineno}: record longer than data.max_record_bytes "
                                    f"({max_record_bytes} bytes). Raise the limit (e.g. data.max_record_bytes="
                                    f"{4 * max_record_bytes}) if the record is meant to be this long, or fix the "
                                    "file (a missing newline joins records).")
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
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines", ".json")
"""File endings read as JSON lines (one record per line); .parquet files and folders go through datasets."""


class ChatExample(list):
    """The segments of one chat record, rendered with desmoe's "<|role|>" headers.

    A list of segments like any other example; it also keeps the record's ``messages`` (and
    where it came from), so that a tokenizer's own chat template can render them instead
    (render_segments).
    """

    def __init__(self, segments: list[Segment], messages: list[dict], where: str):
        super().__init__(segments)
        self.messages = messages
        self.where = where


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
    the assistant turns of ``chat`` (rendered as "<|role|>\n" headers, not trained, then the content;
    a ChatExample, which a tokenizer with a chat template renders its own way)."""
    if fmt == "text":
        return [(_field(record, "text", where, fmt), True)]
    if fmt == "prompt_response":
        return [(_field(record, "prompt", where, fmt), False), (_field(record, "response", where, fmt), True)]
    if fmt != "chat":
        raise DataError(f"{where}: unknown record format {fmt!r}. Use one of {', '.join(FORMATS)}.")
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
    return ChatExample(out, [{"role": m["role"], "content": m["content"]} for m in messages], where)


def example_text(segments: list[Segment]) -> str:
    return "".join(t for t, _ in segments)


def _records(path: str, key: str, on_bad_line=None, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
             splits: tuple[str, ...] = ("train",)):
    """(location, record) from a jsonl file (streamed), a parquet file or a save_to_disk folder (datasets).

    A save_to_disk DatasetDict gives its first split named in ``splits``.
    """
    if os.path.isdir(path) or path.endswith(".parquet"):
        try:
            import datasets

            if os.path.isdir(path):
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    split = next((s for s in splits if s in ds), None)
                    if split is None:
                        raise DataError(f"{key}: {path} holds splits {list(ds)} but none of {list(splits)}.")
                    ds = ds[split]
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
    if not path.lower().endswith(JSONL_SUFFIXES):
        raise DataError(f"{key}: {path!r} is not a file type desmoe reads. Use JSON lines ("
                        f"{', '.join(JSONL_SUFFIXES)}: one JSON object per line), .parquet, or a folder written by "
                        "Dataset.save_to_disk(); convert other files (csv, txt, compressed) to one of these.")
    for lineno, record in read_jsonl(path, key=key, on_bad_line=on_bad_line, max_record_bytes=max_record_bytes):
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
    eval_examples: list | None = None
    """The examples of data.domains.<name>.eval, when it is set (None: eval is held out of train)."""


def load_domain_examples(data_cfg) -> tuple[dict[str, list[list[Segment]]], dict[str, ScanReport]]:
    """Read every configured domain's examples (as segments), in config order.

    Returns the training examples per domain and a ScanReport per domain (plus "data.train"
    for the mixed file), which also holds the examples of ``data.domains.<name>.eval`` when
    set. With ``data.on_bad_record: skip`` a malformed record is counted and skipped instead of
    stopping the run; unreadable files, unknown domains and empty domains are always errors.
    """
    from desmoe.data.builtin import builtin_segments

    names = list(data_cfg.domains)
    examples: dict[str, list[list[Segment]]] = {n: [] for n in names}
    report = {n: ScanReport() for n in names}
    if data_cfg.train is not None:
        report["data.train"] = ScanReport()  # unreadable lines of the mixed file belong to no domain
    skip = data_cfg.on_bad_record == "skip"
    limit = data_cfg.max_record_bytes

    def note_skip(domain: str, err: DataError) -> None:
        report[domain].skipped += 1
        report[domain].first_skip = report[domain].first_skip or str(err)

    def take(domain: str, into: list, record_fn) -> None:
        try:
            into.append(record_fn())
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

    def read_own_files(name: str, pattern: str, key: str, into: list, splits: tuple[str, ...]) -> None:
        fmt = data_cfg.domains[name].format
        on_bad = (lambda e: note_skip(name, e)) if skip else None
        for path in expand_sources(pattern, key=key):
            for where, record in _records(path, key, on_bad, max_record_bytes=limit, splits=splits):
                take(name, into, lambda r=record, w=where: own_record(r, w, name, fmt))

    for name, dom in data_cfg.domains.items():
        key = f"data.domains.{name}"
        if dom.builtin is not None:
            examples[name].extend(builtin_segments(dom.builtin))
        elif dom.train is not None:
            read_own_files(name, dom.train, f"{key}.train", examples[name], ("train",))
        if dom.eval is not None:
            report[name].eval_examples = []
            read_own_files(name, dom.eval, f"{key}.eval", report[name].eval_examples,
                           ("validation", "test", "eval", "train"))
    if data_cfg.train is not None:
        unknown: dict[str, str] = {}
        for path in expand_sources(data_cfg.train, key="data.train"):
            on_bad = (lambda e: note_skip("data.train", e)) if skip else None
            for where, record in _records(path, "data.train", on_bad, max_record_bytes=limit):
                label = record.get("domain")
                if not isinstance(label, str) or not label:
                    raise DataError(f"{where}: missing \"domain\" label. Every record of the mixed file "
                                    "data.train needs {\"domain\": NAME, \"text\": ...}.")
                if label not in examples:
                    unknown.setdefault(label, where)
                    continue
                fmt = data_cfg.domains[label].format
                take(label, examples[label], lambda r=record, w=where, f=fmt: record_segments(r, f, w))
        if unknown:
            listed = ", ".join(f"{d!r} (first at {w})" for d, w in sorted(unknown.items()))
            raise DataError(f"data.train has domains that data.domains does not list: {listed}. Add them to "
                            f"data.domains (e.g. data.domains.{sorted(unknown)[0]}: {{}}) or remove those records.")
    for name, dom in data_cfg.domains.items():
        if dom.max_examples is not None:
            examples[name] = examples[name][:dom.max_examples]
        examples[name] = [ex for ex in examples[name] if example_text(ex).strip()]
        if report[name].eval_examples is not None:
            report[name].eval_examples = [ex for ex in report[name].eval_examples if example_text(ex).strip()]
    empty = [n for n in names if not examples[n]]
    if empty:
        raise DataError(f"domain(s) {', '.join(empty)} have no examples (no record with non-empty text). Add "
                        "data for them or remove them from data.domains.")
    empty_eval = [n for n in names if report[n].eval_examples == []]
    if empty_eval:
        raise DataError(f"the eval data of domain(s) {', '.join(empty_eval)} has no examples (no record with "
                        "non-empty text). Fix data.domains.<name>.eval or unset it to hold out training examples.")
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

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), if its folder has one."""
        template = getattr(self.tok, "chat_template", None)
        return template if isinstance(template, str) and template.strip() else None

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """``messages`` rendered as text by the chat template, without a leading bos token (packing adds it)."""
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        bos = self.tok.bos_token
        if self.bos_id is not None and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


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
    """``data.tokenizer`` -> tokenizer; default: the model directory's tokenizer (HF files, or a bare
    ``tokenizer.model`` / ``sentencepiece.model``), else bytes.

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
    if model_cfg.path is not None:
        if any(os.path.isfile(os.path.join(model_cfg.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return HFTokenizer(model_cfg.path)
        for name in ("tokenizer.model", "sentencepiece.model"):  # a bare sentencepiece model (desmoe export writes
            if os.path.isfile(os.path.join(model_cfg.path, name)):  # sentencepiece.model)
                return SentencePieceTokenizer(os.path.join(model_cfg.path, name))
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Encoding and packing
# ---------------------------------------------------------------------------------------------

LONG_EXAMPLES = ("split", "truncate")


def chat_template_segments(messages: list[dict], tokenizer, where: str) -> list[Segment]:
    """A chat rendered by the tokenizer's own template, as segments; loss on the assistant turns only.

    The conversation is rendered message by message: the text each assistant message adds
    (its content and the template's end-of-turn marker) is trained; headers, the generation
    prompt and every other message are not. A template that does not render a conversation's
    beginning as a prefix of the whole cannot be split this way and is reported.
    """
    segments: list[Segment] = []
    done = ""

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.render_chat(messages[:upto], add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja templates raise their own errors (e.g. "roles must alternate")
            raise DataError(f"{where}: the tokenizer's chat template cannot render messages[:{upto}] "
                            f"({type(e).__name__}: {e}). Fix the conversation, or set data.chat_template: desmoe "
                            "to use desmoe's own <|role|> rendering.") from None

    def extend(text: str, trained: bool, upto: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation "
                            f"incrementally (messages[:{upto}] does not begin with the rendering of the messages "
                            "before it: the template rewrites earlier turns), so the assistant turns cannot be "
                            "located. Set data.chat_template: desmoe to use desmoe's own <|role|> rendering.")
        if len(text) > len(done):
            segments.append((text[len(done):], trained))
        done = text

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            extend(render(i, True), False, i)
            extend(render(i + 1, False), True, i + 1)
        else:
            extend(render(i + 1, False), False, i + 1)
    if not any(trained and text for text, trained in segments):
        raise DataError(f"{where}: the tokenizer's chat template rendered no assistant text, so nothing to train "
                        "on. Set data.chat_template: desmoe to use desmoe's own <|role|> rendering.")
    return segments


def render_segments(example: list[Segment], tokenizer, *, chat_template: str = "auto") -> list[Segment]:
    """The segments to tokenise: a chat example through the tokenizer's own chat template when it has
    one and ``chat_template`` is 'auto'; any other example (or 'desmoe') as it is."""
    if (isinstance(example, ChatExample) and chat_template == "auto"
            and getattr(tokenizer, "chat_template", None) is not None):
        return chat_template_segments(example.messages, tokenizer, example.where)
    return example


def encode_example(segments: list[Segment], tokenizer, *, chat_template: str = "auto") -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: labels are the ids on trained segments, IGNORE_INDEX elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(segments, tokenizer, chat_template=chat_template):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def eval_pair(example: list[Segment], tokenizer, *, chat_template: str = "auto") -> tuple[str, str] | None:
    """(prompt, reference) to evaluate an example by generation, or None for a plain text.

    The reference is the example's last trained segment (a response; the answer of a built-in
    math example; a chat's last assistant message, its content only) and the prompt all the
    text before it, rendered as in training (chat template included), so the model continues
    the prompt with the answer.
    """
    segments = render_segments(example, tokenizer, chat_template=chat_template)
    last = max((i for i, (_, trained) in enumerate(segments) if trained), default=None)
    if last is None or last == 0:
        return None
    prompt = example_text(segments[:last])
    if isinstance(example, ChatExample):
        reference = [m["content"] for m in example.messages if m["role"] == "assistant"][-1]
    else:
        reference = segments[last][0]
    return prompt, reference


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """The ids to generate from for an eval pair's prompt: bos (as packing puts it) and the prompt's tokens."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)


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
    """Task metrics (desmoe.metrics.METRICS), headline first."""

    @property
    def metric(self) -> str:
        """The headline task metric."""
        return self.metrics[0]


def domain_metrics(dom) -> tuple[str, ...]:
    """A domain's task metrics: ``metric`` if set; a built-in corpus's own (builtin.TASK_METRICS);
    exact_match for prompt_response files; next-token accuracy for text and chat."""
    from desmoe.data.builtin import TASK_METRICS

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
    from desmoe.metrics import GENERATION_METRICS

    needs_pairs = [m for m in metrics if m in GENERATION_METRICS]
    if needs_pairs and not pairs:
        raise DataError(f"data.domains.{name}.metric: {needs_pairs[0]} compares generated answers with reference "
                        f"answers, but domain {name!r} has no eval example with one (plain text). Use metric "
                        "token_accuracy, or prompt_response / chat records.")


def build_holdout(data_cfg, tokenizer) -> DomainData | None:
    """``data.holdout`` packed for evaluation only (never sampled for training); None when unset."""
    if data_cfg.holdout is None:
        return None
    from desmoe.config import DataSection

    one = DataSection(domains={"holdout": data_cfg.holdout}, on_bad_record=data_cfg.on_bad_record,
                      max_record_bytes=data_cfg.max_record_bytes)
    examples, _ = load_domain_examples(one)
    skip = (lambda e: None) if data_cfg.on_bad_record == "skip" else None
    fitted = [f for f in _fit_all(examples["holdout"], data_cfg, tokenizer, skip) if f is not None and f.tokens]
    ids, labels = _pack_fitted(fitted, data_cfg, tokenizer)
    n = min(ids.shape[0], data_cfg.holdout_sequences)
    return DomainData(name="holdout", weight=0.0, examples=len(fitted), tokens=sum(f.example_tokens for f in fitted),
                      train_ids=ids[:0], train_labels=labels[:0], eval_ids=ids[:n], eval_labels=labels[:n],
                      trained_tokens=0, metrics=("token_accuracy",))


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
