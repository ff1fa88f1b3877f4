"""Built-in sample domains, made offline from text that ships with Python, Debian and PyPI packages.

``code`` is CPython standard-library source; ``law`` licence text (CPython's LICENSE.txt and
Debian's /usr/share/common-licenses); ``summary`` standard-library functions -> the first line
of their docstring; ``translation`` CLDR names of countries, languages and months (Babel);
``general`` the Python documentation topics that ship with CPython (pydoc_data), a holdout for
forgetting that no domain trains on. ``math`` (arithmetic with exact answers) and ``intent``
(utterance -> JSON, from templates) are generated. Every corpus is a deterministic function of
the installed packages. An example is a text, or a (prompt, response) pair trained on the
response only.

Besides these seven, ``<parent>_<seam>`` sub-domains (translation_de, code_argparse, law_gpl, math_word,
intent_order_food, summary_tarfile, ...) cut one parent along a natural seam (desmoe.data.builtin_many has
the seams, and ``MANY_DOMAINS``: all 37 in an order that interleaves the parents); each keeps its
parent's record shape and task metrics.

Each domain declares its task metrics in ``TASK_METRICS`` (the first is the headline): the
generation metrics of desmoe.metrics (greedy answer vs. reference) for domains with a
reference answer, next-token accuracy on held-out rows for plain text.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import random
import sysconfig

from desmoe.data.builtin_many import PARENT_SOURCES, SEAMS, check_size

# Standard-library modules whose top-level functions and classes make the code corpus.
_CODE_MODULES = (
    "textwrap.py", "string.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py", "csv.py", "calendar.py",
    "statistics.py", "colorsys.py", "difflib.py", "fnmatch.py", "glob.py", "ipaddress.py", "json/decoder.py",
    "json/encoder.py", "base64.py", "configparser.py", "argparse.py", "random.py", "graphlib.py", "pprint.py",
)


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_sources(modules: tuple[str, ...]):
    """(source text, parsed module) of each listed standard-library file that exists here."""
    for rel in modules:
        path = os.path.join(_stdlib(), rel)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            yield source, ast.parse(source)


def code_examples() -> list[str]:
    """Top-level functions and classes of a fixed list of standard-library modules, in source order."""
    out = []
    for source, tree in _stdlib_sources(_CODE_MODULES):
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                seg = ast.get_source_segment(source, node)
                if seg and len(seg) >= 80:
                    out.append(seg)
    if not out:
        raise FileNotFoundError(f"no standard-library source found under {_stdlib()}; the 'code' sample "
                                "domain needs the Python installation's .py files.")
    return out


_LICENCES = "/usr/share/common-licenses"


def _law_paths() -> list[str]:
    """CPython's LICENSE.txt, then Debian's common licences (sorted) if present."""
    paths = [os.path.join(_stdlib(), "LICENSE.txt")]
    if os.path.isdir(_LICENCES):
        paths += [os.path.join(_LICENCES, n) for n in sorted(os.listdir(_LICENCES))]
    return paths


def _law_paragraphs(path: str) -> list[str]:
    """The paragraphs (>= 120 characters, whitespace folded) of one licence file; none for a link or no file."""
    if not os.path.isfile(path) or os.path.islink(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    paras = (" ".join(para.split()) for para in text.split("\n\n"))
    return [para for para in paras if len(para) >= 120]


def law_examples() -> list[str]:
    """Paragraphs of licence texts: CPython's LICENSE.txt, then Debian's common licences if present."""
    out = [para for path in _law_paths() for para in _law_paragraphs(path)]
    if not out:
        raise FileNotFoundError("no licence text found (CPython's LICENSE.txt, /usr/share/common-licenses); "
                                "the 'law' sample domain needs one of them.")
    return out


def _math_items(n: int = 4000, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) of math_examples: kind is addition, subtraction, multiplication or word."""
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]
    items = ["apples", "books", "coins", "marbles", "pencils", "stamps"]
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if kind == 0:
            out.append(("addition", f"Question: What is {a} + {b}?\nAnswer: {a + b}"))
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            out.append(("subtraction", f"Question: What is {a} - {b}?\nAnswer: {a - b}"))
        elif kind == 2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(("multiplication", f"Question: What is {a} times {b}?\nAnswer: {a * b}"))
        else:
            who, what = rng.choice(names), rng.choice(items)
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            out.append(("word", f"Question: {who} has {a} {what} and buys {b} more. How many {what} does {who} "
                                f"have now?\nAnswer: {a + b}"))
    return out


def math_examples(n: int = 4000, seed: int = 0) -> list[str]:
    """Arithmetic questions and short word problems with exactly computed answers."""
    return [text for _, text in _math_items(n, seed)]


# Modules for the summary domain: disjoint from the code domain's, so the two do not share text.
_SUMMARY_MODULES = ("shutil.py", "tempfile.py", "posixpath.py", "os.py", "inspect.py", "collections/__init__.py",
                    "functools.py", "datetime.py", "decimal.py", "_pydecimal.py", "email/utils.py", "urllib/parse.py",
                    "zipfile/__init__.py", "tarfile.py", "subprocess.py", "threading.py", "logging/__init__.py",
                    "typing.py", "pathlib.py", "locale.py", "gettext.py", "optparse.py", "pickle.py")


