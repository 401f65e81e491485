"""Shared fixtures: a small synthesized corpus and helpers that write audio files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echoic.data.synth.corpus import synthesize_corpus

HAVE_SYNTHESIZERS = shutil.which("espeak-ng") is not None and shutil.which("festival") is not None
needs_synth = pytest.mark.skipif(
    not HAVE_SYNTHESIZERS, reason="espeak-ng/festival missing: run `make setup`"
)


def write_sine(
    path: Path,
    *,
    freq: float = 440.0,
    rate: int = 16000,
    seconds: float = 1.0,
    channels: int = 1,
    **kw,
) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(path, data, rate, **kw)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A 40-utterance English corpus (train 36, dev 2, test 2), made once per test session."""
    if not HAVE_SYNTHESIZERS:
        pytest.skip("espeak-ng/festival missing: run `make setup`")
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, num_utts=40, seed=1, jobs=2, progress=False)
    return out


@pytest.fixture(scope="session")
def lang(corpus, tmp_path_factory) -> Path:
    """Char tokenizer and CMVN statistics of the session corpus (`echoic prepare`)."""
    from echoic.data.prepare import prepare

    out = tmp_path_factory.mktemp("lang")
    prepare(corpus / "train.jsonl", out, tokenizer="char", jobs=1, progress=False)
    return out
