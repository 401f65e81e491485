"""`echoic synth`: a deterministic speech corpus from real sentences and two synthesizers.

The corpus is planned first, as a pure function of (language, size, seed): which
sentence, voice, speaking rate, pitch and level each utterance gets. Sentences are
split before anything else, so no held-out sentence (dev, test, test_open) occurs in
train or repeats 5 words in a row of a train sentence, and some voices are reserved
for the test splits. Synthesis then runs in parallel; every utterance's audio depends
only on its own plan, so the corpus is byte-identical whatever `jobs` is.

`domain` "shifted" plans a second English corpus the same way from other sentences and
voices (text_source.py and voices.py list them), for fine-tuning experiments.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from echoic.data.audio import resample
from echoic.data.augment import colored_noise, mix_at_snr
from echoic.data.manifest import Utterance, write_manifest
from echoic.data.synth.degraded import write_degraded_tests
from echoic.data.synth.overlap import NEAR_DUPLICATE_UNITS, OverlapIndex, StretchIndex, units
from echoic.data.synth.text_source import sentences
from echoic.data.synth.voices import Voice, check_voices, espeak_audio, festival_audio, voices_for
from echoic.data.workers import fork_map
from echoic.errors import EchoicError
from echoic.seeding import make_rng

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
OPEN_SPLIT = "test_open"  # test sentences drawn without the training-vocabulary rule
OPEN_TEST_FRACTION = 0.025  # of --num-utts, on top of them: 325 at 13,000
HOTWORD_SPLIT = "hotword_test"  # written only with --hotword-test
HOTWORD_MIN_LETTERS = 5  # hotwords are names and terms, not short function words
FESTIVAL_SHARE = 0.3  # of English utterances: festival's voices are few but natural
TEST_ONLY_SHARE = 0.35  # of test utterances spoken by voices never heard in train
ESPEAK_RATE = (135, 195)  # words per minute
ESPEAK_PITCH = (25, 75)  # espeak's 0-99 pitch scale
FESTIVAL_STRETCH = (0.85, 1.2)  # duration stretch (>1 is slower)
FESTIVAL_PITCH = (0.9, 1.1)  # pitch and formant factor, applied by resampling
PEAK_LEVEL = (0.25, 0.95)  # peak amplitude, so levels vary like real recordings
FESTIVAL_CHUNK = 24  # utterances per festival process (the voice loads once per process)
ESPEAK_CHUNK = 16


@dataclass(frozen=True)
class PlannedUtterance:
    id: str
    split: str
    text: str
    voice: Voice
    rate: float  # espeak: words per minute; festival: duration stretch
    pitch: float  # espeak: 0-99 pitch; festival: pitch factor
    peak: float  # peak amplitude of the clean speech


def split_sizes(
    num_utts: int,
    dev_fraction: float,
    test_fraction: float,
    open_fraction: float = OPEN_TEST_FRACTION,
) -> dict[str, int]:
    """Utterances per split. Train, dev and test share `num_utts`; test_open comes on
    top, so that adding it left the other splits as they were."""
    if num_utts < 3:
        raise EchoicError("--num-utts must be at least 3 (one utterance per split)")
    test = max(1, round(num_utts * test_fraction))
    dev = max(1, round(num_utts * dev_fraction))
    if test + dev >= num_utts:
        raise EchoicError("dev and test fractions leave no training utterances")
    test_open = max(1, round(num_utts * open_fraction))
    return {"train": num_utts - dev - test, "dev": dev, "test": test, OPEN_SPLIT: test_open}


def plan_corpus(
    lang: str,
    num_utts: int,
    seed: int,
    voices: Sequence[Voice],
    *,
    domain: str = "demo",
    dev_fraction: float = 0.05,
    test_fraction: float = 0.05,
    open_fraction: float = OPEN_TEST_FRACTION,
) -> list[PlannedUtterance]:
    """Every utterance's sentence, voice and prosody. Pure: no audio is made here."""
    pool = sentences(lang, domain)
    tag = corpus_tag(lang, domain)
    sizes = split_sizes(num_utts, dev_fraction, test_fraction, open_fraction)
    order = make_rng(seed, tag, "sentences").permutation(len(pool))
    held_out = sizes["test"] + sizes["dev"] + sizes[OPEN_SPLIT]
    if held_out >= len(pool):
        raise EchoicError(f"only {len(pool)} sentences available: ask for fewer utterances")
    # Train takes its sentences first (repeating them, with other voices, only when asked
    # for more utterances than exist). Held-out splits then take unused sentences that
    # repeat no 5-word stretch of train (overlap.py says why).
    train_count = min(sizes["train"], len(pool) - held_out)
    train_ids = [int(i) for i in order[:train_count]]
    seen = OverlapIndex((pool[i] for i in train_ids), lang)
    rest = [int(i) for i in order[train_count:] if not seen.repeats(pool[int(i)])]
    length = {i: len(units(pool[i], lang)) for i in (*train_ids, *rest)}
    train_lengths = Counter(length[i] for i in train_ids)
    # Dev and test prefer sentences with the fewest words train never has, none when the
    # pool allows: like read-speech test sets, they measure recognition of the training
    # vocabulary (unseen words are what test_open and --hotword-test are for). Long
    # sentences more often have an unseen word, so that preference alone made dev and
    # test shorter than train (9.5 against 10.3 words at 13,000 utterances): each
    # sentence length gets its share of train's, and takes its best-covered sentences.
    vocabulary = {u for i in train_ids for u in units(pool[i], lang)}
    unseen = {i: sum(u not in vocabulary for u in units(pool[i], lang)) for i in rest}
    ranked = sorted(rest, key=lambda i: unseen[i])  # stable: ties keep the random order
    closed = _match_lengths(ranked, length, train_lengths, sizes["test"] + sizes["dev"])
    test_ids, dev_ids = _deal(closed, length, sizes["test"], sizes["dev"])
    # test_open: the same kind of sentences drawn at random, unseen words and all, so
    # that its WER beside test's shows what the vocabulary rule hides.
    taken = set(closed)
    open_ids = _match_lengths(
        [i for i in rest if i not in taken], length, train_lengths, sizes[OPEN_SPLIT]
    )
    sentence_ids = {"train": train_ids, "test": test_ids, "dev": dev_ids, OPEN_SPLIT: open_ids}
    plans = []
    for split in (*SPLITS, OPEN_SPLIT):
        ids = sentence_ids[split]
        if not ids:
            raise EchoicError(
                f"no sentence left for {split} that repeats no {NEAR_DUPLICATE_UNITS}-unit "
                "stretch of train: ask for fewer utterances"
            )
        if len(ids) < sizes[split]:
            log.warning(
                "%s: %d sentences for %d utterances, some repeat with other voices",
                split,
                len(ids),
                sizes[split],
            )
        for number in range(sizes[split]):
            text = pool[ids[number % len(ids)]]
            plans.append(
                _plan_utterance(f"{tag}-{split}-{number:06d}", split, text, voices, seed, tag)
            )
    return plans


