import numpy as np
import pytest

from echoic.data.augment import SpecAugmentConfig, spec_augment, speed_perturb, time_warp
from echoic.data.features import FBANK_80, CmvnStats, FbankConfig, InputSpec, compute_fbank
from echoic.data.manifest import read_manifest
from echoic.data.prepare import compute_cmvn
from echoic.seeding import make_rng


@pytest.mark.parametrize(
    ("samples", "frames"), [(399, 0), (400, 1), (559, 1), (560, 2), (16000, 98), (48000, 298)]
)
def test_fbank_frame_count(samples, frames):
    config = FbankConfig()
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, samples).astype(np.float32)
    feats = compute_fbank(audio, 16000, config)
    assert feats.shape == (frames, 80) and feats.dtype == np.float32
    assert config.num_frames(samples, 16000) == frames


def test_fbank_other_sizes_and_dither_is_reproducible():
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
    assert compute_fbank(audio, 16000, FbankConfig(num_mel_bins=40, frame_shift_ms=20)).shape == (
        49,
        40,
    )
    dithered = FbankConfig(dither=1.0)
    a = compute_fbank(audio, 16000, dithered, make_rng(1, 0, "u1", "dither"))
    b = compute_fbank(audio, 16000, dithered, make_rng(1, 0, "u1", "dither"))
    c = compute_fbank(audio, 16000, dithered, make_rng(1, 1, "u1", "dither"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="generator"):
        compute_fbank(audio, 16000, dithered)


def test_cmvn_statistics_match_numpy_and_normalise(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, (n, 80)).astype(np.float32) for n in (50, 120, 7)]
    stats = CmvnStats.empty(16000, FbankConfig())
    for chunk in chunks:
        stats.add(chunk)
    every = np.concatenate(chunks).astype(np.float64)
    np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, every.std(0), rtol=1e-9)
    normalised = stats.normalize(every)
    np.testing.assert_allclose(normalised.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalised.std(0), 1.0, atol=1e-5)
    stats.save(tmp_path / "cmvn.json")
    loaded = CmvnStats.load(tmp_path / "cmvn.json")
    np.testing.assert_array_equal(loaded.sum, stats.sum)
    np.testing.assert_array_equal(loaded.sum_sq, stats.sum_sq)
    assert loaded.count == 177 and loaded.fbank == FbankConfig()


def test_cmvn_over_a_corpus_does_not_depend_on_jobs(corpus):
    manifest = read_manifest(corpus / "dev.jsonl")
    one, skipped = compute_cmvn(manifest, 16000, FbankConfig(), jobs=1, progress=False)
    two, _ = compute_cmvn(manifest, 16000, FbankConfig(), jobs=2, progress=False)
    assert not skipped
    np.testing.assert_array_equal(one.sum, two.sum)
    assert one.count == two.count > 100


def test_speed_perturbation_changes_length():
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
    assert speed_perturb(audio, 16000, 1.0) is audio
    assert len(speed_perturb(audio, 16000, 1.1)) == pytest.approx(16000 / 1.1, abs=2)
    assert len(speed_perturb(audio, 16000, 0.9)) == pytest.approx(16000 / 0.9, abs=2)


def test_spec_augment_masks_are_seeded_and_bounded():
    feats = np.random.default_rng(0).normal(size=(200, 80)).astype(np.float32)
    config = SpecAugmentConfig(
        num_freq_masks=2, max_freq_width=10, num_time_masks=2, max_time_width=30
    )
    a = spec_augment(feats, config, make_rng(0, 0, "u", "spec"))
    b = spec_augment(feats, config, make_rng(0, 0, "u", "spec"))
    np.testing.assert_array_equal(a, b)
    assert a.shape == feats.shape
    changed = a != feats
    assert changed.any()
    assert changed.all(axis=0).sum() <= 20  # fully masked bins: at most 2 x 10
    assert changed.all(axis=1).sum() <= 60  # fully masked frames: at most 2 x 30
    # Masked cells hold their bin's average, not zeros (no loud outliers before CMVN).
    cols = np.flatnonzero(changed.all(axis=0))
    if len(cols):
        np.testing.assert_allclose(a[0, cols], feats.mean(0)[cols], rtol=1e-5)
    off = SpecAugmentConfig(num_freq_masks=0, num_time_masks=0)
    np.testing.assert_array_equal(spec_augment(feats, off, make_rng(0)), feats)


def test_time_warp_keeps_shape_and_endpoints():
    feats = np.cumsum(np.ones((100, 4), np.float32), axis=0)
    warped = time_warp(feats, 10, make_rng(3))
    assert warped.shape == feats.shape
    assert np.all(np.diff(warped[:, 0]) >= 0)  # a monotonic stretch, not a shuffle
    assert warped[0, 0] == pytest.approx(1.0, abs=0.6) and warped[-1, 0] == pytest.approx(
        100.0, abs=0.6
    )
    short = feats[:15]
    assert time_warp(short, 10, make_rng(3)) is short
    warped_config = SpecAugmentConfig(num_freq_masks=0, num_time_masks=0, time_warp=10)
    assert spec_augment(feats, warped_config, make_rng(3)).shape == feats.shape


@pytest.mark.parametrize("frames", [1, 7, 11])
def test_seconds_for_frames_is_the_exact_shortest_audio(frames):
    fbank = FbankConfig()
    samples = round(FBANK_80.seconds_for_frames(frames) * 16000)
    assert fbank.num_frames(samples, 16000) == frames
    assert fbank.num_frames(samples - 1, 16000) == frames - 1
    assert InputSpec("waveform").seconds_for_frames(frames) == frames / 100
