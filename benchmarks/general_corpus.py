"""A larger general corpus of real offline text: the Python 3.11 documentation's reStructuredText sources.

The text is what Debian's ``python3.11-doc`` package ships under
``/usr/share/doc/python3.11/html/_sources`` (497 ``*.rst.txt`` files, ~11 MB; cleaned, ~2.9 M tokens under
the dsv2 recipe's 2048-id sentencepiece model). ``find_sources`` looks for them in this order:

1. an explicit folder (``find_sources(folder)``, ``--pydoc-sources``, or ``$DESMOE_PYDOC_SOURCES``);
2. the installed package (``apt-get install python3.11-doc``);
3. a copy extracted before into ``$DESMOE_CACHE/general_corpus/python3.11-doc_<version>/``;
4. a fresh copy: ``apt-get download python3.11-doc`` (no root needed) and ``dpkg-deb -x``, into (3).

``load_documents`` turns each file into paragraphs (blank-line separated, rst markup noise
removed: directives' metadata, index entries, role syntax, heading underlines) and
``split_documents`` holds out whole documents: a document is held out when a hash of its path
falls under ``holdout_fraction``, so no sentence of a held-out page is in the training text.

NOTE: CPython's ``pydoc_data`` topics (desmoe's built-in ``general`` corpus) are generated from
the same documentation's reference section, so a model pretrained on this corpus has seen most
of them: evaluate forgetting on ``save_jsonl``'s held-out documents instead. ``license.rst`` is
left out: it is CPython's LICENSE.txt, the text of the built-in ``law`` domain.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import textwrap

PACKAGE = "python3.11-doc"
"""The Debian package that ships the documentation sources."""

INSTALLED = "/usr/share/doc/python3.11/html/_sources"
"""Where the installed package keeps them."""

ENV_VAR = "DESMOE_PYDOC_SOURCES"
"""Environment variable naming a folder of the sources (overrides every other place)."""

SUFFIXES = (".rst.txt", ".rst")
"""Source files: Sphinx's copies (``_sources``) or a CPython ``Doc/`` checkout's own files."""

EXCLUDED = ("license",)
"""Documents left out (suffix-less relative paths): license is the built-in ``law`` domain's text."""


class CorpusUnavailable(FileNotFoundError):
    """The documentation sources are nowhere to be found and cannot be fetched."""


# ---------------------------------------------------------------------------------------------
# Finding the sources
# ---------------------------------------------------------------------------------------------


def has_sources(folder: str) -> bool:
    """Whether ``folder`` holds at least one documentation source file."""
    return os.path.isdir(folder) and bool(list_documents(folder))


def default_cache_dir() -> str:
    """``$DESMOE_CACHE/general_corpus`` (desmoe's cache, ``.cache/desmoe`` in the checkout by default)."""
    from desmoe.data import spm_cache_dir

    return os.path.join(spm_cache_dir(), "general_corpus")


def cached_sources(cache_dir: str) -> str | None:
    """The ``_sources`` folder of the newest package version extracted into ``cache_dir`` before, if any."""
    found = sorted(p for p in glob.glob(os.path.join(cache_dir, PACKAGE + "_*", "_sources")) if has_sources(p))
    return found[-1] if found else None