def corpus_tag(lang: str, domain: str) -> str:
    """What utterance ids start with and random draws are keyed by: the language alone
    for the demo domain (as before domains existed, so its corpus stays byte-identical),
    "en-shifted" for the shifted one, so that its ids never collide with the demo's."""
    return lang if domain == "demo" else f"{lang}-{domain}"


def _match_lengths(
    ranked: Sequence[int], length: dict[int, int], reference: Counter[int], count: int
) -> list[int]:
    """`count` of the `ranked` sentences (best first) whose lengths follow the
    `reference` histogram: each length gets its share (largest remainders round), filled
    with its best-ranked sentences; a length that runs out is made up with the best
    sentences left of any length. Returned in rank order."""
    total = sum(reference.values())
    shares = {n: count * c / total for n, c in sorted(reference.items())}
    quota = {n: int(share) for n, share in shares.items()}
    by_remainder = sorted(shares, key=lambda n: (-(shares[n] - quota[n]), n))
    for n in by_remainder[: count - sum(quota.values())]:
        quota[n] += 1
    chosen: set[int] = set()
    for i in ranked:
        if quota.get(length[i], 0) > 0:
            quota[length[i]] -= 1
            chosen.add(i)
    for i in ranked:
        if len(chosen) >= count:
            break
        chosen.add(i)
    return [i for i in ranked if i in chosen]


