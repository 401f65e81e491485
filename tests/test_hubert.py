"""HuBERT: k-means targets (echoic kmeans), span masking, the masked-prediction losses,
the family's metrics contract, and exact resume of a pretraining run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from helpers import (
    assert_same_run,
    deterministic_lines,
    final_weights,
    kill_and_resume,
)

from echoic.data.batch import Batch
from echoic.data.manifest import read_manifest, write_manifest
from echoic.data.tokenizer import UnitTokenizer, load_tokenizer
from echoic.errors import ConfigError
from echoic.models.contract import check_step_output
from echoic.models.hubert import (
    HubertBackboneConfig,
    HubertPretrainConfig,
    HubertPretrainModel,
    masked_prediction_losses,
    span_mask,
)
from echoic.models.layers import strided_lengths
from echoic.models.ssl import _normalize
from echoic.pretrain.units import add_deltas, assign, kmeans_units, mfcc_units_features, unit_frames
from echoic.seeding import make_rng
from echoic.train.config import load_experiment, parse_experiment
from echoic.train.probe import effective_rank
from echoic.train.trainer import Trainer

TINY_BACKBONE = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "ffn_dim": 64,
    "conv_layers": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2,
    "conv_pos_kernel": 8,
    "conv_pos_groups": 2,
    "dropout": 0.0,
}
DEFAULT_CONV = tuple((k, s) for _, k, s in HubertBackboneConfig().conv_layers)


# -- labels and their frames ---------------------------------------------------------------


@pytest.mark.parametrize("samples", [399, 400, 401, 719, 720, 721, 16013, 33333])
def test_labels_align_to_the_feature_extractor_frames_for_odd_lengths(samples):
    expected = strided_lengths(samples, DEFAULT_CONV)
    assert unit_frames(samples) == expected
    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1
    assert len(mfcc_units_features(audio)) == expected


def test_deltas_follow_the_regression_formula():
    feats = np.arange(10, dtype=np.float32)[:, None] ** 2  # x = t^2: delta = 2t inside
    out = add_deltas(feats, order=1, window=2)
    assert out.shape == (10, 2)
    np.testing.assert_allclose(out[2:8, 1], 2 * np.arange(2, 8), rtol=1e-6)


def test_assign_picks_the_nearest_centroid():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32)
    frames = np.array([[1.0, 1.0], [9.0, 2.0], [-1.0, 8.0]], dtype=np.float32)
    assert assign(frames, centroids).tolist() == [0, 1, 2]


def test_kmeans_labels_are_deterministic_and_skip_bad_audio(tmp_path, corpus):
    train = read_manifest(corpus / "train.jsonl").utterances[:12]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    utterances = [*train, type(train[0])("bad", str(broken), "x", 1.0)]
    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, utterances)
    runs = [
        kmeans_units([manifest], tmp_path / name, k=8, seed=3, sample_fraction=1.0, jobs=jobs)
        for name, jobs in (("a", 1), ("b", 2))
    ]
    texts = [
        [u.text for u in read_manifest(tmp_path / name / "train.jsonl").utterances]
        for name in ("a", "b")
    ]
    assert texts[0] == texts[1]
    np.testing.assert_array_equal(runs[0].centroids, runs[1].centroids)
    report = json.loads((tmp_path / "a" / "report.json").read_text())["manifests"]["train.jsonl"]
    assert report["utterances"] == 12 and sum(report["skipped"].values()) == 1
    assert 1 < report["perplexity"] <= 8
    tokenizer = load_tokenizer(tmp_path / "a" / "tokenizer.json")
    assert isinstance(tokenizer, UnitTokenizer) and tokenizer.vocab_size == 8 + 3
    first = read_manifest(tmp_path / "a" / "train.jsonl").utterances[0]
    audio, rate = sf.read(first.audio)
    assert rate == 16000 and len(tokenizer.encode(first.text)) == unit_frames(len(audio))
    other = kmeans_units([manifest], tmp_path / "c", k=8, seed=4, sample_fraction=1.0)
    assert not np.array_equal(other.centroids, runs[0].centroids)


def test_faiss_backend_gives_labels_too(tmp_path, corpus):
    pytest.importorskip("faiss")
    result = kmeans_units(
        [corpus / "dev.jsonl"], tmp_path / "f", k=4, backend="faiss", sample_fraction=1.0
    )
    assert result.centroids.shape == (4, 39)
    assert result.report["manifests"]["dev.jsonl"]["clusters_used"] >= 2


def test_unit_tokenizer_round_trip():
    tokenizer = UnitTokenizer(5)
    assert tokenizer.encode("0 4 2") == [2, 6, 4]
    assert tokenizer.encode("7 x") == [1, 1]  # out of range: <unk>, counted
    assert tokenizer.unknown_chars("7 x 3") == ["7", "x"]
    assert tokenizer.decode([2, 6, 4, 0]) == "0 4 2"


# -- masking and losses ----------------------------------------------------------------------


def test_span_masking_respects_probability_length_and_padding():
    lengths = [1000] * 40 + [300, 9, 0]
    rngs = [make_rng(0, 0, f"u{i}", "hubert-mask") for i in range(len(lengths))]
    mask = span_mask(lengths, 0.8, 10, rngs).numpy()
    for row, frames in enumerate(lengths):
        assert not mask[row, frames:].any()  # never padding
        # every masked frame lies in a run of at least mask_length masked frames
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, mask[row, :frames], 0])))[::2]
        assert (runs >= 10).all()
    assert not mask[-2].any()  # shorter than a span
    fraction = mask[:40].mean()
    assert abs(fraction - (1 - math.exp(-0.8))) < 0.03  # overlapping spans: ~55%
    # one span start per 50 frames at mask_prob 0.2 rarely overlaps: ~20%
    sparse = span_mask([1000] * 40, 0.2, 10, rngs[:40]).numpy()
    assert 0.15 < sparse.mean() < 0.21


def test_an_utterance_masks_the_same_whatever_its_batch():
    def mask_of(ids, lengths):
        return span_mask(lengths, 0.8, 5, [make_rng(7, 2, u, "hubert-mask") for u in ids])

    alone = mask_of(["b"], [200])[0]
    batched = mask_of(["a", "b", "c"], [300, 200, 50])[1, :200]
    assert torch.equal(alone, batched)


def test_masked_and_unmasked_losses_on_hand_built_logits():
    logits = torch.tensor(
        [[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]],
         [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    )  # fmt: skip
    targets = torch.tensor([[0, 2, 1, -1], [2, 1, -1, -1]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    masked = torch.tensor([[True, True, False, False], [False, True, False, False]])
    total, parts = masked_prediction_losses(logits, targets, valid, masked, 1.0, 0.5)
    ce = lambda row, t: -torch.log_softmax(logits[row, t], -1)[targets[row, t]]  # noqa: E731
    loss_m = [ce(0, 0) + ce(0, 1), ce(1, 1)]
    loss_u = [ce(0, 2), ce(1, 0)]
    expected = (loss_m[0] / 2 + 0.5 * loss_u[0]) + (loss_m[1] + 0.5 * loss_u[1])
    torch.testing.assert_close(total, expected)
    assert parts["loss_m"].weight == 3 and parts["loss_u"].weight == 2
    assert parts["loss_m"].total == pytest.approx(float(sum(loss_m)), rel=1e-5)
    assert parts["acc_m"].total == 1  # frame (0, 0) right; (0, 1) and (1, 1) wrong
    assert parts["acc_u"].total == 1  # (1, 0) right; (0, 2) is a tie, argmax 0 != 1


# -- the family ---------------------------------------------------------------------------------


def _model(num_units: int = 6, **config) -> HubertPretrainModel:
    torch.manual_seed(0)
    backbone = HubertBackboneConfig(**TINY_BACKBONE)
    return HubertPretrainModel(HubertPretrainConfig(backbone, final_dim=16, **config), num_units)


def _batch(samples: list[int], num_units: int = 6, labels_off_by: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1)
    audio = torch.zeros(len(samples), max(samples))
    token_lens = torch.tensor([unit_frames(n) + labels_off_by for n in samples])
    tokens = torch.full((len(samples), int(token_lens.max())), -1)
    for row, n in enumerate(samples):
        audio[row, :n] = torch.randn(n, generator=g) * 0.1
        count = int(token_lens[row])
        tokens[row, :count] = torch.randint(2, 2 + num_units, (count,), generator=g)
    return Batch(
        epoch=0, index=0, ids=[f"u{i}" for i in range(len(samples))], texts=[""] * len(samples),
        durations=[n / 16000 for n in samples], tokens=tokens, token_lens=token_lens,
        feats=None, feat_lens=None, audio=audio, audio_lens=torch.tensor(samples),
    )  # fmt: skip


def test_hubert_keeps_the_metrics_contract_in_train_and_eval():
    model = _model(unmasked_weight=0.5)
    batch = _batch([16000, 12345, 8000])
    for training in (True, False):
        model.train(training)
        output = model(batch)
        check_step_output(model.metric_units, output)
        assert output.weight == 3 and not output.dropped
        assert output.metrics["th_accuracy"] == output.metrics["acc_m"]
        assert output.metrics["loss_m"].weight > 0 and output.metrics["loss_u"].weight > 0
        assert math.isfinite(output.metrics["loss_m"].value)


def test_the_feature_extractor_gets_its_own_learning_rate_when_asked():
    assert [g["name"] for g in _model().parameter_groups()] == ["model"]
    model = _model(extractor_lr_scale=0.1)
    groups = {g["name"]: g for g in model.parameter_groups()}
    extractor = {id(p) for p in model.backbone.feature_extractor.parameters()}
    assert groups["feature_extractor"]["lr_scale"] == 0.1
    assert {id(p) for p in groups["feature_extractor"]["params"]} == extractor
    everything = [p for g in groups.values() for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="extractor_lr_scale"):
        HubertPretrainConfig(extractor_lr_scale=0.0)


def test_the_mask_embedding_starts_small_when_asked():
    default = _model().backbone.masked_spec_embed
    assert float(default.min()) >= 0.0 and 0.3 < float(default.mean()) < 0.7  # uniform [0, 1)
    small = _model(mask_embedding_std=0.02).backbone.masked_spec_embed
    assert abs(float(small.mean())) < 0.02 and 0.005 < float(small.std()) < 0.04
    with pytest.raises(ValueError, match="mask_embedding_std"):
        HubertPretrainConfig(mask_embedding_std=-1.0)


def test_padding_never_changes_an_utterance():
    model = _model().eval()
    batch = _batch([8000, 16000])
    valid = torch.arange(16000)[None] < batch.audio_lens[:, None]
    with torch.no_grad():
        alone = model.backbone(batch.audio[:1, :8000], attention_mask=valid[:1, :8000].long())
        padded = model.backbone(batch.audio, attention_mask=valid.long())
    frames = unit_frames(8000)
    torch.testing.assert_close(
        alone.last_hidden_state[0], padded.last_hidden_state[0, :frames], atol=1e-5, rtol=1e-4
    )


def test_labels_for_another_frame_rate_are_left_out_and_counted():
    model = _model()
    output = model(_batch([16000, 8000], labels_off_by=5))
    assert output.dropped == {0: "label_length_mismatch", 1: "label_length_mismatch"}
    assert output.weight == 0
    off_by_one = model(_batch([16000, 8000], labels_off_by=1))
    assert not off_by_one.dropped and off_by_one.weight == 2


def _experiment(tmp_path: Path, units: Path, **train) -> Path:
    config = {
        "data": {
            "train": str(units / "train.jsonl"),
            "dev": str(units / "dev.jsonl"),
            "lang": str(units),
            "max_frames": 3000,
            "speed_perturb": [1.0],
            "spec_augment": None,
            "num_workers": 0,
        },
        "model": {"hubert": {"backbone": TINY_BACKBONE, "final_dim": 16}},
        "optim": {"lr": 0.002, "warmup_steps": 3},
        "train": {"max_steps": 8, "log_every": 1, "valid_every": 4, "save_every_steps": 2,
                  "keep_last": 10, **train},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "hubert.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def units(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("units")
    kmeans_units(
        [corpus / "train.jsonl", corpus / "dev.jsonl"], out, k=12, sample_fraction=1.0, jobs=1
    )
    return out


def test_hubert_config_is_checked(tmp_path, units):
    raw = yaml.safe_load(_experiment(tmp_path, units).read_text())
    for change, message in (
        ({"model": {**raw["model"], "ctc": {}}}, "a hubert model takes hubert: remove ctc"),
        ({"data": {**raw["data"], "speed_perturb": [0.9, 1.0]}}, "speed_perturb"),
        ({"data": {**raw["data"], "spec_augment": {}}}, "spec_augment"),
        ({"model": {**raw["model"], "encoder": {"transformer": {}}}}, "remove model.frontend"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_experiment({**raw, **change})


@pytest.mark.slow
def test_a_hubert_run_killed_and_resumed_is_bit_identical(tmp_path, units, caplog):
    def trainer(name):
        config = _experiment(tmp_path / name, units)
        return Trainer(load_experiment(config), tmp_path / name / "exp", progress=False)

    with caplog.at_level("INFO"):
        assert trainer("reference").run() == 0
    assert "a uniform guess scores loss_m = log 12 = 2.485" in caplog.text
    kill_and_resume(lambda: trainer("resumed"), "5:0")
    assert_same_run(tmp_path / "resumed" / "exp", tmp_path / "reference" / "exp")
    reference = deterministic_lines(tmp_path / "reference" / "exp")
    lines = [json.loads(line) for line in reference]
    assert {"loss_m", "loss_u", "acc_m", "acc_u", "th_accuracy"} <= set(lines[0])
    first, last = lines[0]["loss_m"], [r for r in lines if r["split"] == "train"][-1]["loss_m"]
    assert last < first  # it learns


def test_export_to_huggingface_loads_in_transformers_and_the_ssl_frontend(tmp_path, units):
    import transformers

    from echoic.cli import main
    from echoic.models.ssl import SslFrontend, SslFrontendConfig
    from echoic.train.experiment import load_experiment_model

    config = _experiment(tmp_path, units, max_steps=2, valid_every=None)
    assert Trainer(load_experiment(config), tmp_path / "exp", progress=False).run() == 0
    assert main(["export", "--exp", str(tmp_path / "exp"), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) in (0, None)  # fmt: skip
    model, _, _ = load_experiment_model(tmp_path / "exp")
    loaded = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    batch = _batch([16000, 9001])
    valid = (torch.arange(16000)[None] < batch.audio_lens[:, None]).long()
    normalised = _normalize(batch.audio, batch.audio_lens)
    with torch.no_grad():
        ours = model.backbone(normalised, attention_mask=valid, output_hidden_states=True)
        theirs = loaded(normalised, attention_mask=valid, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # echoic's ssl frontend reads it with no edit: width, frames, normalisation, features
    frontend = SslFrontend(SslFrontendConfig(str(tmp_path / "hf"), layer=2)).eval()
    assert frontend.output_dim == TINY_BACKBONE["hidden_size"] and frontend.info.do_normalize
    with torch.no_grad():
        feats, lens = frontend(batch)
    assert lens.tolist() == [unit_frames(16000), unit_frames(9001)]
    torch.testing.assert_close(
        feats[1, : lens[1]], ours.hidden_states[2][1, : lens[1]], atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_the_probe_measures_without_changing_the_run(tmp_path, corpus, lang, units):
    from echoic.train.plot import plot_curves

    probe = {
        "every_steps": 3,
        "train": str(corpus / "train.jsonl"),
        "dev": str(corpus / "dev.jsonl"),
        "lang": str(lang),
        "steps": 5,
        "hidden": 16,
    }
    runs = {}
    for name, extra in (("off", {}), ("on", {"probe": probe})):
        config = _experiment(tmp_path / name, units, max_steps=6)
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, **extra}))
        assert Trainer(load_experiment(config), tmp_path / name / "exp", progress=False).run() == 0
        runs[name] = final_weights(tmp_path / name / "exp")
    assert all(torch.equal(runs["on"][k], runs["off"][k]) for k in runs["off"])
    assert deterministic_lines(tmp_path / "on" / "exp") == deterministic_lines(
        tmp_path / "off" / "exp"
    )
    lines = [
        json.loads(x) for x in (tmp_path / "on" / "exp" / "metrics.jsonl").read_text().splitlines()
    ]
    probes = [r for r in lines if r["split"] == "probe"]
    assert [r["step"] for r in probes] == [0, 3, 6]
    assert all(r["probe_cer"] >= 0 and r["probe_seconds"] > 0 for r in probes)
    assert plot_curves(tmp_path / "on" / "exp").is_file()


def test_a_stop_request_ends_the_probe_at_once(corpus, lang):
    from echoic.train.probe import Probe, ProbeConfig

    dev = str(corpus / "dev.jsonl")
    config = ProbeConfig(every_steps=1, train=dev, dev=dev, lang=str(lang), steps=3, hidden=8)
    probe = Probe(config, 16000)
    model = _model()
    assert probe.run(model, torch.device("cpu"), should_stop=lambda: True) is None
    assert model.training  # left as it was
    values = probe.run(model, torch.device("cpu"))
    assert set(values) == {
        "probe_wer",
        "probe_cer",
        "probe_rank",
        "probe_train_loss",
        "probe_seconds",
    }


def test_effective_rank_reads_dimensions_used_not_dimensions_present():
    g = torch.Generator().manual_seed(0)
    spread = [torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)]
    assert 14.0 < effective_rank(spread) <= 16.0
    direction = torch.randn(16, generator=g)
    # One varying direction under a large constant offset (what a collapsed upstream's
    # frames look like) and a little noise: about 1, whatever the width.
    noise = 0.01 * torch.randn(800, 16, generator=g)
    collapsed = [5.0 + torch.randn(800, 1, generator=g) * direction + noise]
    assert effective_rank(collapsed) < 1.1


def test_ctc_forced_alignment_finds_the_obvious_path():
    from echoic.decode.align import ctc_forced_align

    # 6 frames, vocabulary {blank, a=1, b=2}: frames say a a _ a b b
    best = [1, 1, 0, 1, 2, 2]
    log_probs = torch.full((6, 3), -5.0)
    log_probs[torch.arange(6), torch.tensor(best)] = -0.01
    assert ctc_forced_align(log_probs, [1, 1, 2]) == [0, 0, -1, 1, 2, 2]
    # a repeated token needs a blank between: 2 frames cannot hold "a a"
    assert ctc_forced_align(log_probs[:2], [1, 1]) == []
    assert ctc_forced_align(log_probs[:3], [1]) in ([0, 0, -1], [0, 0, 0])


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_kmeans_reports_agreement_with_the_characters(tmp_path, trained):
    exp, manifest = trained("hybrid")
    result = kmeans_units([manifest], tmp_path / "units", k=8, sample_fraction=1.0,
                          align_exp=exp, align_max_utts=5)  # fmt: skip
    agreement = result.report["manifests"][manifest.name]["agreement"]
    assert agreement["utterances"] == 5
    assert agreement["majority_char_share"] <= agreement["cluster_purity"] <= 1
    assert 0 < agreement["char_purity"] <= 1 and 0 < agreement["char_nmi"] < 1
