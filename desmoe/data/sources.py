"""Reading domain-labelled data: files and globs, JSON lines, parquet and save_to_disk sources.

Holds DataError (every user-facing data problem), the record formats (text, prompt_response, chat)
turned into segments (``Segment``: a piece of text and whether it is trained), ChatExample, the
ScanReport of what reading found, and load_domain_examples / load_domain_texts. Knows nothing of
tokenizers or packing; the built-in corpora come from desmoe.data.builtin.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
from typing import Iterable

from desmoe.data.builtin import builtin_segments


class DataError(ValueError):
    """A user-facing problem with the training data."""


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


def read_records(path: str, key: str, on_bad_line=None, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
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
            for where, record in read_records(path, key, on_bad, max_record_bytes=limit, splits=splits):
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
            for where, record in read_records(path, "data.train", on_bad, max_record_bytes=limit):
                label = record.get("domain")
                if not isinstance(label, str) or not label:
                    raise DataError(f"{where}: missing \"domain\" label. Every record of the mixed file "
                                    "data.train needs {\"domain\": NAME, \"text\": ...}, or set data.discover to "
                                    "find domains from routing.")
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

