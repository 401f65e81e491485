import filecmp
import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_synth

from echoic.cli import main
from echoic.data.manifest import read_manifest
from echoic.data.synth import corpus
from echoic.data.synth.corpus import (
    lm_text,
    plan_corpus,
    plan_hotword_test,
    split_sizes,
    synthesize_corpus,
)
from echoic.data.synth.overlap import OverlapIndex, StretchIndex
from echoic.data.synth.text_source import english_sentence, english_sentences, mandarin_sentences
from echoic.data.synth.voices import ENGLISH_VOICES, MANDARIN_VOICES, check_voices
from echoic.data.workers import WorkerError
from echoic.errors import EchoicError


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


@needs_synth
def test_a_synthesizer_worker_that_dies_is_a_one_line_error_not_a_hang(tmp_path, monkeypatch):
    # multiprocessing.Pool waits forever for the result of a worker the kernel killed
    # (out of memory); fork_map names the worker and how it stopped.
    def killed(job):
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(corpus, "_synthesize_chunk", killed)
    monkeypatch.setattr(corpus, "check_voices", lambda voices, lang: list(voices))
    with pytest.raises(WorkerError, match=r"synth.*SIGKILL"):
        synthesize_corpus(tmp_path, num_utts=30, seed=0, jobs=2, progress=False)


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
    assert summary["splits"]["test_open"]["utterances"] == 1
    for split in ("train", "dev", "test", "test_open"):
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
    assert Counter(p.split for p in plans) == {
        "train": 1800,
        "dev": 100,
        "test": 100,
        "test_open": 50,
    }
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
    assert "words train never has: dev " in captured.out and "test_open " in captured.out
    assert "synth en: 100%" in captured.err  # the tqdm bar
    assert (tmp_path / "test.jsonl").is_file() and (tmp_path / "test_open.jsonl").is_file()


def test_held_out_sentences_use_the_training_vocabulary():
    plans = _plans(2000)
    train = {w for p in plans if p.split == "train" for w in p.text.split()}
    for split in ("dev", "test"):
        words = [w for p in plans if p.split == split for w in p.text.split()]
        assert sum(w not in train for w in words) == 0, split


def test_lm_text_is_train_plus_unspoken_sentences_never_held_out_ones():
    plans, text, hotwords, distractors = _with_hotwords_and_lm_text(2000)
    train = [p.text for p in plans if p.split == "train"]
    assert text[: len(train)] == train
    held_out = {p.text for p in plans if p.split != "train"}
    assert held_out and not held_out & set(text)
    assert not {w for s in text for w in s.split()} & set(hotwords + distractors)
    assert len(text) > 2 * len(train)  # the pool's unspoken sentences as text-only data


# -- held-out honesty: near-duplicates, lengths, the open-vocabulary split --------------

STRETCH = 5  # words in a row that no held-out sentence may share with train or lm_text


@functools.cache
def _plans(num_utts: int, seed: int = 0) -> tuple:
    return tuple(plan_corpus("en", num_utts, seed=seed, voices=ENGLISH_VOICES))


@functools.cache
def _with_hotwords_and_lm_text(num_utts: int) -> tuple:
    plans = list(_plans(num_utts))
    extra, hotwords, distractors = plan_hotword_test(plans, "en", 0, ENGLISH_VOICES, 50)
    plans = [*plans, *extra]
    text = lm_text(plans, "en", excluded_words=set(hotwords + distractors))
    return plans, text, hotwords, distractors


