"""SSL frontends: any HuggingFace wav2vec2-style folder by path, every dimension read
from the model, padding that changes nothing, freezing and unfreezing with exact
resume, checkpoints without a frozen upstream's weights, and the feature cache."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_upstream
from helpers import assert_same_run, final_weights, kill_and_resume, write_config
from safetensors.torch import load_file

from echoic.data.batch import Batch
from echoic.data.manifest import read_manifest
from echoic.decode.decoder import DecodeOptions
from echoic.decode.export import CtcPath, OnnxModel, export_info, export_model, quantize_onnx
from echoic.decode.run import _onnx_outputs, decode_manifest
from echoic.decode.transcribe import transcribe
from echoic.errors import ConfigError, EchoicError
from echoic.models.ssl import SslFrontend, SslFrontendConfig
from echoic.train.checkpoint import list_checkpoints
from echoic.train.config import load_experiment
from echoic.train.experiment import load_experiment_model
from echoic.train.trainer import Trainer


def ssl_config(tmp_path: Path, corpus: Path, lang: Path, upstream: Path, **extra) -> Path:
    """The trainer tests' config with an SSL frontend: the only model change is `path`."""
    ssl = {"path": str(upstream), **extra.pop("ssl", {})}
    return write_config(
        tmp_path,
        corpus,
        lang,
        model={"frontend": {"ssl": ssl}, **extra.pop("model", {})},
        data={"num_workers": 0, "spec_augment": None, **extra.pop("data", {})},
        **extra,
    )


def _train(config: Path, exp: Path) -> Trainer:
    trainer = Trainer(load_experiment(config), exp, progress=False)
    assert trainer.run() == 0
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind,width", [("wav2vec2", 32), ("hubert", 48)])
def test_two_upstreams_train_decode_and_transcribe_changing_only_the_path(
    tmp_path, corpus, lang, upstreams, kind, width
):
    config = ssl_config(
        tmp_path, corpus, lang, upstreams[kind], train={"max_steps": 3, "save_every_steps": 1}
    )
    _train(config, tmp_path / "exp")
    averaged, _, _ = load_experiment_model(tmp_path / "exp", average_last=2)
    model, _, _ = load_experiment_model(tmp_path / "exp")
    assert not torch.equal(averaged.frontend.layer_weights, model.frontend.layer_weights)
    assert model.frontend.output_dim == width  # read from the folder's config.json
    assert model.encoder.subsampling.factor == 2  # 20 ms frames -> 40 ms, not typed
    weights = final_weights(tmp_path / "exp")
    assert not [k for k in weights if k.startswith("frontend.upstream.")]  # frozen: not saved
    summary = decode_manifest(
        tmp_path / "exp",
        corpus / "dev.jsonl",
        tmp_path / "decode",
        DecodeOptions(method="ctc_greedy"),
        num_workers=0,
        progress=False,
    )
    assert summary["utterances"] == len(read_manifest(corpus / "dev.jsonl").utterances)
    audio = read_manifest(corpus / "dev.jsonl").utterances[0].audio
    (transcript,) = transcribe(tmp_path / "exp", [audio], method="attention_rescoring")
    assert transcript.path == audio and transcript.segments
    if kind == "wav2vec2":  # export takes a while: one upstream type is enough
        _check_export(model, tmp_path / "export")


def _check_export(model, out: Path) -> None:
    """TorchScript and ONNX graphs with the upstream inside: waveform in, the PyTorch
    model's greedy CTC output out, at a length the export never saw."""
    path = CtcPath(model).eval()
    audio = torch.randn(1, 27000, generator=torch.Generator().manual_seed(1)) * 0.1
    lengths = torch.tensor([27000])
    with torch.no_grad():
        expected, expected_lens = path(audio, lengths)
    scripted = torch.jit.load(str(export_model(model, out, "torchscript")))
    onnx_file = export_model(model, out, "onnx")
    onnx = OnnxModel(onnx_file)
    info = export_info(model, "onnx", [onnx_file])
    assert info["inputs"].startswith("audio (B, S)") and info["min_samples"] > 400
    int8_lens = OnnxModel(quantize_onnx(onnx_file))(audio, lengths)["out_lens"]
    for runtime in (scripted, onnx):
        with torch.no_grad():
            got = runtime(audio, lengths)
        if isinstance(got, dict):  # onnxruntime: outputs by name
            got, got_lens = got["log_probs"], got["out_lens"]
        else:
            got, got_lens = got
        assert torch.equal(got_lens, expected_lens)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(int8_lens, expected_lens)
    # A padded batch through the graph, one row at a time as `echoic decode --runtime
    # onnx` runs group-norm upstreams: each row's own result.
    batch = _waveform_batch(torch.cat([audio, audio]), torch.tensor([27000, 20000]))
    batch.audio[1, 20000:] = 0.0
    outputs = _onnx_outputs(onnx, batch, per_row=True)
    got, got_lens = outputs["log_probs"], outputs["out_lens"]
    with torch.no_grad():
        short, short_lens = path(audio[:, :20000], torch.tensor([20000]))
    assert got_lens.tolist() == [int(expected_lens[0]), int(short_lens[0])]
    assert torch.equal(got[1, : int(short_lens[0])].argmax(-1), short[0].argmax(-1))


