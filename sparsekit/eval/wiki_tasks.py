"""Offline zero-shot tasks built from the held-out articles of the shipped Wikipedia corpus.

Both tasks read only the evaluation split of ``wiki-offline`` (the 1-in-10 articles that
calibration never sees, see ``sparsekit.hf.data``), in corpus order, and are deterministic: the
same corpus gives the same items in the same order on every machine.

``wiki_lambada`` (LAMBADA-style last-word prediction): an article is cut after a sentence whose
final word (alphabetic, >= 3 letters, not a function word) already occurs earlier in the passage,
as LAMBADA kept passages whose last word is recoverable from context. The longest such cut within
``LAMBADA_MAX_WORDS`` words is used; the context is the passage up to that word, the target is
``" " + word`` (the sentence's closing punctuation is dropped). One item per article.

``wiki_continuation`` (HellaSwag-style, 4-way): the context is the article's first sentences
(at most ``CONTINUATION_MAX_CONTEXT_WORDS`` words), the true ending is the next sentence, and the
three distractors are non-first sentences of other held-out articles whose word counts are
closest to the true ending's (ties broken by a seeded shuffle). The answer position is drawn from
a generator seeded by the article's title.

The task YAMLs beside this file (``sparsekit/eval/tasks``) load these items through
``custom_dataset``; ``python -m sparsekit.eval.wiki_tasks`` prints counts and a sample.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache

from sparsekit.hf.data import DEFAULT_CORPUS, _is_eval_doc, _wiki_offline_docs

LAMBADA_MIN_WORDS = 25
LAMBADA_MAX_WORDS = 90
CONTINUATION_MAX_CONTEXT_WORDS = 60
CONTINUATION_ENDING_WORDS = (6, 45)
CHOICES = 4

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREVIATION = re.compile(
    r"(?:\b[A-Z]|\b(?:St|Mr|Mrs|Ms|Dr|Jr|Sr|No|vs|Inc|Co|Ltd|Mt|Gen|Col|Lt|Sgt|Rev|Prof|ca|c|approx|etc|e\.g|i\.e))\.$"
)
_FINAL_WORD = re.compile(r"\s([A-Za-z]+)[.!?]$")
_FUNCTION_WORDS = frozenset(
    """the and for are but not you all any can had her was one our out his has him how its may new now
    old see two who did get let say she too use that with have this will your from they been were said
    each which their there what about would make like into than then them these some could other more
    very after first also only when where while most such many over under between during""".split()
)


@dataclass(frozen=True)
class Article:
    title: str
    sentences: tuple[str, ...]


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after . ! ? before a capital, digit or quote; initials and
    common abbreviations (``U.S.``, ``St.``) do not end a sentence."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(" ".join(text.split())):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return [s for s in sentences if s]


def held_out_articles(docs: Iterable[tuple[str, str]] | None = None) -> list[Article]:
    """The evaluation split of the offline corpus as sentence lists, in corpus (title) order."""
    docs = _wiki_offline_docs() if docs is None else docs
    return [
        Article(title, tuple(split_sentences(text))) for title, text in docs if text and _is_eval_doc(title)
    ]


def _words(text: str) -> int:
    return len(text.split())


def lambada_item(article: Article) -> dict | None:
    """The longest qualifying cut of ``article`` as {'title', 'context', 'target'}, or None."""
    best = None
    for end in range(1, len(article.sentences) + 1):
        passage = " ".join(article.sentences[:end])
        if _words(passage) > LAMBADA_MAX_WORDS:
            break
        match = _FINAL_WORD.search(passage)
        if _words(passage) < LAMBADA_MIN_WORDS or match is None:
            continue
        word = match.group(1)
        context = passage[: match.start(1)].rstrip()
        if len(word) < 3 or word.lower() in _FUNCTION_WORDS:
            continue
        if re.search(rf"\b{re.escape(word)}\b", context, flags=re.IGNORECASE) is None:
            continue
        best = {"title": article.title, "context": context, "target": " " + word}
    return best


def lambada_items(articles: list[Article] | None = None) -> list[dict]:
    """wiki_lambada items: one per held-out article that has a qualifying cut."""
    articles = held_out_articles() if articles is None else articles
    return [item for item in map(lambada_item, articles) if item is not None]


def _continuation_split(article: Article) -> tuple[str, str] | None:
    """(context, true ending) of ``article`` or None when it is too short or the ending too long."""
    lo, hi = CONTINUATION_ENDING_WORDS
    best = None
    for k in range(1, len(article.sentences)):
        context = " ".join(article.sentences[:k])
        if _words(context) > CONTINUATION_MAX_CONTEXT_WORDS:
            break
        ending = article.sentences[k]
        if lo <= _words(ending) <= hi:
            best = (context, ending)
    return best


def _distractor_pool(articles: list[Article]) -> list[tuple[int, str, str]]:
    """(word count, title, sentence) of every non-first sentence, sorted by length then title."""
    lo, hi = CONTINUATION_ENDING_WORDS
    pool = [(_words(s), a.title, s) for a in articles for s in a.sentences[1:] if lo <= _words(s) <= hi]
    return sorted(pool)


def _seed(title: str) -> int:
    return zlib.crc32(title.encode("utf-8"))


def continuation_items(articles: list[Article] | None = None) -> list[dict]:
    """wiki_continuation items: {'title', 'context', 'endings' (4), 'label'} per usable article."""
    articles = held_out_articles() if articles is None else articles
    pool = _distractor_pool(articles)
    items = []
    for article in articles:
        split = _continuation_split(article)
        if split is None:
            continue
        context, ending = split
        rng = random.Random(_seed(article.title))
        length = _words(ending)
        others = [p for p in pool if p[1] != article.title and p[2] != ending]
        rng.shuffle(others)  # ties in length are broken by the seeded order (sort is stable)
        others.sort(key=lambda p: abs(p[0] - length))
        distractors = []
        for _, title, sentence in others:
            if all(title != t for t, _ in distractors):  # three different articles
                distractors.append((title, sentence))
            if len(distractors) == CHOICES - 1:
                break
        endings = [s for _, s in distractors]
        label = rng.randrange(CHOICES)
        endings.insert(label, ending)
        items.append({"title": article.title, "context": context, "endings": endings, "label": label})
    return items


@cache
def _cached(task: str) -> tuple[dict, ...]:
    articles = held_out_articles()
    build = {"wiki_lambada": lambada_items, "wiki_continuation": continuation_items}[task]
    return tuple(build(articles))


def _as_dataset(items: Iterable[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(items))})


def wiki_lambada_dataset(**_: object):
    """lm-eval ``custom_dataset`` hook: the wiki_lambada items as DatasetDict({'test': ...})."""
    return _as_dataset(_cached("wiki_lambada"))


def wiki_continuation_dataset(**_: object):
    """lm-eval ``custom_dataset`` hook: the wiki_continuation items as DatasetDict({'test': ...})."""
    return _as_dataset(_cached("wiki_continuation"))


def _sample(items: list[dict]) -> Iterator[str]:
    for item in items[:2]:
        yield "  " + repr(item)[:400]


if __name__ == "__main__":
    lam, cont = lambada_items(), continuation_items()
    print(f"{DEFAULT_CORPUS}: {len(held_out_articles())} held-out articles")
    print(f"wiki_lambada: {len(lam)} items", *_sample(lam), sep="\n")
    print(f"wiki_continuation: {len(cont)} items", *_sample(cont), sep="\n")
