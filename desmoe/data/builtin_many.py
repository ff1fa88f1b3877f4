"""The seams of the many built-in domains: sub-domains of the built-in corpora, cut along natural seams.

Each sub-domain ``<parent>_<seam>`` takes the part of one parent corpus (desmoe.data.builtin) that has
some of the parent's own labels (``Seam.keys``):

    translation_<lang>    one target language of the CLDR names (Babel locale code)
    code_<module>         one standard-library module of the code corpus, cut finer: every function and
                          method (not nested in a function), >= 80 characters, in source order (the
                          parent's top-level units alone are too few per module)
    law_<family>          the paragraphs of one licence family's files
    math_<kind>           one kind of the generated problems (the parent's 4000, filtered)
    intent_<intent>       one intent of the generated utterances (the parent's 3000, filtered)
    summary_<module>      the summary pairs of one standard-library module

A sub-domain holds each example once (the parents repeat some: a held-out example must not also be a
training row), and law_* leave out the paragraphs that another family's files share (the GPL preamble
in the LGPL texts, ...), so no example is in two sub-domains. It has its parent's record shape and task
metrics. It is a deterministic function of the
installed packages. ``MANY_DOMAINS`` lists them in a fixed order that interleaves the parents, so that
every prefix of length >= 6 spans all six parents and every shorter one as many as its length.

Seams left out for having fewer than ``MIN_EXAMPLES`` distinct examples on CPython 3.11: intent_weather
(24: 3 templates x 8 cities) and intent_set_timer (21); code_json (23 units),
code_fractions (34), code_random (32) and the other small code modules; summary_shutil (26), summary_os
(27), summary_functools (28), summary_subprocess (28), summary_urllib (26) and the other small summary
modules; law_apache (22 paragraphs) and law_python (CPython's LICENSE.txt, 34), joined instead with the
Artistic, BSD and CC0 texts as law_permissive. ``general`` (the forgetting holdout) is not cut.

Imports nothing of desmoe: desmoe.data.builtin, the bottom layer of desmoe.data, imports this.
"""

from __future__ import annotations

import typing

MIN_EXAMPLES = 40
"""Every sub-domain has at least this many examples here (data.eval_sequences' 8 rows are at most a fifth)."""
MIN_USABLE = 10
"""Fewer examples than this (another Python, missing files): builtin raises ValueError naming the sources."""


class Seam(typing.NamedTuple):
    parent: str
    keys: tuple[str, ...]
    """The parent's labels it takes: locale codes, stdlib files, licence files, problem kinds, intents."""
    source: str
    """Where it comes from, one line (the README's table)."""


_LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
              "sv": "Swedish", "pl": "Polish", "cs": "Czech", "fi": "Finnish"}
_CODE = ("argparse", "ipaddress", "configparser", "calendar", "statistics", "difflib", "pprint")
_LAW = {"gpl": ("GPL-1", "GPL-2", "GPL-3"), "mpl": ("MPL-1.1", "MPL-2.0"), "lgpl": ("LGPL-2", "LGPL-2.1", "LGPL-3"),
        "gfdl": ("GFDL-1.2", "GFDL-1.3"), "permissive": ("LICENSE.txt", "Apache-2.0", "Artistic", "BSD", "CC0-1.0")}
_MATH = {"addition": "a + b with 3-digit operands", "multiplication": "a times b with 2-digit operands",
         "word": "one-step word problems (has a, buys b more)", "subtraction": "a - b with 3-digit operands, a >= b"}
_INTENTS = ("book_table", "order_food")
_SUMMARY = {"tarfile": "tarfile.py", "logging": "logging/__init__.py", "datetime": "datetime.py",
            "decimal": "_pydecimal.py", "inspect": "inspect.py", "pathlib": "pathlib.py",
            "collections": "collections/__init__.py", "threading": "threading.py", "typing": "typing.py"}

SEAMS: dict[str, Seam] = {
    **{f"translation_{c}": Seam("translation", (c,), f"CLDR names of countries, languages and months, English -> "
                                f"{lang} (Babel locale `{c}`)") for c, lang in _LANGUAGES.items()},
    **{f"code_{m}": Seam("code", (f"{m}.py",), f"functions and methods of CPython's `{m}` module (stdlib "
                         f"`{m}.py`)") for m in _CODE},
    **{f"law_{fam}": Seam("law", files, "paragraphs of " + ", ".join(
        "CPython's LICENSE.txt (PSF)" if f == "LICENSE.txt" else f"`common-licenses/{f}`" for f in files))
       for fam, files in _LAW.items()},
    **{f"math_{k}": Seam("math", (k,), f"generated arithmetic, {what}, answer computed exactly")
       for k, what in _MATH.items()},
    **{f"intent_{i}": Seam("intent", (i,), f"template utterances of the `{i}` intent -> their JSON")
       for i in _INTENTS},
    **{f"summary_{m}": Seam("summary", (rel,), f"functions of stdlib `{rel}` -> the first line of their "
                            "docstring") for m, rel in _SUMMARY.items()},
}
"""Every sub-domain: name -> its seam."""

PARENT_SOURCES = {
    "math": "arithmetic and word problems generated by desmoe/data/builtin.py, answers computed exactly",
    "code": "top-level functions and classes of 22 CPython standard-library modules",
    "law": "paragraphs of CPython's LICENSE.txt and Debian's /usr/share/common-licenses/*",
    "summary": "standard-library functions (23 modules, disjoint from code's) -> the first line of their docstring",
    "translation": "CLDR names of countries, languages and months, English -> 10 languages (Babel)",
    "intent": "template utterances -> their intent as JSON",
    "general": "paragraphs of the Python documentation topics shipped with CPython (pydoc_data.topics)",
}
"""The parent corpora's one-line sources."""

MANY_DOMAINS: tuple[str, ...] = (
    "translation_de", "code_argparse", "math_addition", "law_gpl", "intent_book_table", "summary_tarfile",
    "translation_fr", "code_ipaddress", "math_multiplication", "law_mpl", "intent_order_food", "summary_logging",
    "translation_es", "code_configparser", "math_word", "law_lgpl", "summary_datetime",
    "translation_it", "code_calendar", "math_subtraction", "law_gfdl", "summary_decimal",
    "translation_nl", "code_statistics", "law_permissive", "summary_inspect",
    "translation_pt", "code_difflib", "summary_pathlib",
    "translation_sv", "code_pprint", "summary_collections",
    "translation_pl", "summary_threading",
    "translation_cs", "summary_typing",
    "translation_fi",
)
"""All 37 sub-domains in a fixed order: round-robin over the parents translation, code, math, law, intent,
summary (each in its own order above) until each runs out. A prefix of length n spans min(n, 6) parents
(2 -> translation, code; 4 -> + math, law; 8, 16, 32 -> all six). The scaling experiment takes prefixes."""


def check_size(name: str, examples: list, what: str) -> list:
    """``examples`` of sub-domain ``name``, or ValueError when too few are left to train and hold out."""
    if len(examples) < MIN_USABLE:
        raise ValueError(f"built-in domain {name!r} has {len(examples)} examples here (from {what}), fewer than "
                         f"{MIN_USABLE}: too few to train on and hold out an eval split. It needs "
                         f"{', '.join(SEAMS[name].keys)} as shipped with CPython 3.11 / Debian / Babel.")
    return examples