def test_a_typed_encoder_input_size_that_disagrees_fails_before_the_first_step(
    tmp_path, corpus, lang, upstreams
):
    """The seed failure (a config saying 1024 for a 768-dim model), as it would be here."""
    config = ssl_config(
        tmp_path,
        corpus,
        lang,
        upstreams["hubert"],
        model={"encoder": {"conformer": {"input_dim": 1024}}},
    )
    with pytest.raises(ConfigError) as error:
        Trainer(load_experiment(config), tmp_path / "exp", progress=False).run()
    message = str(error.value)
    assert "1024" in message and "48" in message and str(upstreams["hubert"]) in message
    assert "\n" not in message
    assert not (tmp_path / "exp" / "checkpoints").exists() or not list_checkpoints(
        tmp_path / "exp" / "checkpoints"
    )


def test_missing_folders_and_hub_ids_are_one_line_errors(tmp_path):
    with pytest.raises(EchoicError, match=r"looks like a model hub id.*never downloads"):
        SslFrontend(SslFrontendConfig(path="facebook/wav2vec2-base"))
    with pytest.raises(EchoicError, match=r"no folder .*nothing is downloaded"):
        SslFrontend(SslFrontendConfig(path=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EchoicError, match=r"has no config\.json"):
        SslFrontend(SslFrontendConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unfreeze_after_steps needs freeze"):
        SslFrontendConfig(path="x", unfreeze_after_steps=3)


@pytest.mark.parametrize(
    "kind,settings",
    [
        ("wav2vec2", {}),  # group-norm feature extractor, as wav2vec2-base
        ("wav2vec2", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}),
        ("hubert", {}),
        ("wavlm", {}),
        ("data2vec-audio", {}),
    ],
)
def test_a_padded_utterance_gives_the_features_it_gives_alone(tmp_path, kind, settings):
    folder = save_tiny_upstream(tmp_path / kind, kind, 32, **settings)
    frontend = SslFrontend(SslFrontendConfig(path=str(folder))).eval()
    generator = torch.Generator().manual_seed(0)
    long, short = 16000, 9000
    audio = torch.randn(2, long, generator=generator) * 0.1
    audio[1, short:] = 0.0
    with torch.no_grad():
        states, lens = frontend.hidden_states(audio, torch.tensor([long, short]))
        alone, alone_lens = frontend.hidden_states(audio[1:, :short], torch.tensor([short]))
    assert int(lens[1]) == int(alone_lens[0]) == frontend.num_frames(short)
    for padded, single in zip(states, alone):
        torch.testing.assert_close(padded[1, : int(lens[1])], single[0], atol=1e-5, rtol=1e-4)
        assert not padded[1, int(lens[1]) :].any()  # padding frames are zero
    # Fine-tuned over the same padded batch, every trained parameter gets a gradient
    # (DDP requires it), data2vec's per-utterance passes included.
    tuned = SslFrontend(SslFrontendConfig(path=str(folder), freeze="none")).train()
    batch = _waveform_batch(audio, torch.tensor([long, short]))
    features, _ = tuned(batch)
    features.sum().backward()
    trained = tuned.trained_upstream_parameters()
    assert trained and all(p.grad is not None for p in trained)


def test_utterance_cmvn_centres_and_scales_each_dimension_over_its_own_frames(tmp_path):
    folder = save_tiny_upstream(
        tmp_path / "stable", "wav2vec2", 32, feat_extract_norm="layer", do_stable_layer_norm=True
    )
    frontend = SslFrontend(SslFrontendConfig(path=str(folder), utterance_cmvn=True)).eval()
    long, short = 16000, 9000
    audio = torch.randn(2, long, generator=torch.Generator().manual_seed(0)) * 0.1
    audio[1, short:] = 0.0
    batch = _waveform_batch(audio, torch.tensor([long, short]))
    with torch.no_grad():
        features, lens = frontend(batch)
        alone, _ = frontend(_waveform_batch(audio[1:, :short], torch.tensor([short])))
    for row, n in enumerate(lens.tolist()):
        mine = features[row, :n]
        torch.testing.assert_close(mine.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
        assert not features[row, n:].any()  # padding stays zero
    # Padding changes nothing: the short utterance alone gives the same features.
    torch.testing.assert_close(features[1, : int(lens[1])], alone[0], atol=1e-4, rtol=1e-4)


def _waveform_batch(audio: torch.Tensor, lengths: torch.Tensor, ids=None) -> Batch:
    ids = ids or [f"u{i}" for i in range(len(lengths))]
    return Batch(
        0, 0, ids, [""] * len(ids), [1.0] * len(ids), None, None, None, None, audio, lengths
    )


def test_a_named_layer_drops_the_layers_above_and_trains_every_kept_parameter(tmp_path):
    folder = save_tiny_upstream(
        tmp_path / "stable", "wav2vec2", 32, feat_extract_norm="layer", do_stable_layer_norm=True
    )
    for layer, kept in ((1, 1), (0, 1), (None, 2)):
        frontend = SslFrontend(SslFrontendConfig(path=str(folder), layer=layer, freeze="none"))
        assert len(frontend.upstream.encoder.layers) == kept
        audio = torch.randn(2, 8000) * 0.1
        features, _ = frontend(_waveform_batch(audio, torch.tensor([8000, 7000])))
        features.sum().backward()
        trained = frontend.trained_upstream_parameters()
        assert all(p.grad is not None for p in trained), layer  # none unused (DDP)


def test_the_cache_is_keyed_by_content_and_a_trained_upstream_is_never_dropped(tmp_path):
    folder = save_tiny_upstream(tmp_path / "w2v", "wav2vec2", 32)
    cached = SslFrontend(SslFrontendConfig(path=str(folder), cache=str(tmp_path / "cache")))
    cached.eval()
    first, second = torch.randn(1, 8000) * 0.1, torch.randn(1, 8000) * 0.1
    lengths = torch.tensor([8000])
    with torch.no_grad():  # the same name and length, other audio: other features
        a, _ = cached(_waveform_batch(first, lengths, ["same.wav"]))
        b, _ = cached(_waveform_batch(second, lengths, ["same.wav"]))
        again, _ = cached(_waveform_batch(first, lengths, ["other.wav"]))
    assert not torch.allclose(a, b) and torch.equal(a, again)
    assert (cached.cache.misses, cached.cache.hits) == (2, 1)
    # Weights of a fine-tuned upstream loaded into a frozen one stay in its checkpoints.
    tuned = SslFrontend(SslFrontendConfig(path=str(folder), freeze="none"))
    with torch.no_grad():
        next(tuned.upstream.parameters()).add_(1.0)
    frozen = SslFrontend(SslFrontendConfig(path=str(folder)))
    assert not any(k.startswith("upstream.") for k in frozen.state_dict())
    frozen.load_state_dict(tuned.state_dict())
    saved = frozen.state_dict()
    key = next(iter(tuned.upstream.state_dict()))
    assert torch.equal(saved[f"upstream.{key}"], tuned.upstream.state_dict()[key])


def test_old_configs_with_subsampling_4_resume_and_spec_augment_is_refused(
    tmp_path, corpus, lang, upstreams
):
    from echoic.train.config import breaking_changes, parse_experiment

    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "recipes/synth_en/conf/demo.yaml").read_text()
    )
    new = parse_experiment(raw)
    raw["model"]["encoder"]["conformer"]["subsampling"] = 4  # as configs saved before `auto`
    assert breaking_changes(parse_experiment(raw), new) == {}
    raw["model"]["encoder"]["conformer"]["subsampling"] = 6
    assert "model.encoder.conformer.subsampling" in breaking_changes(parse_experiment(raw), new)
    config = ssl_config(tmp_path, corpus, lang, upstreams["hubert"], data={"spec_augment": {}})
    with pytest.raises(ConfigError, match="spec_augment: null"):
        load_experiment(config)


