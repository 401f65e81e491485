"""Waveform augmentation: noise at an exact SNR, aligned reverberation, the telephone
channel, purity in (seed, epoch, utterance id), bad noise files, config errors, and the
degraded test splits."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from echoic.data.augment import (
    ChannelConfig,
    NoiseConfig,
    ReverbConfig,
    WaveformAugmentConfig,
    colored_noise,
    mix_at_snr,
    mu_law,
    power,
    reverberate,
    telephone,
)
from echoic.data.dataset import DataConfig, build_loader
from echoic.data.manifest import read_manifest
from echoic.data.noise import SourceReport, scan_noise_files, simulated_rirs
from echoic.data.tokenizer import CharTokenizer
from echoic.errors import ConfigError
from echoic.seeding import make_rng

RATE = 16000


def _speech_like(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220, 660, 1500))
    return (0.1 * envelope * tone + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _noise_burst(seconds: float = 2.0) -> np.ndarray:
    """White noise with a slow envelope: its autocorrelation is a spike, so the peak of
    its cross-correlation with a reverberant copy is the response's direct path."""
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.1 * envelope * np.random.default_rng(7).standard_normal(t.shape)).astype(np.float32)


def _lag(reference: np.ndarray, signal: np.ndarray) -> int:
    """The shift of `signal` against `reference`: the first lag (within 0.1 s) where their
    cross-correlation reaches half its largest magnitude, i.e. the earliest strong arrival."""
    from scipy.signal import correlate

    corr = correlate(signal.astype(np.float64), reference.astype(np.float64), mode="full")
    zero, span = reference.shape[0] - 1, RATE // 10
    window = np.abs(corr[zero - span : zero + span + 1])
    first = int(np.argmax(window >= 0.5 * window.max()))
    return first + int(np.argmax(window[first : first + 8])) - span


@pytest.mark.parametrize("snr", [0.0, 7.3, 20.0, -5.0])
@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_noise_is_mixed_at_the_asked_snr(snr, colour):
    speech = _speech_like()
    noise = colored_noise(speech.shape[0], colour, np.random.default_rng(1))
    mixed = mix_at_snr(speech, noise, snr)
    added = mixed.astype(np.float64) - speech
    measured = 10 * np.log10(power(speech) / power(added))
    assert abs(measured - snr) < 0.1
    assert mixed.shape == speech.shape and mixed.dtype == np.float32


def test_reverberation_keeps_length_alignment_and_power():
    speech = _noise_burst()
    rng = np.random.default_rng(2)
    rir = np.zeros(4000)
    rir[37] = 1.0  # the direct path arrives 37 samples late...
    rir[38:] = 0.1 * rng.standard_normal(3962) * np.exp(-np.arange(3962) / 800)  # ...then a tail
    wet = reverberate(speech, rir)
    assert wet.shape == speech.shape
    assert _lag(speech, wet) == 0  # no shift of the direct path against the frames
    assert abs(10 * np.log10(power(wet) / power(speech))) < 0.01


