"""Calibration data for one-shot pruning, and held-out text for fidelity checks.

Specs (``--calib``):

* ``text:builtin`` -- English text shipped with Python (``pydoc_data.topics``), split into a
  calibration part and held-out sentences that calibration never sees.
* ``text:varied`` / ``text:broad`` -- the built-in text plus standard-library (and numpy's, torch's, sympy's,
  networkx's) docstrings.
* ``text:wiki`` / ``text:news`` -- gensim's Wikipedia sample and Lee news corpus (real English prose);
  ``text:mixed`` -- ``text:broad``, ``text:wiki`` and ``text:news`` together.
* ``text:heldout`` / ``text:other`` -- evaluation text: the held-out topics; scikit-learn's dataset descriptions.
* ``text:PATH`` -- a UTF-8 text file.
* ``hf-dataset:NAME[:CONFIG[:SPLIT]]`` -- a Hugging Face dataset's ``text`` column (needs the
  ``datasets`` package and access to the data).
* ``images:DIR`` -- image files under DIR (any depth), for vision models.
* ``digits`` / ``mnist5k`` -- the built-in real digits, for vision models.

Text becomes ``samples`` windows of ``seq_len`` tokens at seeded random offsets of the tokenised
corpus (as SparseGPT and Wanda sample C4).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CalibrationError",
    "builtin_text",
    "heldout_text",
    "token_ids",
    "heldout_data",
    "split_sentences",
    "load_texts",
    "token_windows",
    "sentence_batches",
    "sentence_training_batches",
    "image_batches",
    "build_calibration",
    "load_tokenizer",
    "check_vocabulary",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


class CalibrationError(ValueError):
    """A calibration source is missing, empty or does not fit the model."""


def _builtin_split() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    calibration, held_out = [], []
    for index, key in enumerate(sorted(topics)):
        (held_out if index % 4 == 3 else calibration).append(topics[key])
    return calibration, held_out


def builtin_text() -> tuple[str, list[str]]:
    """(calibration text, held-out sentences) from ``pydoc_data.topics``, split by topic.

    Every fourth topic (in sorted order) is held out; its sentences are never calibration data (the
    sentences the topics share, e.g. boilerplate, are left out of the held-out ones).
    """
    calibration, held_out = _builtin_split()
    text = "\n".join(calibration)
    seen = set(split_sentences(text))
    return text, [s for part in held_out for s in split_sentences(part) if s not in seen]


def heldout_text() -> str:
    """The held-out topics of ``pydoc_data.topics`` as running text (never calibration data)."""
    return "\n".join(_builtin_split()[1])


def split_sentences(text: str, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of ``text`` (split after . ! ?) that start with a capital and have a sensible length."""
    pieces = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in pieces if min_chars <= len(p) <= max_chars and p[0].isupper()]


