"""Real text for perplexity that exists on every machine offline.

``offline_corpus()``: docstrings of a fixed list of Python standard-library modules (and
their public classes and functions), in a fixed order: real English technical prose,
identical on every machine with the same Python minor version.
``reference_corpus()``: the Python language reference's topics as pydoc ships them (technical
prose of another kind than docstrings), part of the mixed calibration set.
``calibration_windows(tokenizer, n, length, data)``: the weight quantizers' calibration windows.
``prose_corpus()``: the distinct license texts Debian ships in every install (base-files'
``/usr/share/common-licenses``): natural English prose of another domain than the docstrings,
never used for calibration (the out-of-domain perplexity text).
``wikitext2()``: WikiText-2 (raw, test split) through ``datasets`` when online.
``needle(tokenizer, ...)``: long-context retrieval prompts built from the offline corpus
(a pass code hidden at a chosen depth of a chosen number of filler tokens).
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
from dataclasses import dataclass

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


LICENSES = "/usr/share/common-licenses"
PROSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "CC0-1.0", "Artistic", "BSD")  # one per license family


def prose_corpus() -> str:
    """The license texts of ``PROSE_FILES`` joined by blank lines (about 100 kB, ~22k SmolLM2 tokens)."""
    from pathlib import Path

    root = Path(LICENSES)
    missing = [f for f in PROSE_FILES if not (root / f).is_file()]
    if missing:
        raise RuntimeError(f"prose_corpus() reads Debian's license texts in {LICENSES} (package base-files); "
                           f"missing here: {', '.join(missing)}. Pass another text, e.g. mmlab.data.wikitext2()")
    return "\n\n".join((root / f).read_text(encoding="utf-8", errors="replace").strip() for f in PROSE_FILES)


def reference_corpus() -> str:
    """``pydoc_data.topics`` joined in key order (about 470 kB, ~110k SmolLM2 tokens)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def calibration_windows(tokenizer, n: int, length: int, data: str = "mixed") -> list:
    """``n`` windows of ``length`` token ids (1-D tensors) for calibration, never from the text
    perplexity is measured on. ``docstrings``: consecutive windows from the end of the offline corpus
    (perplexity reads its start). ``mixed``: windows at random offsets (seed 0, as GPTQ draws C4),
    alternating between the second half of the offline corpus and the language reference.
    ``prose``: random windows of the license prose's second half - a diagnostic of calibrating in
    the domain of the out-of-domain evaluation text (which reads the prose's start)."""
    import torch

    def ids(text):
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]

    if data == "docstrings":
        toks = ids(offline_corpus())
        if len(toks) < n * length:
            raise ValueError(f"the offline corpus has {len(toks)} tokens, fewer than {n} x {length} calibration "
                             f"tokens; lower calib_samples or calib_len")
        tail = toks[len(toks) - n * length:]
        return [tail[i * length:(i + 1) * length] for i in range(n)]
    if data == "mixed":
        doc = ids(offline_corpus())
        sources = [doc[len(doc) // 2:], ids(reference_corpus())]
    elif data == "prose":  # a diagnostic only: in the domain of the out-of-domain text (never its start)
        prose = ids(prose_corpus())
        sources = [prose[len(prose) // 2:]]
    else:
        raise ValueError(f"calib_data must be mixed, docstrings or prose, got {data!r}")
    short = [len(src) for src in sources if len(src) <= length]
    if short:
        raise ValueError(f"calib_len {length} is longer than a calibration source ({min(short)} tokens)")
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        start = int(torch.randint(0, len(src) - length, (1,), generator=g))
        out.append(src[start:start + length])
    return out


def prose_id() -> str:
    return "debian-common-licenses:" + "+".join(PROSE_FILES)


def wikitext2(split: str = "test") -> str:
    """WikiText-2 raw text (needs ``datasets`` and a connection to the dataset hub)."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("wikitext2() needs the `datasets` package (pip install datasets) and a network "
                           "connection; offline, use mmlab.data.offline_corpus()") from e
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(ds["text"])


@dataclass
class TextQA:
    """A long context and a question about it; correct when the answer appears in the reply."""

    context: str
    question: str
    answer: str
    qtype: str
    uid: str = ""
    match: str = "contains"
    query_after: bool = True  # the question is fed after the context's KV is compressed
    max_new_tokens: int | None = None  # the answer's length limit (None: the model's default)

    def __repr__(self) -> str:
        return f"TextQA({self.uid!r}, {len(self.context)} chars, {self.question!r} -> {self.answer!r})"


def needle(tokenizer, lengths=(512, 1024), depths=(0.1, 0.5, 0.9), per_cell: int = 2, seed: int = 0,
           query_after: bool = True, max_new_tokens: int | None = 16) -> list[TextQA]:
    """Pass-code retrieval: ``per_cell`` prompts for every (length, depth). Each context is
    ``length`` tokens of the offline corpus (a random stretch) with "The secret pass code is
    NNNNN." inserted at relative ``depth``; the question asks for the code. ``qtype`` is
    ``L{length}-d{depth}``. Answers stop after ``max_new_tokens``: SmolLM2's full reply "The secret
    pass code is NNNNN." is 12 tokens, and on the kv_cache sweep's 18 prompts x 41 settings a limit
    of 16 gave the same accuracy as 32 in every setting while decoding 35% fewer tokens."""
    if any(not 0 <= d <= 1 for d in depths) or any(n < 16 for n in lengths) or per_cell < 1:
        raise ValueError(f"depths must be in [0, 1], lengths >= 16 tokens and per_cell >= 1; "
                         f"got depths={depths}, lengths={lengths}, per_cell={per_cell}")
    ids = tokenizer(offline_corpus(), add_special_tokens=False).input_ids
    out = []
    for length in lengths:
        for depth in depths:
            for k in range(per_cell):
                rng = random.Random(f"{seed}-{length}-{depth}-{k}")
                start = rng.randrange(0, len(ids) - length)
                filler = tokenizer.decode(ids[start:start + length])
                cut = filler.rfind(" ", 0, int(len(filler) * depth)) if depth > 0 else 0
                cut = max(cut, 0)
                code = str(rng.randrange(10000, 100000))
                context = f"{filler[:cut]} The secret pass code is {code}. {filler[cut:]}"
                out.append(TextQA(context, "What is the secret pass code? Answer with the number only.", code,
                                  f"L{length}-d{depth}", f"needle-{seed}-{length}-{depth}-{k}",
                                  query_after=query_after, max_new_tokens=max_new_tokens))
    return out