def _upstream_weights(weights: dict) -> dict:
    return {k[len("frontend.upstream.") :]: v for k, v in weights.items() if "upstream." in k}


@pytest.mark.slow
def test_unfreezing_takes_effect_at_step_n_and_resume_after_it_is_exact(
    tmp_path, corpus, lang, upstreams
):
    folder = upstreams["wav2vec2"]
    original = load_file(folder / "model.safetensors")
    extra = {
        "ssl": {"freeze": "feature_extractor", "unfreeze_after_steps": 2, "lr_scale": 0.5},
        "train": {"max_steps": 5, "save_every_steps": 1, "keep_last": 10, "valid_every": None},
    }
    config = ssl_config(tmp_path, corpus, lang, folder, **extra)
    _train(config, tmp_path / "reference")
    checkpoints = list_checkpoints(tmp_path / "reference" / "checkpoints")
    per_step = [_upstream_weights(load_file(c / "model.safetensors")) for c in checkpoints]
    assert len(per_step) == 5 and per_step[0]  # a trained upstream is saved in full
    for step, weights in enumerate(per_step, start=1):
        changed = [k for k in original if k in weights and not torch.equal(weights[k], original[k])]
        extractor = [k for k in changed if k.startswith("feature_extractor.")]
        assert not extractor, f"step {step}: the feature extractor changed"
        if step <= 2:
            assert not changed, f"step {step}: upstream changed while frozen: {changed[:3]}"
        else:
            assert any(k.startswith("encoder.layers.") for k in changed), f"step {step}"

    kill_and_resume(
        lambda: Trainer(load_experiment(config), tmp_path / "resumed", progress=False), "3:0"
    )
    assert_same_run(tmp_path / "resumed", tmp_path / "reference")