def fetch_sources(cache_dir: str, *, log=None) -> str:
    """Download ``python3.11-doc`` with apt-get (no root needed) and extract its sources into ``cache_dir``.

    Keeps only ``_sources`` and the package's ``copyright`` file (the licence), in
    ``<cache_dir>/python3.11-doc_<version>/``; written beside and renamed, so a killed fetch
    leaves nothing half-made. Returns the ``_sources`` folder.
    """
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir)
    try:
        _run(["apt-get", "download", PACKAGE], cwd=tmp)
        debs = sorted(glob.glob(os.path.join(tmp, PACKAGE + "_*.deb")))
        if not debs:
            raise CorpusUnavailable(f"apt-get download {PACKAGE} left no .deb file in {tmp}.")
        name = os.path.basename(debs[-1]).rsplit("_", 1)[0]  # python3.11-doc_<version>_all.deb
        root = os.path.join(tmp, "root")
        _run(["dpkg-deb", "-x", debs[-1], root], cwd=tmp)
        keep = os.path.join(tmp, name)
        os.makedirs(keep)
        os.rename(os.path.join(root, INSTALLED.lstrip("/")), os.path.join(keep, "_sources"))
        copyright_file = os.path.join(root, "usr", "share", "doc", PACKAGE, "copyright")
        if os.path.isfile(copyright_file):
            shutil.copyfile(copyright_file, os.path.join(keep, "copyright"))
        final = os.path.join(cache_dir, name)
        if not os.path.isdir(final):
            os.rename(keep, final)
        if log:
            log(f"general corpus: fetched {os.path.basename(debs[-1])} into {final}")
        return os.path.join(final, "_sources")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], *, cwd: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusUnavailable(f"{' '.join(cmd)} could not run: {e}") from e
    if proc.returncode != 0:
        raise CorpusUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def find_sources(folder: str | None = None, *, cache_dir: str | None = None, fetch: bool = True, log=None) -> str:
    """The folder of documentation sources: ``folder``, ``$DESMOE_PYDOC_SOURCES``, the installed package,
    the cache, else fetched into the cache (``fetch``). Raises CorpusUnavailable saying what to do."""
    explicit = folder or os.environ.get(ENV_VAR)
    if explicit:
        where = "the folder given" if folder else f"${ENV_VAR}"
        if not has_sources(explicit):
            raise CorpusUnavailable(f"{where} ({explicit!r}) holds no Python documentation sources (*.rst.txt or "
                                    f"*.rst). Point it at e.g. {INSTALLED} or a CPython Doc/ folder.")
        return os.path.abspath(explicit)
    if has_sources(INSTALLED):
        return INSTALLED
    cache_dir = cache_dir or default_cache_dir()
    cached = cached_sources(cache_dir)
    if cached:
        return cached
    problem = "fetching is off"
    if fetch:
        try:
            return fetch_sources(cache_dir, log=log)
        except CorpusUnavailable as e:
            problem = str(e)
    raise CorpusUnavailable(
        f"the general corpus needs the Python 3.11 documentation sources, found neither in {INSTALLED} nor in "
        f"{cache_dir}, and could not fetch them ({problem}). Install them (apt-get install {PACKAGE}), or set "
        f"{ENV_VAR} to a folder of the documentation's .rst sources.")


def licence_file(sources: str) -> str | None:
    """The package's copyright file beside ``sources`` (a cached extraction) or installed, if present."""
    for path in (os.path.join(os.path.dirname(sources), "copyright"), f"/usr/share/doc/{PACKAGE}/copyright"):
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# Reading: rst -> paragraphs
# ---------------------------------------------------------------------------------------------


def doc_key(rel_path: str) -> str:
    """A document's name: its relative path, '/'-separated, without the source suffix (library/os)."""
    rel = rel_path.replace(os.sep, "/")
    for suffix in SUFFIXES:
        if rel.endswith(suffix):
            return rel[:-len(suffix)]
    return rel


