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
