"""Fixtures shared by the real-model tests: held-out evaluation ids, calibration ids, dense ppl."""

import pytest

import sparsekit
from sparsekit.hf.data import calibration_ids, evaluation_ids

SEQLEN = 256


@pytest.fixture(scope="session")
def eval_ids(smollm2):
    return evaluation_ids(smollm2[1], "wiki-offline", max_tokens=4 * SEQLEN)


@pytest.fixture(scope="session")
def calib(smollm2):
    return calibration_ids(smollm2[1], "wiki-offline", nsamples=8, seqlen=SEQLEN, seed=0)


@pytest.fixture(scope="session")
def dense_ppl(smollm2, eval_ids):
    return sparsekit.perplexity(smollm2[0], eval_ids, seqlen=SEQLEN).ppl