def _deal(
    ranked: Sequence[int], length: dict[int, int], first: int, second: int
) -> tuple[list[int], list[int]]:
    """Split `ranked` sentences into two sets of sizes in proportion `first`:`second`,
    dealt in order of (length, rank) so that both get the same lengths and quality."""
    by_length = sorted(range(len(ranked)), key=lambda k: (length[ranked[k]], k))
    to_first: set[int] = set()
    for position, k in enumerate(by_length):
        # Bresenham: the first set gets this item when its share's floor steps up.
        if (position + 1) * first // (first + second) > position * first // (first + second):
            to_first.add(ranked[k])
    return [i for i in ranked if i in to_first], [i for i in ranked if i not in to_first]


def _plan_utterance(
    utt_id: str, split: str, text: str, voices: Sequence[Voice], seed: int, tag: str
) -> PlannedUtterance:
    """Voice, rate, pitch and level of one utterance, from (seed, utterance id)."""
    rng = make_rng(seed, tag, "voice", utt_id)
    test_voices = [v for v in voices if v.test_only]
    # test_open has test's voices, so that the two WERs differ by their sentences only.
    if split in ("test", OPEN_SPLIT) and test_voices and rng.random() < TEST_ONLY_SHARE:
        voice = test_voices[rng.integers(len(test_voices))]
    else:
        voice = _pick_voice([v for v in voices if not v.test_only], rng)
    if voice.engine == "espeak":
        rate, pitch = float(rng.integers(*ESPEAK_RATE)), float(rng.integers(*ESPEAK_PITCH))
    else:
        rate = round(float(rng.uniform(*FESTIVAL_STRETCH)), 3)
        pitch = round(float(rng.uniform(*FESTIVAL_PITCH)), 3)
    peak = round(float(rng.uniform(*PEAK_LEVEL)), 3)
    return PlannedUtterance(utt_id, split, text, voice, rate, pitch, peak)


def plan_hotword_test(
    plans: Sequence[PlannedUtterance],
    lang: str,
    seed: int,
    voices: Sequence[Voice],
    count: int,
    *,
    domain: str = "demo",
) -> tuple[list[PlannedUtterance], list[str], list[str]]:
    """A test set for biasing: `count` unused sentences, each with a rare word that never
    occurs in train (the word is its hotword), and as many distractor hotwords that occur
    neither in train nor in these sentences. Train voices only, so that the set measures
    biasing, not unseen voices. Returns (plans, hotwords, distractors)."""
    if lang != "en":
        raise EchoicError("--hotword-test is for English corpora")
    pool = sentences(lang, domain)
    tag = corpus_tag(lang, domain)
    used = {p.text for p in plans}
    train = [p.text for p in plans if p.split == "train"]
    train_words = {w for text in train for w in text.split()}
    seen = OverlapIndex(train, lang)
    spread = Counter(w for sentence in pool for w in set(sentence.split()))

    def rare(word: str) -> bool:
        return (
            len(word) >= HOTWORD_MIN_LETTERS
            and "'" not in word
            and word not in train_words
            and spread[word] <= 3
        )

    unused = [s for s in pool if s not in used and not seen.repeats(s)]
    chosen: list[tuple[str, str]] = []
    taken: set[str] = set()
    for index in make_rng(seed, tag, "hotword-sentences").permutation(len(unused)):
        sentence = unused[index]
        candidates = [w for w in sentence.split() if rare(w) and w not in taken]
        if candidates:
            word = max(candidates, key=len)
            chosen.append((sentence, word))
            taken.add(word)
            if len(chosen) == count:
                break
    in_chosen = {w for sentence, _ in chosen for w in sentence.split()}
    others = sorted({w for s in unused for w in s.split() if rare(w) and w not in in_chosen})
    order = make_rng(seed, tag, "distractors").permutation(len(others))
    distractors = [others[i] for i in order[: len(chosen)]]
    test_plans = [
        _plan_utterance(
            f"{tag}-hotword-{n:06d}",
            HOTWORD_SPLIT,
            sentence,
            [v for v in voices if not v.test_only],
            seed,
            tag,
        )
        for n, (sentence, _) in enumerate(chosen)
    ]
    return test_plans, [word for _, word in chosen], distractors


def _pick_voice(voices: Sequence[Voice], rng: np.random.Generator) -> Voice:
    festival = [v for v in voices if v.engine == "festival"]
    espeak = [v for v in voices if v.engine == "espeak"]
    if festival and (not espeak or rng.random() < FESTIVAL_SHARE):
        return festival[rng.integers(len(festival))]
    return espeak[rng.integers(len(espeak))]


