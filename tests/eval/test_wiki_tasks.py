"""The offline zero-shot tasks: how items are built, that they are deterministic, and that they
never come from calibration text."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from sparsekit.eval import wiki_tasks
from sparsekit.eval.wiki_tasks import Article, continuation_items, lambada_item, split_sentences
from sparsekit.hf.data import corpus_texts


@pytest.fixture(scope="module")
def articles():
    return wiki_tasks.held_out_articles()


@pytest.fixture(scope="module")
def items(articles):
    return {"lambada": wiki_tasks.lambada_items(articles), "continuation": continuation_items(articles)}


@pytest.fixture(scope="module")
def calibration_text():
    return "\n".join(corpus_texts("wiki-offline", "calib"))


def test_split_sentences_keeps_initials_and_abbreviations_inside():
    text = "The U.S. Army was led by Gen. Grant.  It won in 1865! Then St. Louis grew. (It did.)"
    assert split_sentences(text) == [
        "The U.S. Army was led by Gen. Grant.",
        "It won in 1865!",
        "Then St. Louis grew.",
        "(It did.)",
    ]


def _article(*sentences):
    return Article("Synthetic", tuple(sentences))


def test_lambada_item_takes_the_longest_cut_whose_last_word_occurs_before():
    filler = "word " * 20
    art = _article(
        f"Paris is a city with {filler}near Paris.",  # qualifies (Paris occurs before)
        "It has a river called the Seine.",  # Seine does not occur before
        "Tourists love the city.",  # 'city' occurs before: the longest qualifying cut
    )
    item = lambada_item(art)
    assert item["target"] == " city"
    assert item["context"].endswith("Tourists love the")
    assert "Seine." in item["context"]


def test_lambada_item_rejects_function_words_short_passages_and_unseen_words():
    filler = "word " * 30
    assert lambada_item(_article(f"The {filler} went to the")) is None  # no sentence end
    assert lambada_item(_article(f"This is about {filler} and about.")) is None  # 'about' is a function word
    assert lambada_item(_article("Paris is near Paris.")) is None  # under LAMBADA_MIN_WORDS
    assert lambada_item(_article(f"Rome is {filler} far from Milan.")) is None  # Milan unseen


def test_items_come_from_held_out_articles_only(articles, items, calibration_text):
    held_out = {a.title for a in articles}
    calib_titles = {t for t, _ in wiki_tasks._wiki_offline_docs()} - held_out
    for kind, rows in items.items():
        assert rows, kind
        assert {r["title"] for r in rows} <= held_out
        assert not {r["title"] for r in rows} & calib_titles
        for row in rows:
            assert row["context"][:80] not in calibration_text, (kind, row["title"])
    for row in items["continuation"]:
        for ending in row["endings"]:
            assert ending not in calibration_text


def test_lambada_items(items):
    rows = items["lambada"]
    assert 200 <= len(rows) <= 1000
    for row in rows:
        word = row["target"][1:]
        assert row["target"].startswith(" ") and word.isalpha() and len(word) >= 3
        assert re.search(rf"\b{re.escape(word)}\b", row["context"], flags=re.IGNORECASE)
        assert len(row["context"].split()) + 1 <= wiki_tasks.LAMBADA_MAX_WORDS


def test_continuation_items(articles, items):
    by_title = {a.title: a for a in articles}
    rows = items["continuation"]
    assert 200 <= len(rows) <= 1000
    labels = [row["label"] for row in rows]
    assert set(labels) == {0, 1, 2, 3}
    assert max(labels.count(k) for k in range(4)) < 0.35 * len(rows)  # answer positions spread
    for row in rows:
        article = by_title[row["title"]]
        k = len(split_sentences(row["context"]))
        assert " ".join(article.sentences[:k]) == row["context"]
        assert row["endings"][row["label"]] == article.sentences[k]  # the true next sentence
        assert len(set(row["endings"])) == 4
        for i, ending in enumerate(row["endings"]):
            if i != row["label"]:
                assert ending not in article.sentences  # distractors come from other articles


_DIGEST = (
    "import hashlib, json; from sparsekit.eval import wiki_tasks as w; "
    "a = w.held_out_articles(); "
    "print(hashlib.sha256(json.dumps([w.lambada_items(a), w.continuation_items(a)]).encode()).hexdigest())"
)


def test_items_are_deterministic_across_processes(items):
    here = hashlib.sha256(json.dumps([items["lambada"], items["continuation"]]).encode()).hexdigest()
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here