@pytest.mark.slow
def test_frozen_upstream_stays_bitwise_and_a_changed_folder_is_refused(
    tmp_path, corpus, lang, upstreams
):
    folder = shutil.copytree(upstreams["hubert"], tmp_path / "upstream")
    original = load_file(folder / "model.safetensors")
    config = ssl_config(tmp_path, corpus, lang, folder, train={"max_steps": 3})
    trainer = _train(config, tmp_path / "exp")
    now = trainer.model.frontend.upstream.state_dict()
    assert all(torch.equal(now[k], original[k]) for k in original)
    assert all(not p.requires_grad for p in trainer.model.frontend.upstream.parameters())
    # The frozen upstream's weights stay in the folder; a changed folder is refused.
    changed = dict(original)
    key = next(k for k in changed if k.endswith("weight"))
    changed[key] = changed[key] + 1.0
    from safetensors.torch import save_file

    save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EchoicError, match=re.escape(str(folder)) + ".*has changed"):
        load_experiment_model(tmp_path / "exp")


@pytest.mark.slow
def test_cached_features_give_the_uncached_training_loss(tmp_path, corpus, lang, upstreams):
    folder = upstreams["wav2vec2"]
    losses = {}
    for name, ssl in (("plain", {}), ("cached", {"cache": str(tmp_path / "cache")})):
        config = ssl_config(
            tmp_path / name,
            corpus,
            lang,
            folder,
            ssl=ssl,
            train={"max_steps": 4, "valid_every": None},
        )
        _train(config, tmp_path / name / "exp")
        lines = (tmp_path / name / "exp" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        losses[name] = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses["plain"]) == 4
    np.testing.assert_allclose(losses["cached"], losses["plain"], rtol=1e-5)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert files and json.loads((tmp_path / "cache" / "meta.json").read_text())["layer"] == "all"
    # A second run reads the cache: no upstream forward at all.
    config = ssl_config(
        tmp_path / "again",
        corpus,
        lang,
        folder,
        ssl={"cache": str(tmp_path / "cache")},
        train={"max_steps": 4, "valid_every": None},
    )
    trainer = _train(config, tmp_path / "again" / "exp")
    cache = trainer.model.frontend.cache
    assert cache.misses == 0 and cache.hits > 0
    # Another layer choice may not read these files.
    with pytest.raises(EchoicError, match="another upstream or layer"):
        SslFrontend(SslFrontendConfig(path=str(folder), layer=1, cache=str(tmp_path / "cache")))
