"""Shared fixtures: a small synthesized corpus and helpers that write audio files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echoic.data.synth.corpus import synthesize_corpus

HAVE_SYNTHESIZERS = shutil.which("espeak-ng") is not None and shutil.which("festival") is not None
needs_synth = pytest.mark.skipif(
    not HAVE_SYNTHESIZERS, reason="espeak-ng/festival missing: run `make setup`"
)


def write_sine(
    path: Path,
    *,
    freq: float = 440.0,
    rate: int = 16000,
    seconds: float = 1.0,
    channels: int = 1,
    **kw,
) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(path, data, rate, **kw)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A 40-utterance English corpus (train 36, dev 2, test 2), made once per test session."""
    if not HAVE_SYNTHESIZERS:
        pytest.skip("espeak-ng/festival missing: run `make setup`")
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, num_utts=40, seed=1, jobs=2, progress=False)
    return out


@pytest.fixture(scope="session")
def lang(corpus, tmp_path_factory) -> Path:
    """Char tokenizer and CMVN statistics of the session corpus (`echoic prepare`)."""
    from echoic.data.prepare import prepare

    out = tmp_path_factory.mktemp("lang")
    prepare(corpus / "train.jsonl", out, tokenizer="char", jobs=1, progress=False)
    return out


@pytest.fixture(scope="session")
def trained(corpus, lang, tmp_path_factory):
    """Experiment folders of tiny models overfitted on the 20 shortest train utterances,
    made on first use: trained("hybrid") (CTC + attention + right-to-left decoder) or
    trained("transducer") (transducer + CTC). Returns (exp folder, manifest of the 20)."""
    import yaml

    from echoic.data.manifest import read_manifest, write_manifest
    from echoic.train.config import load_experiment
    from echoic.train.trainer import Trainer

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("trained")
    full = read_manifest(corpus / "train.jsonl")
    twenty = sorted(full.utterances, key=lambda u: u.duration)[:20]
    manifest = root / "twenty.jsonl"
    write_manifest(manifest, twenty)
    encoder = {
        "conformer": {
            "d_model": 64,
            "num_layers": 2,
            "num_heads": 4,
            "ffn_dim": 128,
            "conv_kernel": 7,
            "dropout": 0.0,
        }
    }
    heads = {
        "hybrid": {
            "ctc": {"weight": 0.3},
            "attention": {
                "weight": 0.7,
                "num_layers": 1,
                "num_heads": 4,
                "ffn_dim": 128,
                "dropout": 0.0,
                "label_smoothing": 0.0,
                "right_to_left_layers": 1,
            },
        },
        "transducer": {
            "ctc": {"weight": 0.2},
            "transducer": {"joiner_dim": 64, "predictor": {"stateless": {"embed_dim": 64}}},
        },
    }

    def train(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            config = {
                "data": {
                    "train": str(manifest),
                    "lang": str(lang),
                    "max_frames": 10**6,
                    "num_buckets": 1,
                    "spec_augment": None,
                    "speed_perturb": [1.0],
                    "num_workers": 0,
                    # Exact, so the models are the uncached ones; decode must accept it.
                    "feature_cache": True,
                },
                "model": {"encoder": encoder, **heads[kind]},
                "optim": {"lr": 0.005, "scheduler": "constant", "warmup_steps": 0},
                "train": {
                    "max_steps": 240,
                    "max_epochs": None,  # one batch an epoch: steps are the limit
                    "log_every": 20,
                    "save_every_steps": 80,
                    "keep_last": 2,
                },
            }
            path = root / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(config))
            exp = root / kind
            assert Trainer(load_experiment(path), exp, progress=False).run() == 0
            made[kind] = exp
        return made[kind], manifest

    return train


def save_tiny_upstream(folder: Path, model_type: str, hidden: int, **config) -> Path:
    """A randomly initialised HuggingFace model of `model_type` (wav2vec2, hubert, wavlm,
    data2vec-audio) with the real conv strides (20 ms frames) and a tiny everything else,
    saved with save_pretrained. Nothing is downloaded."""
    import torch
    import transformers

    classes = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
        "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
        "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel),
    }
    config_class, model_class = classes[model_type]
    # data2vec-audio's num_conv_pos_embeddings is its number of positional conv layers.
    positional = (
        {"num_conv_pos_embeddings": 2, "conv_pos_kernel_size": 5}
        if model_type == "data2vec-audio"
        else {"num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
    )
    settings = {
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden,
        "conv_dim": (16,) * 7,
        "conv_stride": (5, 2, 2, 2, 2, 2, 2),
        "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
        **positional,
        **config,
    }
    torch.manual_seed(hidden)
    model_class(config_class(**settings)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory) -> dict[str, Path]:
    """Two tiny upstreams of different types and widths: wav2vec2 (32, group-norm
    feature extractor, as wav2vec2-base) and HuBERT (48)."""
    root = tmp_path_factory.mktemp("upstreams")
    return {
        "wav2vec2": save_tiny_upstream(root / "w2v32", "wav2vec2", 32),
        "hubert": save_tiny_upstream(root / "hubert48", "hubert", 48),
    }
