"""`echoic synth --domain shifted`: a second corpus whose sentences and voices the demo's
never has, planned as deterministically as the first, which stays as it was."""

import functools
import hashlib
import json

import pytest
from conftest import needs_synth

from echoic.cli import main
from echoic.data.manifest import read_manifest
from echoic.data.synth.corpus import lm_text, plan_corpus, plan_hotword_test
from echoic.data.synth.text_source import english_sentences, sentences, shifted_english_sentences
from echoic.data.synth.voices import (
    ENGLISH_VOICES,
    SHIFTED_ENGLISH_VOICES,
    check_voices,
    voices_for,
)
from echoic.errors import EchoicError

STRETCH = 5  # words in a row no shifted sentence may share with a demo sentence


@functools.cache
def _shifted(num_utts: int = 600, seed: int = 0) -> tuple:
    return tuple(plan_corpus("en", num_utts, seed, SHIFTED_ENGLISH_VOICES, domain="shifted"))


@functools.cache
def _demo_stretches() -> tuple[set[str], str]:
    """Every 5-word stretch of the demo pool, and the pool as one text (for sentences
    shorter than 5 words): written out plainly, not with overlap.py, so that the test
    checks the rule itself."""
    found = set()
    for sentence in english_sentences():
        words = sentence.split()
        found |= {" ".join(words[i : i + STRETCH]) for i in range(len(words) - STRETCH + 1)}
    return found, "".join(f" {s} \n" for s in english_sentences())


def _repeats_the_demo(sentence: str) -> bool:
    stretches, text = _demo_stretches()
    words = sentence.split()
    if len(words) < STRETCH:
        return f" {sentence} " in text
    return any(" ".join(words[i : i + STRETCH]) in stretches for i in range(len(words) - 4))


def test_shifted_plan_has_no_demo_voice_and_no_demo_sentence():
    plans = _shifted()
    demo_voices = {v.id for v in ENGLISH_VOICES}
    assert not {p.voice.id for p in plans} & demo_voices
    assert {p.voice.engine for p in plans} == {"espeak"}
    # Not even the demo's variants (the timbre) on another accent.
    demo_variants = {v.name.split("+")[1] for v in ENGLISH_VOICES if v.engine == "espeak"}
    assert not {v.name.split("+")[1] for v in SHIFTED_ENGLISH_VOICES} & demo_variants
    pool = shifted_english_sentences()
    assert len(pool) > 4000
    assert not set(pool) & set(english_sentences())
    repeats = [s for s in pool if _repeats_the_demo(s)]
    assert not repeats, repeats[:3]
    assert {p.text for p in plans} <= set(pool)


def test_shifted_plan_has_its_own_splits_and_test_only_voices():
    plans = _shifted()
    texts = {s: {p.text for p in plans if p.split == s} for s in ("train", "dev", "test")}
    assert not texts["train"] & (texts["dev"] | texts["test"])
    assert not texts["dev"] & texts["test"]
    sizes = {s: sum(p.split == s for p in plans) for s in ("train", "dev", "test", "test_open")}
    assert sizes == {"train": 540, "dev": 30, "test": 30, "test_open": 15}
    test_only = {v.id for v in SHIFTED_ENGLISH_VOICES if v.test_only}
    heard = {s: {p.voice.id for p in plans if p.split == s} for s in ("train", "dev", "test")}
    assert test_only and test_only & heard["test"]
    assert not test_only & (heard["train"] | heard["dev"])
    # Ids of their own, so that the two corpora's manifests can be mixed.
    assert all(p.id.startswith(f"en-shifted-{p.split}-") for p in plans)
    held_out = {p.text for p in plans if p.split != "train"}
    text = lm_text(plans, "en", set(), domain="shifted")
    assert not held_out & set(text) and len(text) > 3000
    assert set(text) <= set(shifted_english_sentences())


def test_shifted_plan_is_deterministic():
    assert list(_shifted()) == plan_corpus("en", 600, 0, SHIFTED_ENGLISH_VOICES, domain="shifted")
    other = _shifted(seed=1)
    assert [p.text for p in other] != [p.text for p in _shifted()]


# sha256 of the plan below, computed with the code before domains existed: the default
# (demo) corpus's sentences, voices, prosody, hotwords and LM text must not move.
DEMO_PLAN_DIGEST = "5b0ad7a7a4c5b5009eeabeb8ddd9aa15261599d92342b47ea88a59fb8e4a1933"


def test_demo_plan_is_unchanged_by_domains():
    plans = plan_corpus("en", 300, seed=5, voices=ENGLISH_VOICES)
    extra, hotwords, distractors = plan_hotword_test(plans, "en", 5, ENGLISH_VOICES, 10)
    lines = [
        f"{p.id}|{p.split}|{p.text}|{p.voice.id}|{p.voice.test_only}|{p.rate}|{p.pitch}|{p.peak}"
        for p in [*plans, *extra]
    ]
    lines += hotwords + distractors + lm_text(plans, "en", set(hotwords + distractors))
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == DEMO_PLAN_DIGEST
    assert plans == plan_corpus("en", 300, seed=5, voices=ENGLISH_VOICES, domain="demo")


def test_unknown_or_unsupported_domain_is_a_one_line_error():
    allowed = r"\(allowed: demo, shifted\)"
    with pytest.raises(EchoicError, match=rf"^unknown corpus domain 'news' {allowed}$"):
        sentences("en", "news")
    with pytest.raises(EchoicError, match=r"^the shifted domain is English only$"):
        voices_for("zh", "shifted")
    with pytest.raises(EchoicError, match="unknown corpus language"):
        plan_corpus("fr", 10, 0, SHIFTED_ENGLISH_VOICES, domain="shifted")


@needs_synth
def test_every_shifted_voice_is_really_distinct_from_each_other_and_the_demo():
    assert check_voices(SHIFTED_ENGLISH_VOICES, "en") == list(SHIFTED_ENGLISH_VOICES)
    espeak_demo = [v for v in ENGLISH_VOICES if v.engine == "espeak"]
    both = [*espeak_demo, *SHIFTED_ENGLISH_VOICES]
    assert check_voices(both, "en") == both


@needs_synth
def test_synth_cli_writes_a_shifted_corpus(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--num-utts", "8", "--jobs", "1", "--no-progress"]
    assert main([*args, "--domain", "shifted"]) == 0
    assert "train 6" in capsys.readouterr().out
    summary = json.loads((tmp_path / "corpus.json").read_text())
    assert summary["domain"] == "shifted" and summary["dropped_voices"] == []
    assert summary["test_only_voices"] == [v.id for v in SHIFTED_ENGLISH_VOICES if v.test_only]
    demo_voices = {v.id for v in ENGLISH_VOICES}
    for split in ("train", "dev", "test", "test_open"):
        for utt in read_manifest(tmp_path / f"{split}.jsonl").utterances:
            assert utt.id.startswith(f"en-shifted-{split}-") and utt.speaker not in demo_voices
            assert utt.duration > 0.5
    assert (tmp_path / "lm_text.txt").is_file()