def list_documents(root: str) -> list[str]:
    """Relative paths of the source files under ``root``, sorted (``.rst.txt`` preferred over ``.rst``)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.endswith(SUFFIXES):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                key = doc_key(rel)
                if key not in found or rel.endswith(".rst.txt"):
                    found[key] = rel
    return [found[k] for k in sorted(found)]


# Directives whose line is metadata: dropped with the indented block under them.
_DROP = {"index", "module", "moduleauthor", "sectionauthor", "highlight", "toctree", "include", "literalinclude",
         "tabularcolumns", "currentmodule", "contents", "image", "figure", "testsetup", "testcleanup", "only",
         "raw", "program", "autosummary", "c:namespace", "c:namespace-push", "c:namespace-pop", "cssclass"}
# Directives whose argument reads as a sentence opener.
_LEAD = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}.",
         "deprecated": "Deprecated since version {}.", "note": "Note:", "warning": "Warning:",
         "seealso": "See also:", "important": "Important:", "caution": "Caution:", "hint": "Hint:",
         "tip": "Tip:", "attention": "Attention:", "danger": "Danger:", "impl-detail": "CPython implementation detail:",
         "availability": "Availability: {}."}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_OPTION = re.compile(r"^\s+:[\w -]+:(\s|$)")
_ROLE = re.compile(r":([\w:.+-]+):`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>]*>)?`__?")
_ADORNMENT = set("=-~^\"'`#*+_<>:.| ")


def _role_text(role: str, content: str) -> str:
    """What Sphinx shows for ``:role:`content```: a title before ``<target>``, the last name after ``~``."""
    content = content.strip()
    m = re.match(r"^(.*?)\s*<[^>]+>$", content, re.S)
    if m and m.group(1):
        return m.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        return content[1:].rsplit(".", 1)[-1]
    prefix = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}.get(role, "")
    return prefix + content


def clean_inline(line: str) -> str:
    """Role, literal and link syntax replaced by the text it shows; a trailing ``::`` by ``:``."""
    line = _ROLE.sub(lambda m: _role_text(m.group(1), m.group(2)), line)
    line = _LITERAL.sub(lambda m: m.group(1), line)
    line = _LINK.sub(lambda m: m.group(1), line)
    if line.rstrip().endswith("::"):
        stripped = line.rstrip()[:-2].rstrip()
        line = stripped + ":" if stripped and not stripped.endswith((" ", ":")) else stripped
    return line


def _is_adornment(line: str) -> bool:
    """A heading underline / overline or a table border (punctuation only, at least 3 characters)."""
    s = line.strip()
    return len(s) >= 3 and set(s) <= _ADORNMENT


def clean_rst(text: str) -> str:
    """reStructuredText -> the text a reader sees, roughly: metadata directives (index, module authors,
    toctrees ...) and comments dropped with their indented blocks, other directives reduced to their
    argument (``.. function:: f(x)`` -> ``f(x)``, ``.. versionadded:: 3.4`` -> ``New in version 3.4.``)
    and their ``:option:`` lines dropped, role and literal markup removed, heading underlines removed."""
    out: list[str] = []
    skip_indent = None  # inside a dropped block: lines indented deeper than this (or blank) go
    in_options = False
    for raw in text.expandtabs(8).splitlines():
        indent = len(raw) - len(raw.lstrip())
        if skip_indent is not None:
            if not raw.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if in_options and _OPTION.match(raw):
            continue
        in_options = False
        m = _DIRECTIVE.match(raw)
        if m:
            name, arg = m.group(2), m.group(3).strip()
            if name in _DROP:
                skip_indent = len(m.group(1))
                continue
            in_options = True
            if name in _LEAD:
                lead = _LEAD[name]
                shown = lead.format(arg) if "{}" in lead else (lead + " " + arg).strip()
            elif name == "deprecated-removed":
                parts = arg.split()
                shown = f"Deprecated since version {parts[0]}, will be removed in version {parts[1]}." \
                    if len(parts) >= 2 else ""
            else:
                shown = arg  # object descriptions (function, class, c:member ...), rubric, code-block language
                if name in ("code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"):
                    shown = ""
            if shown:
                out.append(m.group(1) + clean_inline(shown))
            continue
        if _COMMENT.match(raw):  # a comment, a link target (.. _name:), a substitution definition
            skip_indent = indent
            continue
        if _is_adornment(raw):
            continue
        out.append(clean_inline(raw.rstrip()))
    return "\n".join(out)


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each dedented, trailing space removed; empty ones dropped."""
    paras = []
    for block in re.split(r"\n\s*\n", text):
        block = textwrap.dedent(block).strip("\n").rstrip()
        if block.strip():
            paras.append(block)
    return paras


def _split_long(para: str, max_chars: int) -> list[str]:
    """A paragraph longer than ``max_chars`` cut at line breaks (a single overlong line at spaces)."""
    pieces: list[str] = []
    for line in para.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(line[:cut])
            line = line[cut:].lstrip()
        pieces.append(line)
    out, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + 1 + len(piece) > max_chars:
            out.append(cur)
            cur = piece
        else:
            cur = cur + "\n" + piece if cur else piece
    if cur.strip():
        out.append(cur)
    return [p for p in out if p.strip()]


