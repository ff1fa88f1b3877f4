"""Built-in sample domains, made offline from text that ships with Python, Debian and PyPI packages.

``code`` is CPython standard-library source; ``law`` licence text (CPython's LICENSE.txt and
Debian's /usr/share/common-licenses); ``summary`` standard-library functions -> the first line
of their docstring; ``translation`` CLDR names of countries, languages and months (Babel);
``general`` the Python documentation topics that ship with CPython (pydoc_data), a holdout for
forgetting that no domain trains on. ``math`` (arithmetic with exact answers) and ``intent``
(utterance -> JSON, from templates) are generated. Every corpus is a deterministic function of
the installed packages. An example is a text, or a (prompt, response) pair trained on the
response only.

Each domain declares its task metrics in ``TASK_METRICS`` (the first is the headline): the
generation metrics of desmoe.metrics (greedy answer vs. reference) for domains with a
reference answer, next-token accuracy on held-out rows for plain text.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig

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


def law_examples() -> list[str]:
    """Paragraphs of licence texts: CPython's LICENSE.txt, then Debian's common licences if present."""
    paths = [os.path.join(_stdlib(), "LICENSE.txt")]
    licences = "/usr/share/common-licenses"
    if os.path.isdir(licences):
        paths += [os.path.join(licences, n) for n in sorted(os.listdir(licences))]
    out = []
    for path in paths:
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 120:
                out.append(para)
    if not out:
        raise FileNotFoundError("no licence text found (CPython's LICENSE.txt, /usr/share/common-licenses); "
                                "the 'law' sample domain needs one of them.")
    return out


def math_examples(n: int = 4000, seed: int = 0) -> list[str]:
    """Arithmetic questions and short word problems with exactly computed answers."""
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]
    items = ["apples", "books", "coins", "marbles", "pencils", "stamps"]
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if kind == 0:
            out.append(f"Question: What is {a} + {b}?\nAnswer: {a + b}")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            out.append(f"Question: What is {a} - {b}?\nAnswer: {a - b}")
        elif kind == 2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(f"Question: What is {a} times {b}?\nAnswer: {a * b}")
        else:
            who, what = rng.choice(names), rng.choice(items)
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            out.append(f"Question: {who} has {a} {what} and buys {b} more. How many {what} does {who} have now?\n"
                       f"Answer: {a + b}")
    return out


# Modules for the summary domain: disjoint from the code domain's, so the two do not share text.
_SUMMARY_MODULES = ("shutil.py", "tempfile.py", "posixpath.py", "os.py", "inspect.py", "collections/__init__.py",
                    "functools.py", "datetime.py", "decimal.py", "_pydecimal.py", "email/utils.py", "urllib/parse.py",
                    "zipfile/__init__.py", "tarfile.py", "subprocess.py", "threading.py", "logging/__init__.py",
                    "typing.py", "pathlib.py", "locale.py", "gettext.py", "optparse.py", "pickle.py")


def summary_examples() -> list[tuple[str, str]]:
    """(function source without its docstring, first line of the docstring) from standard-library modules."""
    out = []
    for source, tree in _stdlib_sources(_SUMMARY_MODULES):
        lines = source.splitlines()
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
    if not out:
        raise FileNotFoundError(f"no standard-library source found under {_stdlib()} for the 'summary' domain.")
    return out


_LOCALES = ("de", "fr", "es", "it", "nl", "pt", "sv", "pl", "cs", "fi")


def translation_examples() -> list[tuple[str, str]]:
    """CLDR names of countries, languages and months, English -> another language (Babel's data)."""
    from babel import Locale

    en = Locale.parse("en")
    out = []
    for code in _LOCALES:
        loc = Locale.parse(code)
        target = en.languages.get(code, code)
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


def intent_examples(n: int = 3000, seed: int = 0) -> list[tuple[str, str]]:
    """Utterances from templates -> their intent as JSON (exact-match target)."""
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
        out.append((f"Utterance: {text}\nJSON:", " " + json.dumps(label, sort_keys=True)))
    return out


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


BUILTIN_DOMAINS = {
    "math": math_examples,
    "code": code_examples,
    "law": law_examples,
    "summary": summary_examples,
    "translation": translation_examples,
    "intent": intent_examples,
    "general": general_examples,
}


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "math": ("exact_match",),
    "intent": ("exact_match",),
    "translation": ("chrf", "exact_match"),
    "summary": ("chrf",),
    "code": ("token_accuracy",),
    "law": ("token_accuracy",),
    "general": ("token_accuracy",),
}
"""Each built-in domain's task metrics, headline first (names from desmoe.constants.METRICS)."""

# Text domains whose examples end in a short answer after this marker: the whole text is trained
# on (as before), but the answer is its own segment so that evaluation can generate it.
_ANSWER_AFTER = {"math": "\nAnswer:"}


def builtin_examples(name: str) -> list:
    """A built-in corpus: texts, or (prompt, response) pairs."""
    return BUILTIN_DOMAINS[name]()


def builtin_segments(name: str) -> list[list[tuple[str, bool]]]:
    """A built-in corpus as examples of (text, trained) segments, like desmoe.data.record_segments.

    A (prompt, response) pair trains on the response only; a text trains on all of it. A math
    text is two trained segments, question and answer, so its last segment is the reference
    answer a generation metric compares with (the tokens trained on are the same).
    """
    marker = _ANSWER_AFTER.get(name)
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