def test_simulated_rooms_are_cached_and_keep_alignment(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOIC_CACHE", str(tmp_path))
    config = ReverbConfig(num_simulated=3, rt60=[0.2, 0.4])
    rirs = simulated_rirs(config, RATE)
    assert len(rirs) == 3 and list(tmp_path.glob("rirs-*.npz"))
    again = simulated_rirs(config, RATE)  # from the cache
    assert all(np.array_equal(a, b) for a, b in zip(rirs, again))
    speech = _noise_burst()
    for rir in rirs:
        wet = reverberate(speech, rir)
        assert wet.shape == speech.shape and _lag(speech, wet) == 0


def test_telephone_channel_keeps_length_and_timing_and_cuts_the_band():
    speech = _noise_burst()
    phone = telephone(speech, RATE, 300.0, 3400.0, mulaw=True)
    assert phone.shape == speech.shape
    assert _lag(speech, phone) == 0
    spectrum = np.abs(np.fft.rfft(phone)) ** 2
    freqs = np.fft.rfftfreq(phone.shape[0], 1 / RATE)
    in_band = spectrum[(freqs > 500) & (freqs < 3000)].mean()
    assert spectrum[freqs > 4500].mean() < in_band * 1e-3
    assert spectrum[freqs < 100].mean() < in_band * 1e-2


def test_mu_law_round_trip_is_close():
    x = np.linspace(-1, 1, 1001)
    assert np.max(np.abs(mu_law(x) - x)) < 0.04
    assert np.max(np.abs(mu_law(x[np.abs(x) < 0.01]) - x[np.abs(x) < 0.01])) < 2e-4


# -- in the data pipeline -------------------------------------------------------------------


def _augment(**kw) -> WaveformAugmentConfig:
    args = {
        "reverb": ReverbConfig(prob=0.5, num_simulated=2),
        "noise": NoiseConfig(prob=0.7, snr_db=[0.0, 20.0]),
        "channel": ChannelConfig(prob=0.5),
        "gain_db": [-6.0, 6.0],
    }
    args.update(kw)
    return WaveformAugmentConfig(**args)


def _loader(corpus, augment, **kw):
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    args = {"max_frames": 2500, "num_workers": 0, "spec_augment": None, "augment": augment}
    args.update(kw)
    return build_loader(manifest, tokenizer, DataConfig(**args), seed=5, train=True)


def _features_by_id(loader) -> dict[str, torch.Tensor]:
    return {i: f[:n] for b in loader for i, f, n in zip(b.ids, b.feats, b.feat_lens)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def rir_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOIC_CACHE", str(tmp_path / "cache"))


def test_augmented_batches_are_the_same_with_0_and_2_workers_and_after_a_resume(corpus, rir_cache):
    plain = _features_by_id(_loader(corpus, None))
    zero = list(_loader(corpus, _augment()))
    two = list(_loader(corpus, _augment(), num_workers=2))
    assert _same(_features_by_id(zero), _features_by_id(two))
    augmented = _features_by_id(zero)
    changed = sum(not torch.equal(augmented[k], plain[k]) for k in plain)
    assert changed > len(plain) // 2  # gain alone moves every utterance
    resumed = _loader(corpus, _augment(), num_workers=2)
    resumed.sampler.load_state_dict({"epoch": 0, "batch_index": 3})
    later = list(resumed)
    assert [b.ids for b in later] == [b.ids for b in zero[3:]]
    for a, b in zip(later, zero[3:]):
        assert torch.equal(a.feats, b.feats)
    # Another epoch draws again; the same epoch in another batch layout draws the same.
    loader = _loader(corpus, _augment())
    loader.sampler.set_position(1)
    assert not _same(_features_by_id(loader), augmented)
    assert _same(_features_by_id(_loader(corpus, _augment(), max_frames=1200)), augmented)


def test_augmented_copies_are_cached_and_equal_the_uncached_ones(corpus, rir_cache):
    augment = _augment(copies=2)
    plain = _loader(corpus, augment)
    cached = _loader(corpus, augment, feature_cache=True, num_workers=2)
    seen = []
    for epoch in range(3):
        plain.sampler.set_position(epoch)
        cached.sampler.set_position(epoch)
        features = _features_by_id(plain)
        assert _same(_features_by_id(cached), features)
        seen.append(features)
    assert len(cached.dataset.cache) <= 2 * len(cached.dataset.manifest)
    # With two copies, three epochs reuse some: an utterance is in one of two states.
    for key in seen[0]:
        assert len({bytes(s[key].numpy()) for s in seen}) <= 2


def test_feature_cache_with_augmentation_needs_copies():
    with pytest.raises(ValueError, match=r"augment\.copies"):
        DataConfig(feature_cache=True, augment=WaveformAugmentConfig(noise=NoiseConfig()))


def test_corrupt_and_empty_noise_files_are_skipped_and_counted(corpus, tmp_path, caplog):
    folder = tmp_path / "noise"
    folder.mkdir()
    sf.write(folder / "good.wav", colored_noise(RATE, "pink", np.random.default_rng(0)), RATE)
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), RATE)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    report = SourceReport()
    files = scan_noise_files([str(folder)], report)
    assert [f.path.rsplit("/", 1)[-1] for f in files] == ["good.wav"]
    assert report.skipped == {"empty_audio": 1, "unreadable_audio": 1}
    noise_only = _augment(
        reverb=None,
        channel=None,
        gain_db=None,
        noise=NoiseConfig(prob=1.0, colored=0, babble=0, files=[str(folder)]),
    )
    with caplog.at_level(logging.INFO):
        loader = _loader(corpus, noise_only)
        # The same with the feature cache: there the fill's workers meet the failures.
        cached = _loader(
            corpus,
            WaveformAugmentConfig(copies=1, noise=noise_only.noise),
            feature_cache=True,
            num_workers=2,
        )
        (folder / "good.wav").write_bytes(b"RIFF broken after the scan")  # fails at read time
        batches = list(loader)
        cached_batches = list(cached)
    assert "noise sources: skipped 2" in caplog.text
    report = loader.last_report
    assert sum(b.size for b in batches) == report.utterances > 0  # nothing lost
    assert report.augment_failures == {"unreadable_audio": report.utterances}
    assert "augmentation not applied to" in caplog.text
    entries = sum(b.size for b in cached_batches)
    assert entries == report.utterances  # nothing lost with the cache either
    assert f"feature cache: augmentation not applied to {entries} entries" in caplog.text