def merge_paragraphs(paras: list[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs joined (blank line between) into examples of at most ``max_chars`` characters.

    NOTE: merging keeps examples near one bounded size (many rst paragraphs are one line: a
    heading, a signature) without ever crossing a document boundary."""
    out, cur = [], ""
    for para in paras:
        for piece in ([para] if len(para) <= max_chars else _split_long(para, max_chars)):
            if cur and len(cur) + 2 + len(piece) > max_chars:
                out.append(cur)
                cur = piece
            else:
                cur = cur + "\n\n" + piece if cur else piece
    if cur:
        out.append(cur)
    return out


def normalise(text: str) -> str:
    """Whitespace-collapsed text: what two paragraphs must share to count as the same."""
    return " ".join(text.split())


def load_documents(root: str) -> dict[str, list[str]]:
    """Document name (doc_key) -> its cleaned paragraphs, for every source under ``root`` but EXCLUDED."""
    docs = {}
    for rel in list_documents(root):
        key = doc_key(rel)
        if key in EXCLUDED:
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            docs[key] = split_paragraphs(clean_rst(f.read()))
    return docs


# ---------------------------------------------------------------------------------------------
# Holdout by whole document
# ---------------------------------------------------------------------------------------------


def is_holdout(key: str, fraction: float, salt: str = "desmoe-general-holdout") -> bool:
    """Whether document ``key`` is held out: the first 8 bytes of sha256(salt:key) as a fraction of 2^64."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def _overlap_test(held: list[str], min_chars: int, n: int = 6):
    """A predicate on normalised training paragraphs: does it share a passage of ``min_chars`` or more
    with the held-out paragraphs (inside one of them, or around one of them)?

    NOTE: plain substring search of every paragraph in the other side's text takes ~20 s here;
    an index of word ``n``-grams finds the candidates (a contained paragraph's first ``n`` words
    are an ``n``-gram of its container) and ``in`` confirms them. A paragraph that starts in the
    middle of a word of its container is not found; paragraphs are whole, so that does not occur.
    """
    held_grams: dict[str, list[int]] = {}  # n-gram -> the held-out paragraphs that have it
    for i, h in enumerate(held):
        words = h.split(" ")
        for j in range(len(words) - n + 1):
            held_grams.setdefault(" ".join(words[j:j + n]), []).append(i)
    long_held = [h for h in set(held) if len(h) >= min_chars]
    starts: dict[str, list[str]] = {}  # first n words -> held-out paragraphs of min_chars or more
    for h in long_held:
        if len(h.split(" ")) >= n:
            starts.setdefault(" ".join(h.split(" ")[:n]), []).append(h)
    short_held = [h for h in long_held if len(h.split(" ")) < n]
    held_text = "\n".join(held)  # normalised paragraphs hold no newline: no match spans two

    def inside_held(para: str, words: list[str]) -> bool:
        if len(words) < n:
            return para in held_text
        return any(para in held[i] for i in held_grams.get(" ".join(words[:n]), ()))

    def around_held(para: str, words: list[str]) -> bool:
        grams = (" ".join(words[j:j + n]) for j in range(len(words) - n + 1))
        return any(h in para for g in grams for h in starts.get(g, ())) or any(h in para for h in short_held)

    def seen(para: str) -> bool:
        if len(para) < min_chars:
            return False
        words = para.split(" ")
        return inside_held(para, words) or around_held(para, words)

    return seen


def split_documents(docs: dict[str, list[str]], *, holdout_fraction: float, max_chars: int,
                    min_duplicate_chars: int = 80) -> dict:
    """Training examples (merged paragraphs; documents in sorted order) and held-out ones (a seeded shuffle).

    Returns {"train": [text], "holdout": [text], "holdout_documents": [key], "train_documents":
    [key], "dropped_duplicates": n}. The documentation repeats some passages verbatim across pages,
    so a training paragraph of at least ``min_duplicate_chars`` characters (whitespace-normalised)
    is dropped when a held-out paragraph contains it or it contains a held-out paragraph of that
    length (shorter repeats are stock phrases such as "New in version 3.4.", which no holdout can
    avoid): the held-out text is text the training set does not hold.
    """
    held = [k for k in sorted(docs) if is_holdout(k, holdout_fraction)]
    kept = [k for k in sorted(docs) if k not in set(held)]
    if not held or not kept:
        raise ValueError(f"holdout_fraction {holdout_fraction} holds out {len(held)} of {len(docs)} documents; "
                         "both the training and the held-out set need at least one. Change the fraction.")
    seen = _overlap_test([normalise(p) for k in held for p in docs[k]], min_duplicate_chars)
    train, dropped = [], 0
    for k in kept:
        paras = [p for p in docs[k] if not seen(normalise(p))]
        dropped += len(docs[k]) - len(paras)
        train += merge_paragraphs(paras, max_chars)
    holdout = [ex for k in held for ex in merge_paragraphs(docs[k], max_chars)]
    # NOTE: shuffled (seeded), so that the first rows, the ones evaluated, sample every held-out
    # document rather than the first few in path order (about, c-api/...)
    random.Random("desmoe-general-holdout-order").shuffle(holdout)
    return {"train": train, "holdout": holdout, "holdout_documents": held, "train_documents": kept,
            "dropped_duplicates": dropped}


def load_general_corpus(sources: str, *, holdout_fraction: float, max_chars: int) -> dict:
    """``split_documents`` of the sources under ``sources`` (find_sources' folder), plus where they came from."""
    split = split_documents(load_documents(sources), holdout_fraction=holdout_fraction, max_chars=max_chars)
    split["sources"] = sources
    return split


def save_jsonl(texts: list[str], path: str) -> None:
    """``{"text": ...}`` records, one a line: what desmoe reads as ``data.holdout: {train: PATH}``."""
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
