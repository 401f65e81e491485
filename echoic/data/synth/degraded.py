"""Degraded copies of the built-in test and dev splits: `test_noisy`, `test_tel`,
`dev_noisy` and `dev_tel` (dev's are for choosing augmentation settings; test's for the
final figures).

<split>_noisy: each utterance with one kind of noise at an SNR drawn uniformly from
0-20 dB. None of these noise signals is ever used in training: coloured noise comes from
a generator stream of its own, babble from other utterances of the same held-out split
(a third of test's are voices training never hears), and two kinds training never draws
at all, mains hum and music-like tones. Each utterance's kind and SNR are in
<split>_noisy_conditions.json.

<split>_tel: each utterance through a telephone channel: 300-3400 Hz band, 8 kHz,
8-bit mu-law (echoic.data.augment.telephone).

Both are pure functions of (seed, utterance id) and the test audio: byte-identical reruns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf

from echoic.data.audio import load_audio
from echoic.data.augment import colored_noise, mix_at_snr, power, telephone
from echoic.data.manifest import Utterance, read_manifest, write_manifest
from echoic.data.noise import COLOURS, babble
from echoic.seeding import make_rng

SOURCE_SPLITS = ("test", "dev")
NOISE_KINDS = ("colored", "babble", "hum", "music")
SNR_DB = (0.0, 20.0)
PEAK = 0.95  # a mixture louder than this is scaled down instead of clipped


def hum(length: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum (50 or 60 Hz and its harmonics, falling in level) over a low rumble."""
    t = np.arange(length) / sample_rate
    base = 50.0 if rng.random() < 0.5 else 60.0
    signal = np.zeros(length)
    for harmonic in range(1, 16):
        level = rng.uniform(0.3, 1.0) / harmonic
        signal += level * np.sin(2 * np.pi * base * harmonic * t + rng.uniform(0, 2 * np.pi))
    rumble = colored_noise(length, "brown", rng)
    return signal / math.sqrt(power(signal)) + 0.3 * rumble / math.sqrt(power(rumble) or 1.0)


def music(length: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Notes of 0.1-0.5 s on a pentatonic scale, each with harmonics and a decay."""
    out = np.zeros(length)
    start = 0
    while start < length:
        duration = int(rng.uniform(0.1, 0.5) * sample_rate)
        t = np.arange(min(duration, length - start)) / sample_rate
        frequency = 220.0 * 2 ** (rng.choice([0, 2, 4, 7, 9, 12, 14, 16]) / 12)
        note = sum(np.sin(2 * np.pi * frequency * k * t) / k for k in (1, 2, 3))
        out[start : start + t.shape[0]] += note * np.exp(-t * rng.uniform(3, 10))
        start += t.shape[0]
    return out


def _write(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > PEAK:
        samples = samples * (PEAK / peak)
    sf.write(path, samples, sample_rate, subtype="PCM_16")


def write_degraded_tests(out_dir: str | Path, seed: int = 0, sample_rate: int = 16000) -> dict:
    """For test and dev under `out_dir`: wav/<split>_noisy, wav/<split>_tel, their
    manifests and <split>_noisy_conditions.json. Returns {written split: utterances}."""
    counts = {}
    for source in SOURCE_SPLITS:
        if (Path(out_dir) / f"{source}.jsonl").is_file():
            counts.update(_write_degraded(Path(out_dir), source, seed, sample_rate))
    return counts


def _write_degraded(out_dir: Path, source: str, seed: int, sample_rate: int) -> dict[str, int]:
    noisy_split, telephone_split = f"{source}_noisy", f"{source}_tel"
    test = read_manifest(out_dir / f"{source}.jsonl").utterances
    audio = {u.id: load_audio(u.audio, sample_rate=sample_rate) for u in test}
    ids = [u.id for u in test]
    conditions = {}
    written: dict[str, list[Utterance]] = {noisy_split: [], telephone_split: []}
    for split in written:
        (out_dir / "wav" / split).mkdir(parents=True, exist_ok=True)
    for utterance in test:
        clean = audio[utterance.id]
        rng = make_rng(seed, "degraded-noise", utterance.id)
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        snr = float(rng.uniform(*SNR_DB))
        if kind == "colored":
            noise = colored_noise(clean.shape[0], COLOURS[int(rng.integers(len(COLOURS)))], rng)
        elif kind == "babble":
            pool = [i for i in ids if i != utterance.id] or [utterance.id]
            others = [audio[i] for i in rng.choice(pool, min(7, len(pool)), replace=False)]
            noise = babble(clean.shape[0], others, rng)
        elif kind == "hum":
            noise = hum(clean.shape[0], sample_rate, rng)
        else:
            noise = music(clean.shape[0], sample_rate, rng)
        conditions[utterance.id] = {"kind": kind, "snr_db": round(snr, 2)}
        degraded = {
            noisy_split: mix_at_snr(clean, noise, snr),
            telephone_split: telephone(clean, sample_rate, 300.0, 3400.0, mulaw=True),
        }
        for split, samples in degraded.items():
            path = out_dir / "wav" / split / f"{utterance.id}.wav"
            _write(path, samples, sample_rate)
            written[split].append(
                Utterance(
                    id=utterance.id,
                    audio=str(path.resolve()),
                    text=utterance.text,
                    duration=utterance.duration,
                    speaker=utterance.speaker,
                    lang=utterance.lang,
                )
            )
    (out_dir / f"{noisy_split}_conditions.json").write_text(
        json.dumps(conditions, indent=0, sort_keys=True) + "\n"
    )
    for split, utterances in written.items():
        write_manifest(out_dir / f"{split}.jsonl", utterances)
    return {split: len(utterances) for split, utterances in written.items()}
