import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_sine

from echoic.data.batch import IGNORE_ID
from echoic.data.dataset import AsrDataset, BatchLoader, DataConfig, build_loader
from echoic.data.features import FbankConfig, InputSpec
from echoic.data.manifest import Utterance, read_manifest, write_manifest
from echoic.data.tokenizer import CharTokenizer
from echoic.errors import ManifestError


def _config(**kw) -> DataConfig:
    args = {"max_frames": 2500, "speed_perturb": [0.9, 1.0, 1.1], "num_workers": 0}
    args.update(kw)
    return DataConfig(**args)


def _setup(corpus, **kw):
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    return build_loader(manifest, tokenizer, _config(**kw), seed=5, train=True)


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert (a.index, a.ids) == (b.index, b.ids)
        assert torch.equal(a.feats, b.feats) and torch.equal(a.feat_lens, b.feat_lens)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_lens, b.token_lens)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_batch_k_gives_the_uninterrupted_batches(corpus, workers):
    full = list(_setup(corpus, num_workers=workers))
    assert len(full) >= 6
    for k in (1, len(full) // 2, len(full) - 1):
        loader = _setup(corpus, num_workers=workers)
        loader.sampler.load_state_dict({"epoch": 0, "batch_index": k})
        _assert_same(list(loader), full[k:])


def test_batches_are_bit_identical_whatever_num_workers(corpus):
    _assert_same(list(_setup(corpus, num_workers=0)), list(_setup(corpus, num_workers=2)))


def test_resume_loads_only_the_remaining_batches(corpus):
    loader = _setup(corpus)
    calls = []
    original = AsrDataset.__getitem__

    def counting(self, plan):
        calls.append(plan.index)
        return original(self, plan)

    AsrDataset.__getitem__ = counting
    try:
        total = len(loader)
        loader.sampler.set_position(0, total - 2)
        assert len(list(loader)) == 2
    finally:
        AsrDataset.__getitem__ = original
    assert calls == [total - 2, total - 1]  # nothing before k is loaded or replayed


def test_augmentation_changes_with_epoch_but_not_with_order(corpus):
    loader = _setup(corpus)
    epoch0 = {i: f[:n] for b in loader for i, f, n in zip(b.ids, b.feats, b.feat_lens)}
    loader.sampler.set_position(1)
    epoch1 = {i: f[:n] for b in loader for i, f, n in zip(b.ids, b.feats, b.feat_lens)}
    assert epoch0.keys() == epoch1.keys()
    assert any(
        epoch0[i].shape != epoch1[i].shape or not torch.equal(epoch0[i], epoch1[i]) for i in epoch0
    )
    # The same utterance in another batch composition gets the same augmentation.
    other = _setup(corpus, max_frames=1500)
    again = {i: f[:n] for b in other for i, f, n in zip(b.ids, b.feats, b.feat_lens)}
    assert all(torch.equal(again[i], epoch0[i]) for i in epoch0)


def test_feature_cache_gives_the_uncached_batches_and_skips_fbank_later(
    corpus, monkeypatch, caplog
):
    import echoic.data.dataset as dataset_module

    calls = []
    real = dataset_module.compute_fbank
    monkeypatch.setattr(dataset_module, "compute_fbank", lambda *a: calls.append(1) or real(*a))
    plain, cached = _setup(corpus), _setup(corpus, feature_cache=True)
    for epoch in range(3):  # speed factors differ per epoch, so the cache keeps growing
        plain.sampler.set_position(epoch)
        cached.sampler.set_position(epoch)
        expected = list(plain)
        calls.clear()
        before = len(cached.dataset.cache)
        with caplog.at_level(logging.INFO):
            _assert_same(list(cached), expected)
        utterances = sum(b.size for b in expected)
        assert len(calls) == len(cached.dataset.cache) - before  # fbank once per new entry
        # Epoch 0 starts from an empty cache, so every utterance is computed; later
        # epochs compute only the (utterance, speed) pairs not seen before.
        if epoch == 0:
            assert len(calls) == utterances
        else:
            assert len(calls) < utterances
    cached.sampler.set_position(0)  # every (utterance, speed) of epoch 0 is cached now
    calls.clear()
    assert len(list(cached)) == len(expected) and not calls
    assert len(cached.dataset.cache) <= 3 * len(cached.dataset.manifest)
    assert "feature cache" in caplog.text and cached.dataset.cache_bytes > 0


def test_feature_cache_filled_by_workers_gives_the_same_batches(corpus, monkeypatch, caplog):
    import echoic.data.dataset as dataset_module

    calls = []  # fbank computed in this process; the forked workers append to their own copy
    real = dataset_module.compute_fbank
    monkeypatch.setattr(dataset_module, "compute_fbank", lambda *a: calls.append(1) or real(*a))
    plain, filled = _setup(corpus), _setup(corpus, feature_cache=True, num_workers=2)
    for epoch in range(2):
        plain.sampler.set_position(epoch)
        filled.sampler.set_position(epoch, 3)  # a resumed pass fills only what it will load
        expected = list(plain)[3:]
        calls.clear()
        with caplog.at_level(logging.INFO):
            _assert_same(list(filled), expected)
        assert not calls
        if epoch == 0:  # one entry per utterance of batches 3..: none for batches 0-2
            assert len(filled.dataset.cache) == sum(b.size for b in expected)
    assert "feature cache: computed" in caplog.text


def test_feature_cache_needs_no_dither(corpus):
    manifest = read_manifest(corpus / "train.jsonl")
    dithered = InputSpec("fbank", 16000, FbankConfig(dither=1.0))
    with pytest.raises(ValueError, match="dither"):
        AsrDataset(manifest, None, _config(feature_cache=True), input_spec=dithered)


def test_batch_layout_and_padding_report(corpus, caplog):
    loader = _setup(corpus)
    caplog.set_level(logging.INFO)
    batches = list(loader)
    for batch in batches:
        assert batch.feats.shape == (batch.size, int(batch.feat_lens.max()), 80)
        assert batch.tokens.shape == (batch.size, int(batch.token_lens.max()))
        for row, length in enumerate(batch.token_lens):
            assert (batch.tokens[row, length:] == IGNORE_ID).all()
        assert batch.size * batch.feats.shape[1] <= 2500 or batch.size == 1
    report = loader.last_report
    assert report.utterances == 36 and report.batches == len(batches)
    assert 0.5 < report.padding_efficiency <= 1.0
    assert "padding efficiency" in caplog.text and "36 utterances" in caplog.text


def test_evaluation_loader_is_clean_and_sorted(corpus):
    manifest = read_manifest(corpus / "train.jsonl")
    loader = build_loader(manifest, None, _config(num_workers=0), seed=0, train=False)
    lengths = [int(n) for b in loader for n in b.feat_lens]
    assert lengths == sorted(lengths)  # evaluation batches come in duration order
    batch = next(iter(loader))
    assert batch.tokens is None
    again = next(iter(build_loader(manifest, None, _config(num_workers=0), seed=9, train=False)))
    assert torch.equal(batch.feats, again.feats)  # no augmentation, no seed dependence


def test_waveform_batches_for_self_supervised_frontends(corpus):
    manifest = read_manifest(corpus / "dev.jsonl")
    loader = build_loader(
        manifest,
        None,
        _config(num_workers=0),
        input_spec=InputSpec("waveform"),
        seed=0,
        train=False,
    )
    batch = next(iter(loader))
    assert batch.feats is None and batch.audio.dim() == 2
    assert int(batch.audio_lens.max()) == batch.audio.shape[1]


def test_waveform_batches_are_bit_identical_whatever_num_workers_and_resume_exactly(corpus):
    """Raw waveform for SSL frontends, speed perturbed, as exact as fbank batches."""
    manifest = read_manifest(corpus / "train.jsonl")
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)

    def batches(workers: int, start: int = 0) -> list:
        loader = build_loader(
            manifest,
            tokenizer,
            _config(num_workers=workers),
            input_spec=InputSpec("waveform"),
            seed=5,
            train=True,
        )
        loader.sampler.load_state_dict({"epoch": 1, "batch_index": start})
        return list(loader)

    plain, parallel, resumed = batches(0), batches(2), batches(0, start=3)
    assert len(plain) == len(parallel) >= 6
    for a, b in zip(plain, parallel):
        assert a.ids == b.ids and torch.equal(a.audio, b.audio)
        assert torch.equal(a.audio_lens, b.audio_lens)
    for a, b in zip(plain[3:], resumed, strict=True):
        assert a.ids == b.ids and torch.equal(a.audio, b.audio)
    # Speed perturbation changes the sample counts from the manifest's durations.
    durations = {u.id: u.duration for u in manifest.utterances}
    stretched = [
        n / 16000 / durations[i] for b in plain for i, n in zip(b.ids, b.audio_lens.tolist())
    ]
    assert min(stretched) < 0.95 and max(stretched) > 1.05
    assert plain[0].real_frames == int(plain[0].audio_lens.sum()) // 160  # 10 ms frames