# -- rendering -----------------------------------------------------------------------------


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white, pink or brown noise at `snr_db` relative to the speech power."""
    colour = rng.choice(["white", "pink", "brown"])
    return mix_at_snr(samples, colored_noise(samples.shape[0], str(colour), rng), snr_db)


def render(
    plan: PlannedUtterance, raw: np.ndarray, raw_rate: int, seed: int, noise_snr: float | None
) -> np.ndarray:
    """From synthesizer output to the corpus's 16 kHz audio: rate, pitch, level, noise."""
    samples = raw if raw.ndim == 1 else raw.mean(axis=1)
    # Festival's pitch factor: treat the audio as recorded at rate*pitch (higher pitch and
    # formants, shorter); the synthesis stretch already compensated the duration.
    source_rate = raw_rate * plan.pitch if plan.voice.engine == "festival" else raw_rate
    samples = resample(samples, source_rate, SAMPLE_RATE)
    peak = float(np.max(np.abs(samples))) or 1.0
    samples = samples * (plan.peak / peak)
    if noise_snr is not None:
        samples = add_noise(samples, noise_snr, make_rng(seed, plan.id, "noise"))
    return np.clip(samples, -1.0, 32767 / 32768)


def _wav_path(out_dir: Path, plan: PlannedUtterance) -> Path:
    return out_dir / "wav" / plan.split / f"{plan.id}.wav"


def _synthesize_chunk(
    job: tuple[list[PlannedUtterance], str, int, float | None],
) -> list[tuple[str, int]]:
    plans, out_dir, seed, noise_snr = job
    voice = plans[0].voice
    if voice.engine == "espeak":
        raw = [
            espeak_audio(p.voice.name, p.text, words_per_minute=int(p.rate), pitch=int(p.pitch))
            for p in plans
        ]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            raw = festival_audio(voice.name, [(p.text, p.rate * p.pitch) for p in plans], tmp)
    written = []
    for plan, (samples, rate) in zip(plans, raw):
        audio = render(plan, samples, rate, seed, noise_snr)
        path = _wav_path(Path(out_dir), plan)
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        written.append((plan.id, audio.shape[0]))
    return written


def _chunks(plans: Sequence[PlannedUtterance]) -> list[list[PlannedUtterance]]:
    """Group by voice for festival (one voice per process); plain slices for espeak."""
    chunks: list[list[PlannedUtterance]] = []
    by_voice: dict[str, list[PlannedUtterance]] = {}
    espeak = []
    for plan in plans:
        if plan.voice.engine == "festival":
            by_voice.setdefault(plan.voice.name, []).append(plan)
        else:
            espeak.append(plan)
    for group in by_voice.values():
        chunks += [group[i : i + FESTIVAL_CHUNK] for i in range(0, len(group), FESTIVAL_CHUNK)]
    chunks += [espeak[i : i + ESPEAK_CHUNK] for i in range(0, len(espeak), ESPEAK_CHUNK)]
    return chunks


