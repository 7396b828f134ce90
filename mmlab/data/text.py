"""Real text for perplexity that exists on every machine offline.

``offline_corpus()``: docstrings of a fixed list of Python standard-library modules (and
their public classes and functions), in a fixed order: real English technical prose,
identical on every machine with the same Python minor version.
``wikitext2()``: WikiText-2 (raw, test split) through ``datasets`` when online.
"""

from __future__ import annotations

import importlib
import inspect
import sys

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip",
    "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "math", "multiprocessing", "numbers", "operator", "os", "pathlib", "pickle", "platform",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "time", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def offline_corpus(max_chars: int | None = None) -> str:
    """Standard-library docstrings joined by blank lines (about 300 kB of text)."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from a trimmed Python build: skip it, order stays fixed
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d and len(d) > 80:
                    parts.append(d)
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars else text


def corpus_id() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-docstrings"


def wikitext2(split: str = "test") -> str:
    """WikiText-2 raw text (needs ``datasets`` and a connection to the dataset hub)."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("wikitext2() needs the `datasets` package (pip install datasets) and a network "
                           "connection; offline, use mmlab.data.offline_corpus()") from e
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(ds["text"])