def _bad_corpus(tmp_path, corpus):
    good = read_manifest(corpus / "dev.jsonl").utterances
    write_sine(tmp_path / "ok.wav", seconds=1.0)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF garbage" * 50)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    full = write_sine(tmp_path / "full.wav", seconds=2.0).read_bytes()
    (tmp_path / "cut.wav").write_bytes(full[: len(full) // 3])
    nan = np.zeros(16000, np.float32)
    nan[5] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    write_sine(tmp_path / "short.wav", seconds=0.12)

    def utt(name, audio, text="a b", duration=1.0):
        return Utterance(name, str(tmp_path / audio), text, duration)

    bad = [
        utt("unreadable", "garbage.wav"),
        utt("empty", "empty.wav"),
        utt("truncated", "cut.wav", duration=2.0),
        utt("nonfinite", "nan.wav"),
        # The manifest's 0.16 s passes min_duration=0.15; the 0.12 s of audio do not.
        utt("short_audio", "short.wav", duration=0.16),
        utt("short_manifest", "ok.wav", duration=0.01),
        utt("long_manifest", "ok.wav", duration=40.0),
        utt("no_text", "ok.wav", text="  "),
        utt("missing", "not_there.wav"),
    ]
    path = tmp_path / "mixed.jsonl"
    write_manifest(path, [*good, *bad])
    return read_manifest(path), good


@pytest.mark.parametrize(
    "loading", [{"num_workers": 0}, {"num_workers": 2}, {"num_workers": 2, "feature_cache": True}]
)
def test_bad_input_is_skipped_counted_and_summarised(tmp_path, corpus, caplog, loading):
    manifest, good = _bad_corpus(tmp_path, corpus)
    config = _config(max_duration=30.0, min_duration=0.15, **loading)
    tokenizer = CharTokenizer.train(["a b", *(u.text for u in good)])
    loader = build_loader(manifest, tokenizer, config, seed=0, train=False)
    caplog.set_level(logging.INFO)
    used = [i for b in loader for i in b.ids]
    assert sorted(used) == sorted(u.id for u in good)
    report = loader.last_report
    assert dict(report.skipped) == {
        "unreadable_audio": 1,
        "empty_audio": 1,
        "truncated_audio": 1,
        "nonfinite_audio": 1,
        "too_short": 2,
        "too_long": 1,
        "empty_text": 1,
        "missing_audio": 1,
    }
    assert "mixed.jsonl:" in report.examples["missing_audio"]
    assert "skipped 9" in caplog.text


def test_missing_audio_can_be_fatal_with_file_and_line(tmp_path, corpus):
    manifest, good = _bad_corpus(tmp_path, corpus)
    tokenizer = CharTokenizer.train(["a b", *(u.text for u in good)])
    loader = build_loader(
        manifest, tokenizer, _config(on_missing_audio="error"), seed=0, train=False
    )
    line = len(good) + 9
    with pytest.raises(
        ManifestError, match=rf"mixed.jsonl:{line}: audio file not found: .*not_there.wav"
    ):
        list(loader)


def test_an_all_skipped_batch_is_still_yielded_for_exact_positions(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [Utterance("x", str(tmp_path / "nope.wav"), "a", 1.0)])
    manifest = read_manifest(path)
    loader = BatchLoader(
        AsrDataset(manifest, CharTokenizer.train(["a"]), _config()),
        build_loader(manifest, None, _config(), seed=0, train=False).sampler,
    )
    (batch,) = list(loader)
    assert batch.size == 0 and batch.real_frames == 0 and batch.skipped[0].reason == "missing_audio"