def other_text() -> str:
    """Real English of another kind than the built-in Python documentation: the dataset descriptions
    that ship with scikit-learn (``sklearn/datasets/descr/*.rst``, about 47 KB). Never calibration or
    training data of the built-in specs: the held-out text of a different source (``text:other``).

    Raises:
        CalibrationError: scikit-learn is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("text:other is the dataset descriptions shipped with scikit-learn: "
                               "pip install scikit-learn (or give text:PATH)")
    descr = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "descr"
    files = sorted(descr.glob("*.rst"))
    if not files:
        raise CalibrationError(f"text:other: no dataset descriptions under {descr}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


# text:varied: the built-in calibration text plus the docstrings of these standard-library modules, chosen
# for prose about many subjects (numbers, dates, files, networks, mail, concurrency, statistics); none of
# it is pydoc_data.topics' held-out part or scikit-learn's dataset descriptions (text:other)
VARIED_MODULES = ("argparse", "asyncio", "calendar", "collections", "csv", "datetime", "decimal", "difflib",
                  "email.message", "fractions", "functools", "gzip", "heapq", "http.client", "itertools", "json",
                  "logging", "mailbox", "pathlib", "random", "shutil", "sqlite3", "statistics", "string",
                  "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.parse", "zipfile")


@functools.lru_cache(maxsize=1)  # a run reads its calibration text up to three times (windows, recovery, report)
def varied_text() -> str:
    """The built-in calibration text and the docstrings of :data:`VARIED_MODULES` (the module's and its
    public classes' and functions', in sorted order): the same on every install of a Python version."""
    import importlib
    import inspect

    docs = [builtin_text()[0]]
    for name in VARIED_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(a for a in dir(module) if not a.startswith("_")):
            obj = getattr(module, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


# text:broad: text:varied plus the docstrings of the scientific packages every nmsparse install has
# (numpy and torch, and sympy and networkx, which torch requires): reference prose about arrays, tensors,
# statistics, algebra and graphs, with the numbers, tables and examples such text carries. None of it is
# pydoc_data.topics' held-out part or scikit-learn's (text:other; no 8-word run in common, tested).
BROAD_MODULES = ("numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma", "torch", "torch.nn",
                 "torch.nn.functional", "torch.linalg", "torch.distributions", "sympy", "networkx")
BROAD_MIN_CHARS = 200  # docstrings this short or shorter are mostly one-line signatures


@functools.lru_cache(maxsize=1)  # as varied_text's: one read per process
def broad_text() -> str:
    """:func:`varied_text` and the docstrings of :data:`BROAD_MODULES`: each module's, then those of its
    public callables (classes, functions, builtins) in sorted order, each distinct docstring of more than
    :data:`BROAD_MIN_CHARS` characters once. It follows the installed versions of those packages (the
    report records the text's size). The docstrings are read in a fresh interpreter: packages imported
    beside them rewrite some (SciPy appends notes to NumPy functions' docstrings), and the text must not
    depend on what the calling process imported before.

    Raises:
        CalibrationError: one of the packages is not installed.
    """
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BROAD_SCRIPT, str(BROAD_MIN_CHARS), *BROAD_MODULES],
                         capture_output=True)
    if run.returncode != 0:
        error = (run.stderr.decode(errors="replace").strip().splitlines() or ["no error output"])[-1]
        name, _, why = error.partition(": ")
        if run.returncode == 3:
            raise CalibrationError(f"text:broad reads the docstrings of {name}, which does not import ({why}); "
                                   f"pip install {name.split('.')[0]} or use text:varied")
        raise CalibrationError(f"text:broad: reading the package docstrings failed: {error}")
    return varied_text() + "\n\n" + run.stdout.decode()


# broad_text's reader, run as `python -c _BROAD_SCRIPT MIN_CHARS MODULE...`: prints the docstrings joined
# by blank lines; a module that does not import: "MODULE: error" on stderr, exit status 3
_BROAD_SCRIPT = """
import importlib, inspect, sys
least, docs, seen = int(sys.argv[1]), [], set()
for name in sys.argv[2:]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        sys.stderr.write(f"{name}: {exc}\\n")
        sys.exit(3)
    docs.append(inspect.getdoc(module) or "")
    for attr in sorted(a for a in dir(module) if not a.startswith("_")):
        obj = getattr(module, attr, None)
        doc = (inspect.getdoc(obj) or "") if callable(obj) else ""
        if len(doc) > least and doc not in seen:
            seen.add(doc)
            docs.append(doc)
sys.stdout.buffer.write("\\n\\n".join(d for d in docs if d).encode())
"""


# text:wiki and text:news: real English prose of other kinds than Python's and the packages' documentation,
# shipped inside gensim's wheel as its test corpora: a sample of English Wikipedia (the first articles of a
# 2010s dump, "Anarchism" to "Autism"; gensim strips the wiki markup) and the Lee corpus of Australian news
# stories. Neither has an 8-word run in common with text:other or text:heldout (tested).
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


def _gensim_file(spec: str, name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as exc:
        raise CalibrationError(f"{spec} is a corpus shipped with gensim, which does not import ({exc}); "
                               "pip install 'nmsparse[text]' (or give text:PATH)") from None
    path = Path(datapath(name))
    if not path.is_file():
        raise CalibrationError(f"{spec}: gensim's corpus {name} is missing from this install ({path})")
    return path


@functools.lru_cache(maxsize=1)  # as varied_text's: one read per process
def wiki_text() -> str:
    """The articles of the Wikipedia sample shipped with gensim (redirect pages left out) as plain text,
    the markup removed by gensim's ``filter_wiki``: 106 articles, about 3.1 million characters."""
    import bz2

    path = _gensim_file("text:wiki", WIKI_FILE)  # first: it names a missing gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path) as stream:
        articles = [filter_wiki(text).strip() for _, text, _ in extract_pages(stream)
                    if not text.lstrip().lower().startswith("#redirect")]
    return "\n\n".join(a for a in articles if a)


def news_text() -> str:
    """The Lee corpus of news stories shipped with gensim (300 stories, about 360,000 characters)."""
    return _gensim_file("text:news", NEWS_FILE).read_text(encoding="utf-8", errors="replace")


def mixed_text() -> str:
    """``text:mixed``: :func:`broad_text`, :func:`wiki_text` and :func:`news_text` together (about 8.7 million
    characters): documentation, encyclopedia and news prose, the most varied built-in text."""
    return "\n\n".join((broad_text(), wiki_text(), news_text()))


# the built-in texts by the name after ``text:``
NAMED_TEXTS = {"builtin": lambda: builtin_text()[0], "varied": varied_text, "broad": broad_text, "wiki": wiki_text,
               "news": news_text, "mixed": mixed_text, "heldout": heldout_text, "other": other_text}


def load_texts(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind == "text" and rest in NAMED_TEXTS:
        return NAMED_TEXTS[rest]()
    if kind == "text":
        path = Path(rest)
        if not path.is_file():
            names = ", ".join(f"text:{name}" for name in NAMED_TEXTS)
            raise CalibrationError(f"calibration text file {rest!r} does not exist (use {names} or text:PATH)")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CalibrationError(f"calibration text file {rest!r} is empty")
        return text
    if kind == "hf-dataset":
        try:
            import datasets
        except ImportError as exc:
            raise CalibrationError("hf-dataset: needs the 'datasets' package (pip install datasets)") from exc
        name, _, tail = rest.partition(":")
        config, _, split = tail.partition(":")
        data = datasets.load_dataset(name, config or None, split=split or "train")
        if "text" not in data.column_names:
            raise CalibrationError(f"dataset {name!r} has no 'text' column (columns: {data.column_names})")
        return "\n".join(data["text"][:20000])
    raise CalibrationError(f"unknown text calibration source {spec!r}; expected text:builtin, text:PATH or "
                           "hf-dataset:NAME[:CONFIG[:SPLIT]]")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the model directory ``path``.

    Raises:
        CalibrationError: the directory has no usable tokenizer files (transformers then builds an
            empty tokenizer that turns any text into no tokens, so this is checked here).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if len(tokenizer.get_vocab()) < 2:
        raise CalibrationError(f"{path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): text "
                               "cannot be tokenized for this model; copy the model's tokenizer files into it")
    return tokenizer


_CORPUS_IDS: dict[tuple, list[int]] = {}  # the last corpus tokenised, by (tokenizer's directory, vocabulary, text)


def _corpus_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text``; a run draws its calibration and its recovery windows from the same corpus
    (``text:mixed``: 2.4 M tokens, 7.6 s to tokenise for SmolLM2), so the last one is kept (read only)."""
    directory = str(getattr(tokenizer, "name_or_path", "") or "")
    if not directory:  # a tokenizer built in memory: nothing names it, so nothing is kept
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    key = (directory, type(tokenizer).__name__, len(tokenizer), text)
    if key not in _CORPUS_IDS:
        _CORPUS_IDS.clear()
        _CORPUS_IDS[key] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _CORPUS_IDS[key]


def token_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0,
                  batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """``samples`` windows of ``seq_len`` tokens (special tokens included) in batches of ``batch_size``."""
    ids = _corpus_ids(tokenizer, text)
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    inner = seq_len - (cls_id is not None) - (sep_id is not None)
    if inner < 1 or len(ids) <= inner:
        raise CalibrationError(f"calibration text has {len(ids)} tokens: too few for windows of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - inner, (samples,), generator=gen).tolist()
    rows = []
    for start in starts:
        row = ids[start : start + inner]
        rows.append(([cls_id] if cls_id is not None else []) + row + ([sep_id] if sep_id is not None else []))
    batches = []
    for i in range(0, len(rows), batch_size):
        input_ids = torch.tensor(rows[i : i + batch_size])
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    return batches


def sentence_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128):
    """Padded batches of whole sentences (for embeddings)."""
    return [dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


def sentence_training_batches(tokenizer, text: str, batch_size: int = 32, max_length: int = 128,
                              seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The sentences of ``text`` in padded batches of similar length (little padding), seeded random order.

    Raises:
        CalibrationError: if ``text`` has no usable sentence.
    """
    sentences = split_sentences(text, 20, 400)
    if not sentences:
        raise CalibrationError("the training text has no sentences of 20-400 characters")
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    ordered = [sentences[i] for i in sorted(range(len(sentences)), key=lambda i: (lengths[i], i))]
    batches = sentence_batches(tokenizer, ordered, batch_size, max_length)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def image_batches(spec: str, input_size: tuple[int, int, int], samples: int, batch_size: int = 16,
                  seed: int = 0) -> list[torch.Tensor]:
    """Calibration images resized to the model's ``(C, H, W)``, normalised, in batches."""
    chans, height, width = input_size
    if spec in ("digits", "mnist5k"):
        from ..datasets import DatasetError, builtin_images

        try:
            raw, _, mean, std = builtin_images(spec)
        except DatasetError as exc:
            raise CalibrationError(str(exc)) from None
        order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed))[:samples]
        images = (raw[order] / 255.0 - mean[0]) / std[0]  # [N, 1, h, w], normalised
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
        images = images.expand(-1, chans, -1, -1).contiguous()
    elif spec.startswith("images:"):
        from PIL import Image

        root = Path(spec[7:])
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
        if not files:
            raise CalibrationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(files), generator=gen)[:samples].tolist()
        mean = torch.tensor([0.485, 0.456, 0.406][:chans] or [0.5]).view(-1, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225][:chans] or [0.25]).view(-1, 1, 1)
        tensors = []
        for i in order:
            image = Image.open(files[i]).convert("RGB" if chans == 3 else "L").resize((width, height))
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().reshape(height, width, -1)
            tensors.append((x.permute(2, 0, 1) / 255.0 - mean) / std)
        images = torch.stack(tensors)
    else:
        raise CalibrationError(f"unknown image calibration source {spec!r}; expected images:DIR, digits or mnist5k")
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def build_calibration(spec: str, model: Any, source: Any, samples: int, seq_len: int, seed: int = 0) -> list[Any]:
    """Calibration batches that ``model`` (built from ``source``) accepts."""
    if source.is_text:
        if not spec.startswith(("text:", "hf-dataset:")):
            raise CalibrationError(
                f"{source.source} is a text model: use --calib text:builtin, text:PATH or hf-dataset:..."
            )
        tokenizer = load_tokenizer(source.hf_dir)
        batches = token_windows(tokenizer, load_texts(spec), samples, seq_len, seed)
        check_vocabulary(model, max(int(b["input_ids"].max()) for b in batches), source.hf_dir)
        return batches
    if spec.startswith(("text:", "hf-dataset:")):
        raise CalibrationError(f"{source.source} is a vision model: use --calib digits, mnist5k or images:DIR")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, height, width = cfg.get("input_size", (3, 224, 224))
    chans = source.options.get("in_chans", chans)
    return image_batches(spec, (chans, height, width), samples, seed=seed)