def _shares_a_stretch(sentence: str, references: list[str], n: int = STRETCH) -> bool:
    """Written out plainly (not with overlap.py) so the test checks the rule itself:
    `sentence` shares n words in a row with a reference, or (if shorter) lies inside one."""
    words = sentence.split()
    size = min(n, len(words))
    wanted = {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
    text = "".join(f" {reference} \n" for reference in references)
    return any(f" {stretch} " in text for stretch in wanted)


def test_near_duplicate_rule_on_small_examples():
    train = ["your good nature will bring unbounded happiness", "and then there are bugs again"]
    index = OverlapIndex(train, "en")
    assert index.repeats("your good nature will bring you unbounded happiness")  # 5 words
    assert index.repeats("then there are bugs")  # shorter than 5 and inside a train sentence
    assert index.repeats("and then there are bugs again")  # an exact repeat
    assert not index.repeats("your good nature will surely bring unbounded happiness")
    assert not index.repeats("there are bugs and then")  # 3 words in a row only
    kept_out = StretchIndex(["then there are bugs", "a b c d e f g"], "en")
    assert kept_out.contains("and then there are bugs again")  # holds a whole short one
    assert kept_out.contains("x b c d e f y")
    assert not kept_out.contains("b c d e x f g")
    zh = OverlapIndex(["床前明月光疑是地上霜"], "zh")  # Mandarin: characters, not words
    assert zh.repeats("举头床前明月光") and not zh.repeats("举头望明月光")


def test_held_out_splits_share_no_stretch_with_train():
    plans, _, _, _ = _with_hotwords_and_lm_text(2000)
    train = sorted({p.text for p in plans if p.split == "train"})
    for split in ("dev", "test", "test_open", "hotword_test"):
        held_out = sorted({p.text for p in plans if p.split == split})
        assert held_out
        repeats = [s for s in held_out if _shares_a_stretch(s, train)]
        assert not repeats, (split, repeats[:3])


def test_lm_text_holds_no_stretch_of_a_held_out_sentence():
    plans, text, _, _ = _with_hotwords_and_lm_text(2000)
    train = {p.text for p in plans if p.split == "train"}
    text_only = [s for s in text if s not in train]
    assert len(text_only) > 10000
    for split in ("dev", "test", "test_open", "hotword_test"):
        held_out = sorted({p.text for p in plans if p.split == split})
        repeats = [s for s in held_out if _shares_a_stretch(s, text_only)]
        assert not repeats, (split, repeats[:3])


def test_held_out_sentences_are_as_long_as_train_ones():
    # Choosing dev and test by train's vocabulary alone favoured short sentences (a
    # long one more often has an unseen word): dev 8.0 and test 8.7 words against
    # train's 10.2 here.
    plans = _plans(2000)
    lengths = {
        split: [len(p.text.split()) for p in plans if p.split == split]
        for split in ("train", "dev", "test", "test_open")
    }
    train = np.mean(lengths["train"])
    for split in ("dev", "test", "test_open"):
        assert abs(np.mean(lengths[split]) - train) < 0.2, split
    # Each length gets its share of train's: within one sentence (rounding) per split.
    share = Counter(lengths["train"])
    for split in ("dev", "test"):
        got = Counter(lengths[split])
        for n, count in share.items():
            assert abs(got[n] - count * 100 / 1800) <= 1, (split, n)


def test_open_test_split_is_drawn_without_the_vocabulary_rule():
    plans = _plans(2000)
    texts = {s: {p.text for p in plans if p.split == s} for s in ("train", "dev", "test")}
    open_texts = [p.text for p in plans if p.split == "test_open"]
    assert len(open_texts) == len(set(open_texts)) == 50
    assert not set(open_texts) & (texts["train"] | texts["dev"] | texts["test"])
    train_words = {w for t in texts["train"] for w in t.split()}
    words = [w for t in open_texts for w in t.split()]
    unseen = sum(w not in train_words for w in words) / len(words)
    assert unseen > 0.05  # about what a random draw of the pool gives
    voices = {p.voice.id for p in plans if p.split == "test_open"}
    assert voices & {v.id for v in ENGLISH_VOICES if v.test_only}  # test's voice mix


def test_split_sizes_put_test_open_on_top_of_num_utts():
    assert split_sizes(13000, 0.05, 0.05) == {
        "train": 11700,
        "dev": 650,
        "test": 650,
        "test_open": 325,
    }
    assert split_sizes(6, 0.05, 0.05)["test_open"] == 1


_PLAN_DIGEST = """
import hashlib
from echoic.data.synth.corpus import lm_text, plan_corpus
from echoic.data.synth.voices import ENGLISH_VOICES
plans = plan_corpus("en", 600, seed=3, voices=ENGLISH_VOICES)
text = [repr(p) for p in plans] + lm_text(plans, "en", set())
print(hashlib.sha256("\\n".join(text).encode()).hexdigest())
"""


@pytest.mark.slow
def test_plan_is_the_same_whatever_the_string_hash_seed():
    # Sets decide membership only, never order: another process (another machine)
    # with another PYTHONHASHSEED plans the same corpus and the same LM text.
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", _PLAN_DIGEST], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1
    other = plan_corpus("en", 600, seed=4, voices=ENGLISH_VOICES)
    plans = plan_corpus("en", 600, seed=3, voices=ENGLISH_VOICES)
    assert plans == plan_corpus("en", 600, seed=3, voices=ENGLISH_VOICES)
    assert [p.text for p in other] != [p.text for p in plans]


def test_a_stuck_synthesizer_is_killed_and_named():
    import time

    from echoic.data.synth.voices import _run

    start = time.monotonic()
    with pytest.raises(EchoicError, match=r"^espeak-ng \(x\) did not finish within 0 s; killed$"):
        _run(["sleep", "30"], "espeak-ng (x)", 0.2)
    assert time.monotonic() - start < 5
