import filecmp
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_synth

from echoic.cli import main
from echoic.data.manifest import read_manifest
from echoic.data.synth.corpus import lm_text, plan_corpus, plan_hotword_test, synthesize_corpus
from echoic.data.synth.text_source import english_sentence, english_sentences, mandarin_sentences
from echoic.data.synth.voices import ENGLISH_VOICES, MANDARIN_VOICES, check_voices
from echoic.errors import EchoicError


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


@needs_synth
def test_same_seed_gives_byte_identical_corpus_whatever_the_jobs(tmp_path):
    synthesize_corpus(tmp_path / "a", num_utts=30, seed=7, jobs=2, progress=False)
    synthesize_corpus(tmp_path / "b", num_utts=30, seed=7, jobs=1, progress=False)
    assert _same_tree(tmp_path / "a", tmp_path / "b")
    synthesize_corpus(tmp_path / "c", num_utts=30, seed=8, jobs=2, progress=False)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (
        tmp_path / "c" / "train.jsonl"
    ).read_bytes()


@needs_synth
def test_corpus_audio_and_manifests(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["splits"]["train"]["utterances"] == 36
    for split in ("train", "dev", "test"):
        manifest = read_manifest(corpus / f"{split}.jsonl")
        assert len(manifest) == summary["splits"][split]["utterances"]
        for utt in manifest.utterances:
            info = sf.info(utt.audio)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert utt.duration == pytest.approx(info.frames / 16000)
            assert utt.lang == "en" and utt.speaker
        # Paths are stored relative to the corpus folder, so it can be moved.
        first = json.loads((corpus / f"{split}.jsonl").read_text().splitlines()[0])
        assert first["audio"].startswith(f"wav/{split}/")


def test_plan_splits_are_disjoint_in_text_and_test_has_unseen_voices():
    plans = plan_corpus("en", 2000, seed=0, voices=ENGLISH_VOICES)
    texts = {s: {p.text for p in plans if p.split == s} for s in ("train", "dev", "test")}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["dev"]
    assert not texts["dev"] & texts["test"]
    voices = {s: {p.voice.id for p in plans if p.split == s} for s in ("train", "dev", "test")}
    test_only = {v.id for v in ENGLISH_VOICES if v.test_only}
    assert test_only and test_only <= voices["test"]
    assert not test_only & (voices["train"] | voices["dev"])
    assert Counter(p.split for p in plans) == {"train": 1800, "dev": 100, "test": 100}
    engines = Counter(p.voice.engine for p in plans if p.split == "train")
    assert engines["festival"] > 300 and engines["espeak"] > 1000  # both synthesizers used


def test_english_train_split_has_real_varied_text():
    plans = plan_corpus("en", 2000, seed=0, voices=ENGLISH_VOICES)
    train = [p.text for p in plans if p.split == "train"]
    assert len({w for t in train for w in t.split()}) >= 2000
    for text in train:
        assert re.fullmatch(r"[a-z]+(?:'[a-z]+)?(?: [a-z]+(?:'[a-z]+)?)*", text), text
        assert 3 <= len(text.split()) <= 20
    rates = {p.rate for p in plans if p.voice.engine == "espeak"}
    pitches = {p.pitch for p in plans if p.voice.engine == "espeak"}
    assert len(rates) > 20 and len(pitches) > 20  # speaking rate and pitch vary


def test_sentence_filter_and_normalisation():
    assert english_sentence("Mr. Smith paid $25 for 3 apples in 1984!") == (
        "mister smith paid twenty five dollars for three apples in nineteen eighty four"
    )
    assert english_sentence("Don't panic.") is None  # two words: too short
    assert english_sentence("The IBM computer is here today.") is None  # acronym
    assert english_sentence("Visit http://example.com now please") is None  # URL
    assert english_sentence('He said "hello to me') is None  # quotation fragment
    assert len(english_sentences()) > 5000
    zh = mandarin_sentences()
    assert len(zh) > 5000 and all(4 <= len(s) <= 30 for s in zh)


def test_plan_rejects_impossible_sizes():
    with pytest.raises(EchoicError, match="at least 3"):
        plan_corpus("en", 2, seed=0, voices=ENGLISH_VOICES)
    with pytest.raises(EchoicError, match="unknown corpus language"):
        plan_corpus("fr", 10, seed=0, voices=ENGLISH_VOICES)


@needs_synth
def test_every_configured_voice_is_really_distinct():
    assert check_voices(ENGLISH_VOICES, "en") == list(ENGLISH_VOICES)
    assert check_voices(MANDARIN_VOICES, "zh") == list(MANDARIN_VOICES)


@needs_synth
def test_a_voice_name_espeak_ignores_is_dropped(caplog):
    from echoic.data.synth.voices import Voice

    voices = [Voice("espeak", "en-us+m1"), Voice("espeak", "en-us+NoSuchVariant")]
    assert check_voices(voices, "en") == voices[:1]
    assert "NoSuchVariant dropped" in caplog.text


@needs_synth
def test_mandarin_corpus(tmp_path):
    summary = synthesize_corpus(tmp_path, lang="zh", num_utts=12, seed=0, jobs=2, progress=False)
    assert summary["splits"]["train"]["distinct_chars"] > 20
    manifest = read_manifest(tmp_path / "train.jsonl")
    for utt in manifest.utterances:
        assert all("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in utt.text)
        assert utt.speaker.startswith("espeak:cmn-latn-pinyin")
        assert utt.duration > 0.5


@needs_synth
def test_noise_is_added_at_the_requested_snr(tmp_path, monkeypatch):
    # Only train utterances, so clean and noisy corpora hold the same speech.
    synthesize_corpus(tmp_path / "clean", num_utts=6, seed=2, jobs=1, progress=False)
    synthesize_corpus(
        tmp_path / "noisy", num_utts=6, seed=2, jobs=1, progress=False, noise_snr=10.0
    )
    for clean_path in sorted((tmp_path / "clean" / "wav" / "train").glob("*.wav")):
        clean, _ = sf.read(clean_path)
        noisy, _ = sf.read(tmp_path / "noisy" / "wav" / "train" / clean_path.name)
        noise = noisy - clean
        snr = 10 * np.log10(np.mean(clean**2) / np.mean(noise**2))
        assert snr == pytest.approx(10.0, abs=0.3)


@needs_synth
def test_synth_cli_reports_what_it_wrote_with_a_progress_bar(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--num-utts", "8", "--jobs", "2"]) == 0
    captured = capsys.readouterr()
    assert "train 6" in captured.out and "distinct words" in captured.out
    assert "lm_text.txt: " in captured.out and (tmp_path / "lm_text.txt").is_file()
    assert "synth en: 100%" in captured.err  # the tqdm bar
    assert (tmp_path / "test.jsonl").is_file()


def test_held_out_sentences_use_the_training_vocabulary():
    plans = plan_corpus("en", 2000, seed=0, voices=ENGLISH_VOICES)
    train = {w for p in plans if p.split == "train" for w in p.text.split()}
    for split in ("dev", "test"):
        words = [w for p in plans if p.split == split for w in p.text.split()]
        assert sum(w not in train for w in words) == 0, split


def test_lm_text_is_train_plus_unspoken_sentences_never_held_out_ones():
    plans = plan_corpus("en", 2000, seed=0, voices=ENGLISH_VOICES)
    extra, hotwords, distractors = plan_hotword_test(plans, "en", 0, ENGLISH_VOICES, 50)
    plans = [*plans, *extra]
    text = lm_text(plans, "en", excluded_words=set(hotwords + distractors))
    train = [p.text for p in plans if p.split == "train"]
    assert text[: len(train)] == train
    held_out = {p.text for p in plans if p.split != "train"}
    assert held_out and not held_out & set(text)
    assert not {w for s in text for w in s.split()} & set(hotwords + distractors)
    assert len(text) > 2 * len(train)  # the pool's unspoken sentences as text-only data