def check_vocabulary(model: Any, max_id: int, path: str) -> None:
    """The text's token ids must exist in the model's embedding table (else: an IndexError deep in it)."""
    getter = getattr(model, "get_input_embeddings", None)
    table = getter() if callable(getter) else None
    rows = getattr(table, "num_embeddings", None)
    if rows is not None and max_id >= rows:
        raise CalibrationError(f"the tokenizer in {path} gives token id {max_id}, but the model embeds only {rows} "
                               "tokens: the tokenizer files do not belong to this model")


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """``[N]`` token ids of ``text`` (no special tokens but a leading BOS where the tokenizer has one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def heldout_data(model: Any, source: Any, kind: str, spec: str | None = None, max_tokens: int = 4096,
                 samples: int = 64, seed: int = 0) -> Any:
    """Held-out data for the fidelity measure of a model ``kind`` (see :mod:`nmsparse.oneshot.fidelity`).

    Args:
        kind: ``causal_lm`` -> ``[N]`` token ids (``max_tokens``) of ``spec`` (default: the built-in
            held-out text, ``text:heldout``); ``encoder`` -> padded batches of the sentences of ``spec``
            (default: the built-in held-out sentences; at most ``8 * samples``);
            ``classifier`` -> ``samples`` images of ``spec`` (default ``digits``) drawn with another seed
            than calibration's.
    """
    if kind == "causal_lm":
        ids = token_ids(load_tokenizer(source.hf_dir), load_texts(spec or "text:heldout"), max_tokens)
        check_vocabulary(model, int(ids.max()) if ids.numel() else 0, source.hf_dir)
        return ids
    if kind == "encoder":  # the built-in held-out sentences, or the sentences of the text spec given
        sentences = builtin_text()[1] if spec in (None, "text:heldout") else split_sentences(load_texts(spec))
        if not sentences:
            raise CalibrationError(f"held-out text {spec!r} has no sentences of 40-300 characters")
        return sentence_batches(load_tokenizer(source.hf_dir), sentences[:samples * 8])
    spec = spec if spec and not spec.startswith(("text:", "hf-dataset:")) else "digits"
    return build_calibration(spec, model, source, samples, 0, seed + 7919)