def synthesize_corpus(
    out_dir: str | Path,
    *,
    lang: str = "en",
    num_utts: int = 2000,
    seed: int = 0,
    noise_snr: float | None = None,
    jobs: int | None = None,
    hotword_test: int = 0,
    progress: bool = True,
    domain: str = "demo",
) -> dict:
    """Write wav/<split>/*.wav, train.jsonl, dev.jsonl, test.jsonl, lm_text.txt and
    corpus.json under `out_dir` (with `hotword_test` > 0 also hotword_test.jsonl and
    hotwords.txt). Returns the corpus summary (also in corpus.json)."""
    out_dir = Path(out_dir)
    voices = check_voices(voices_for(lang, domain), lang)
    plans = plan_corpus(lang, num_utts, seed, voices, domain=domain)
    splits = (*SPLITS, OPEN_SPLIT)
    hotwords: list[str] = []
    distractors: list[str] = []
    if hotword_test:
        extra, hotwords, distractors = plan_hotword_test(
            plans, lang, seed, voices, hotword_test, domain=domain
        )
        plans = [*plans, *extra]
        splits = (*splits, HOTWORD_SPLIT)
        listed = sorted(hotwords + distractors)
        (out_dir).mkdir(parents=True, exist_ok=True)
        (out_dir / "hotwords.txt").write_text("".join(f"{w}\n" for w in listed))
    for split in splits:
        (out_dir / "wav" / split).mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs or os.cpu_count() or 1)
    work = [(chunk, str(out_dir), seed, noise_snr) for chunk in _chunks(plans)]
    lengths: dict[str, int] = {}
    with tqdm(total=len(plans), desc=f"synth {lang}", unit="utt", disable=not progress) as bar:
        # fork_map, not multiprocessing.Pool: a synthesizer worker that dies (out of
        # memory, a crash inside festival) is a one-line error here, where Pool waits
        # for its result forever.
        for written in fork_map(_synthesize_chunk, work, jobs, name="synth"):
            lengths.update(written)
            bar.update(len(written))
    summary = _write_manifests(out_dir, plans, lengths, lang, splits)
    summary["degraded"] = write_degraded_tests(out_dir, seed, SAMPLE_RATE)
    text = lm_text(plans, lang, excluded_words=set(hotwords + distractors), domain=domain)
    train_sentences = sum(p.split == "train" for p in plans)
    summary["lm_text"] = {"sentences": len(text), "text_only": len(text) - train_sentences}
    if hotword_test:
        summary["hotwords"] = {"in_sentences": len(hotwords), "distractors": len(distractors)}
    summary.update(
        lang=lang,
        domain=domain,
        seed=seed,
        noise_snr=noise_snr,
        voices=[v.id for v in voices if not v.test_only],
        test_only_voices=[v.id for v in voices if v.test_only],
        dropped_voices=[v.id for v in voices_for(lang, domain) if v not in voices],
    )
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    # Last, so that its presence means a finished corpus (make demo's file target).
    (out_dir / "lm_text.txt").write_text("".join(f"{line}\n" for line in text))
    return summary


def lm_text(
    plans: Sequence[PlannedUtterance], lang: str, excluded_words: set[str], domain: str = "demo"
) -> list[str]:
    """Text to train a language model on, like LibriSpeech's LM corpus: the train
    transcripts, then every sentence of the pool that no split speaks. Sentences of
    the held-out splits never occur, nor does any 5-word stretch of one (a text-only
    sentence that repeats one is left out), nor do the hotword list's words (the
    hotword test measures biasing towards words the model has not met)."""
    spoken = {p.text for p in plans}
    held_out = StretchIndex((p.text for p in plans if p.split != "train"), lang)
    text_only = [
        s
        for s in sentences(lang, domain)
        if s not in spoken and excluded_words.isdisjoint(s.split()) and not held_out.contains(s)
    ]
    return [*(p.text for p in plans if p.split == "train"), *text_only]


def _write_manifests(
    out_dir: Path,
    plans: list[PlannedUtterance],
    lengths: dict[str, int],
    lang: str,
    splits: Sequence[str],
) -> dict:
    summary: dict = {"splits": {}}
    # Mandarin is written without spaces: count characters instead of words.
    unit = "chars" if lang == "zh" else "words"
    vocabulary = {u for p in plans if p.split == "train" for u in units(p.text, lang)}
    for split in splits:
        chosen = [p for p in plans if p.split == split]
        utterances = [
            Utterance(
                id=p.id,
                audio=str(_wav_path(out_dir.resolve(), p)),
                text=p.text,
                duration=lengths[p.id] / SAMPLE_RATE,
                speaker=p.voice.id,
                lang=lang,
            )
            for p in chosen
        ]
        write_manifest(out_dir / f"{split}.jsonl", utterances)
        words = Counter(u for p in chosen for u in units(p.text, lang))
        summary["splits"][split] = {
            "utterances": len(chosen),
            "hours": round(sum(u.duration for u in utterances) / 3600, 4),
            "distinct_sentences": len({p.text for p in chosen}),
            f"distinct_{unit}": len(words),
            f"running_{unit}": sum(words.values()),
            f"{unit}_per_utterance": round(sum(words.values()) / max(1, len(chosen)), 2),
            # Running words train never has: 0 for train, a few for dev and test.
            f"unseen_{unit}": sum(n for u, n in words.items() if u not in vocabulary),
            "voices": len({p.voice.id for p in chosen}),
        }
    return summary