def test_a_noise_file_is_read_from_a_random_segment_at_the_asked_snr(corpus, tmp_path):
    from echoic.data.noise import NoiseBank, NoiseFile

    path = tmp_path / "long.wav"
    sf.write(path, colored_noise(3 * RATE, "white", np.random.default_rng(0)), 8000)  # resampled
    bank = NoiseBank(
        NoiseConfig(colored=0, babble=0, files=[str(tmp_path)]),
        RATE,
        [],
        [NoiseFile(str(path), 3 * RATE, 8000)],
    )
    first = bank.draw(RATE, make_rng(0, "a"))
    assert first.shape == (RATE,)
    assert np.array_equal(first, bank.draw(RATE, make_rng(0, "a")))
    assert not np.array_equal(first, bank.draw(RATE, make_rng(0, "b")))
    longer = bank.draw(20 * RATE, make_rng(0, "c"))  # longer than the file: looped
    assert longer.shape == (20 * RATE,) and power(longer[-RATE:]) > 0


def test_unknown_augmentation_keys_are_one_line_errors():
    from echoic.config import from_dict

    for raw, key in [
        ({"noise": {"snr": [0, 10]}}, "data.augment.noise.snr"),
        ({"reverbb": {}}, "data.augment.reverbb"),
        ({"channel": {"prob": "often"}}, "data.augment.channel.prob"),
    ]:
        with pytest.raises(ConfigError) as error:
            from_dict(WaveformAugmentConfig, raw, "data.augment")
        message = str(error.value)
        assert key in message and "\n" not in message
    with pytest.raises(ConfigError, match="snr_db"):
        from_dict(WaveformAugmentConfig, {"noise": {"snr_db": [20, 0]}}, "data.augment")


# -- the degraded test splits -----------------------------------------------------------------


def test_degraded_test_splits_are_deterministic_and_degraded(corpus, tmp_path):
    import shutil

    from echoic.data.synth.degraded import write_degraded_tests

    for name in ("noisy", "tel"):
        assert (corpus / f"test_{name}.jsonl").is_file()  # synth writes them
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("test_noisy*", "test_tel*"))
    write_degraded_tests(copy, seed=1)
    for split in ("test_noisy", "test_tel"):
        ours, theirs = (
            read_manifest(copy / f"{split}.jsonl"),
            read_manifest(corpus / f"{split}.jsonl"),
        )
        assert [u.id for u in ours.utterances] == [u.id for u in theirs.utterances]
        for a, b in zip(ours.utterances, theirs.utterances):
            assert Path(a.audio).read_bytes() == Path(b.audio).read_bytes()
    conditions = json.loads((corpus / "test_noisy_conditions.json").read_text())
    test = read_manifest(corpus / "test.jsonl").utterances
    assert set(conditions) == {u.id for u in test}
    for utterance in test:
        clean, _ = sf.read(utterance.audio)
        noisy, _ = sf.read(corpus / "wav" / "test_noisy" / f"{utterance.id}.wav")
        assert noisy.shape == clean.shape and 0 <= conditions[utterance.id]["snr_db"] <= 20


def test_musan_import_gives_a_noise_manifest_that_augmentation_reads(corpus, tmp_path, caplog):
    from echoic.data.importers import import_corpus
    from echoic.data.manifest import write_manifest

    root = tmp_path / "musan"
    for relative in ("noise/free-sound/noise-0001.wav", "music/jamendo/music-0001.wav"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / relative, colored_noise(RATE // 2, "pink", np.random.default_rng(0)), RATE)
    (root / "noise" / "free-sound" / "noise-0002.wav").write_bytes(b"not audio")
    with caplog.at_level(logging.WARNING):
        noises = import_corpus("musan", root)
    assert sorted(u.speaker for u in noises) == ["music", "noise"]
    assert "left out 1 unreadable_audio" in caplog.text
    write_manifest(tmp_path / "noise.jsonl", noises)
    files_only = _augment(
        reverb=None,
        channel=None,
        gain_db=None,
        noise=NoiseConfig(prob=1.0, colored=0, babble=0, files=[str(tmp_path / "noise.jsonl")]),
    )
    loader = _loader(corpus, files_only)
    noisy, clean = _features_by_id(loader), _features_by_id(_loader(corpus, None))
    assert not loader.last_report.augment_failures
    assert all(not torch.equal(noisy[k], clean[k]) for k in clean)


def test_synth_degraded_only_adds_the_splits_to_an_existing_corpus(corpus, tmp_path, capsys):
    import shutil

    from echoic.cli import main

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("*_noisy*", "*_tel*"))
    assert main(["synth", "--out", str(copy), "--seed", "1", "--degraded-only"]) == 0
    out = capsys.readouterr().out
    assert "test_noisy.jsonl" in out and "dev_tel.jsonl" in out
    for split in ("test_noisy", "test_tel", "dev_noisy", "dev_tel"):
        assert len(read_manifest(copy / f"{split}.jsonl")) == len(
            read_manifest(corpus / f"{split}.jsonl")
        )
