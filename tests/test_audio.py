import numpy as np
import pytest
import soundfile as sf
from conftest import write_sine

from echoic.data import audio
from echoic.data.audio import audio_info, load_audio
from echoic.errors import AudioError


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_44k_sine_read_at_16k_keeps_its_frequency(tmp_path):
    path = write_sine(tmp_path / "s.wav", freq=1000.0, rate=44100, seconds=2.0)
    samples = load_audio(str(path), sample_rate=16000)
    assert samples.dtype == np.float32
    assert len(samples) == pytest.approx(32000, abs=2)
    assert _peak_hz(samples, 16000) == pytest.approx(1000.0, abs=1.0)
    # A real resampler keeps the level (linear interpolation would too, but aliases;
    # a 7.5 kHz tone at 44.1 kHz must come through, an 8.5 kHz one must not alias in).
    assert np.max(np.abs(samples[1000:-1000])) == pytest.approx(0.5, abs=0.01)
    alias = write_sine(tmp_path / "a.wav", freq=9000.0, rate=44100, seconds=1.0)
    assert np.max(np.abs(load_audio(str(alias), sample_rate=16000)[500:-500])) < 0.01


def test_stereo_flac_and_ogg_are_mixed_to_mono(tmp_path):
    for name in ("s.flac", "s.ogg"):
        path = write_sine(tmp_path / name, freq=500.0, rate=16000, seconds=1.0, channels=2)
        samples = load_audio(str(path), sample_rate=16000)
        assert samples.ndim == 1 and _peak_hz(samples, 16000) == pytest.approx(500.0, abs=2.0)


def test_offset_and_duration(tmp_path):
    rate = 16000
    ramp = np.linspace(-0.5, 0.5, 3 * rate, dtype=np.float32)
    sf.write(tmp_path / "r.wav", ramp, rate, subtype="FLOAT")
    part = load_audio(str(tmp_path / "r.wav"), sample_rate=rate, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(part, ramp[rate : rate + rate // 2])
    assert audio_info(str(tmp_path / "r.wav")).duration == 3.0


def _expect(reason, path, **kw):
    with pytest.raises(AudioError) as caught:
        load_audio(str(path), sample_rate=16000, **kw)
    assert caught.value.reason == reason
    return str(caught.value)


def test_bad_audio_is_an_audio_error_with_a_reason(tmp_path):
    assert "not found" in _expect(audio.MISSING, tmp_path / "missing.wav")
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 20)
    _expect(audio.UNREADABLE, tmp_path / "garbage.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    _expect(audio.EMPTY, tmp_path / "empty.wav")
    full = write_sine(tmp_path / "full.wav", seconds=2.0, subtype="PCM_16").read_bytes()
    (tmp_path / "cut.wav").write_bytes(full[: len(full) // 2])
    assert "expected" in _expect(audio.TRUNCATED, tmp_path / "cut.wav", duration=2.0)
    _expect(audio.TRUNCATED, tmp_path / "full.wav", offset=5.0, duration=1.0)
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    _expect(audio.NONFINITE, tmp_path / "nan.wav")