def _summary_pairs(source: str, tree: ast.Module) -> list[tuple[str, str]]:
    """summary_examples' pairs of one module (every function with a docstring, in ast.walk order)."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or len(node.body) < 2:
            continue
        first = doc.strip().splitlines()[0].strip()
        if len(first) < 12:
            continue
        body_start = node.body[1]
        header = lines[node.lineno - 1:node.body[0].lineno - 1]
        body = lines[body_start.lineno - 1:node.end_lineno]
        code = "\n".join(header + body)
        if len(code) > 1500:
            continue
        out.append((f"Summarize this Python function in one line.\n{code}\nSummary:", " " + first))
    return out


def summary_examples() -> list[tuple[str, str]]:
    """(function source without its docstring, first line of the docstring) from standard-library modules."""
    out = [pair for source, tree in _stdlib_sources(_SUMMARY_MODULES) for pair in _summary_pairs(source, tree)]
    if not out:
        raise FileNotFoundError(f"no standard-library source found under {_stdlib()} for the 'summary' domain.")
    return out


_LOCALES = ("de", "fr", "es", "it", "nl", "pt", "sv", "pl", "cs", "fi")


def _translation_pairs(en, code: str) -> list[tuple[str, str]]:
    """translation_examples' pairs of one target language (``en``: Babel's English Locale)."""
    from babel import Locale

    loc = Locale.parse(code)
    target = en.languages.get(code, code)
    out = []
    for key, name in sorted(en.territories.items()):
        if key.isalpha() and key in loc.territories:
            out.append((f"Translate the country name to {target}: {name} =>", " " + loc.territories[key]))
    for key, name in sorted(en.languages.items()):
        if "_" not in key and key in loc.languages and len(key) == 2:
            out.append((f"Translate the language name to {target}: {name} =>", " " + loc.languages[key]))
    for month in range(1, 13):
        out.append((f"Translate the month to {target}: {en.months['format']['wide'][month]} =>",
                    " " + loc.months["format"]["wide"][month]))
    return out


def translation_examples() -> list[tuple[str, str]]:
    """CLDR names of countries, languages and months, English -> another language (Babel's data)."""
    from babel import Locale

    en = Locale.parse("en")
    return [pair for code in _LOCALES for pair in _translation_pairs(en, code)]


def _intent_items(n: int = 3000, seed: int = 0) -> list[tuple[str, tuple[str, str]]]:
    """(intent, pair) of intent_examples: intent is book_table, weather, set_timer or order_food."""
    import json

    rng = random.Random(seed)
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Denver"]
    foods = ["pizza", "sushi", "curry", "salad", "tacos", "noodles"]
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            people, hour = rng.randint(1, 9), rng.randint(11, 22)
            text = rng.choice(["Book a table for {p} at {h}:00", "Reserve a table for {p} people at {h}:00",
                               "Can I get a table for {p} at {h}:00?"]).format(p=people, h=hour)
            label = {"intent": "book_table", "people": people, "time": f"{hour:02d}:00"}
        elif kind == 1:
            city = rng.choice(cities)
            text = rng.choice(["What's the weather in {c}?", "Will it rain in {c} tomorrow?",
                               "Weather forecast for {c}"]).format(c=city)
            label = {"intent": "weather", "city": city}
        elif kind == 2:
            minutes = rng.choice([5, 10, 15, 20, 30, 45, 60])
            text = rng.choice(["Set a timer for {m} minutes", "Timer {m} min please",
                               "Remind me in {m} minutes"]).format(m=minutes)
            label = {"intent": "set_timer", "minutes": minutes}
        else:
            food, qty = rng.choice(foods), rng.randint(1, 5)
            text = rng.choice(["Order {q} {f}", "I'd like {q} portions of {f}", "Get me {q} {f} delivered"]).format(
                q=qty, f=food)
            label = {"intent": "order_food", "item": food, "quantity": qty}
        out.append((label["intent"], (f"Utterance: {text}\nJSON:", " " + json.dumps(label, sort_keys=True))))
    return out


def intent_examples(n: int = 3000, seed: int = 0) -> list[tuple[str, str]]:
    """Utterances from templates -> their intent as JSON (exact-match target)."""
    return [pair for _, pair in _intent_items(n, seed)]


def general_examples() -> list[str]:
    """Paragraphs of the Python documentation topics shipped with CPython (pydoc_data)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 120:
                out.append(para)
    return out


def _code_units(source: str, tree: ast.Module) -> list[str]:
    """The code_<module> sub-domains' units: every function and method (of classes at any depth, not of
    functions) of at least 80 characters, in source order."""
    lines = [line.encode() for line in io.StringIO(source, newline="").readlines()]  # ast's own line split
    out = []

    def segment(node) -> str:  # ast.get_source_segment, without splitting the whole source per call
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return lines[first][node.col_offset:node.end_col_offset].decode()
        return b"".join([lines[first][node.col_offset:], *lines[first + 1:last],
                         lines[last][:node.end_col_offset]]).decode()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                seg = segment(node)
                if len(seg) >= 80:
                    out.append(seg)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return out


def _sub_examples(name: str) -> list:
    """A sub-domain (builtin_many.SEAMS): the part of its parent corpus that has the seam's keys, each
    example once (a held-out example is in no training row); law_* without the paragraphs that licence
    files of another family share (the GPL preamble in the LGPL, ...)."""
    parent, keys, _ = SEAMS[name]
    if parent == "math":
        return check_size(name, _once(t for kind, t in _math_items() if kind in keys), f"math kind {keys[0]}")
    if parent == "intent":
        return check_size(name, _once(p for i, p in _intent_items() if i in keys), f"intent {keys[0]}")
    if parent == "translation":
        from babel import Locale

        en = Locale.parse("en")
        return check_size(name, _once(p for code in keys for p in _translation_pairs(en, code)), f"Babel {keys}")
    if parent == "law":
        paths = _law_seam_paths(keys)
        if not any(os.path.isfile(p) for p in paths):
            raise FileNotFoundError(f"built-in domain {name!r} needs one of the licence files {', '.join(paths)}; "
                                    "none is here (Debian's base-files ships /usr/share/common-licenses).")
        others = {para for other in SEAMS.values() if other.parent == "law" and other.keys != keys
                  for p in _law_seam_paths(other.keys) for para in _law_paragraphs(p)}
        return check_size(name, _once(para for p in paths for para in _law_paragraphs(p) if para not in others),
                          ", ".join(paths))
    missing = [rel for rel in keys if not os.path.isfile(os.path.join(_stdlib(), rel))]
    if missing:
        raise FileNotFoundError(f"built-in domain {name!r} needs the standard-library source "
                                f"{', '.join(missing)} under {_stdlib()}; it is not there.")
    cut = _code_units if parent == "code" else _summary_pairs
    return check_size(name, _once(u for source, tree in _stdlib_sources(keys) for u in cut(source, tree)),
                      f"{', '.join(keys)} under {_stdlib()}")


def _once(examples) -> list:
    """The examples in order, each the first time only."""
    return list(dict.fromkeys(examples))


def _law_seam_paths(files: tuple[str, ...]) -> list[str]:
    return [os.path.join(_stdlib() if f == "LICENSE.txt" else _LICENCES, f) for f in files]


BUILTIN_DOMAINS = {
    "math": math_examples,
    "code": code_examples,
    "law": law_examples,
    "summary": summary_examples,
    "translation": translation_examples,
    "intent": intent_examples,
    "general": general_examples,
    **{name: functools.partial(_sub_examples, name) for name in SEAMS},
}
"""Every built-in corpus: the seven parents, then the sub-domains of builtin_many.SEAMS."""
PARENT_DOMAINS: tuple[str, ...] = tuple(n for n in BUILTIN_DOMAINS if n not in SEAMS)
"""The seven corpora the sub-domains are cut from (general included, which is not cut)."""


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "math": ("exact_match",),
    "intent": ("exact_match",),
    "translation": ("chrf", "exact_match"),
    "summary": ("chrf",),
    "code": ("token_accuracy",),
    "law": ("token_accuracy",),
    "general": ("token_accuracy",),
}
TASK_METRICS.update({name: TASK_METRICS[seam.parent] for name, seam in SEAMS.items()})
"""Each built-in domain's task metrics, headline first (names from desmoe.constants.METRICS); a
sub-domain's are its parent's."""

# Text domains whose examples end in a short answer after this marker: the whole text is trained
# on (as before), but the answer is its own segment so that evaluation can generate it.
_ANSWER_AFTER = {"math": "\nAnswer:"}


def builtin_parent(name: str) -> str:
    """The parent corpus of a built-in domain (itself for the seven parents)."""
    return SEAMS[name].parent if name in SEAMS else name


def builtin_source(name: str) -> str:
    """One line: where the built-in domain ``name`` comes from (KeyError for an unknown name)."""
    return SEAMS[name].source if name in SEAMS else PARENT_SOURCES[name]


def builtin_examples(name: str) -> list:
    """A built-in corpus: texts, or (prompt, response) pairs."""
    return BUILTIN_DOMAINS[name]()


def builtin_segments(name: str) -> list[list[tuple[str, bool]]]:
    """A built-in corpus as examples of (text, trained) segments, like desmoe.data.record_segments.

    A (prompt, response) pair trains on the response only; a text trains on all of it. A math (and
    math_*) text is two trained segments, question and answer, so its last segment is the reference
    answer a generation metric compares with (the tokens trained on are the same).
    """
    marker = _ANSWER_AFTER.get(builtin_parent(name))
    out = []
    for ex in builtin_examples(name):
        if isinstance(ex, tuple):
            out.append([(ex[0], False), (ex[1], True)])
        elif marker is not None and marker in ex:
            question, sep, answer = ex.rpartition(marker)
            out.append([(question + sep, True), (answer, True)])
        else:
            out.append([(ex, True)])
    return out
