"""Built-in sample domains, made offline from text that ships with Python and Debian.

None of the text is written by desmoe: ``code`` is CPython standard-library source,
``law`` is licence text (CPython's LICENSE.txt and Debian's /usr/share/common-licenses),
``math`` is generated arithmetic whose answers are computed exactly. Every corpus is a
deterministic function of the machine's Python installation (and the seed for ``math``).
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


def code_examples() -> list[str]:
    """Top-level functions and classes of a fixed list of standard-library modules, in source order."""
    out = []
    for rel in _CODE_MODULES:
        path = os.path.join(_stdlib(), rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for node in ast.parse(source).body:
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


BUILTIN_DOMAINS = {
    "math": math_examples,
    "code": code_examples,
    "law": law_examples,
}


def builtin_examples(name: str) -> list[str]:
    return BUILTIN_DOMAINS[name]()
