"""A tiny ASR model overfits 20 utterances of the built-in corpus, for each head: CTC
here, step by step; hybrid and transducer through the trainer, in the session's
`trained` fixture (the models the decoding tests use), read from its metrics. The other
families overfit in their own files: test_paraformer.py and test_contextual.py (a few
utterances decoded back), test_hubert.py (masked loss falls while it resumes exactly)."""

import json

import pytest
import torch

from echoic.config import from_dict
from echoic.data.dataset import DataConfig, build_loader
from echoic.data.features import FbankConfig
from echoic.data.manifest import Manifest, read_manifest
from echoic.data.prepare import compute_cmvn
from echoic.data.tokenizer import CharTokenizer
from echoic.models.asr import AsrModel
from echoic.models.contract import check_step_output
from echoic.models.model import ModelConfig, build_model

# Tests that use the session's `trained` models share one xdist worker (Makefile).
pytestmark = pytest.mark.xdist_group("trained")

ENCODER = {
    "conformer": {
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "ffn_dim": 128,
        "conv_kernel": 7,
        "dropout": 0.0,
    }
}
HEADS = {"ctc": {"ctc": {"weight": 1.0}}}


@pytest.fixture(scope="module")
def twenty(corpus):
    full = read_manifest(corpus / "train.jsonl")
    shortest = sorted(range(len(full)), key=lambda i: full.utterances[i].duration)[:20]
    manifest = Manifest(
        full.path, [full.utterances[i] for i in shortest], [full.lines[i] for i in shortest]
    )
    tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
    stats, _ = compute_cmvn(manifest, 16000, FbankConfig(), progress=False)
    return manifest, tokenizer, stats


@pytest.mark.slow
@pytest.mark.parametrize("family", list(HEADS))
def test_tiny_model_overfits_twenty_utterances(twenty, family):
    manifest, tokenizer, stats = twenty
    torch.manual_seed(0)
    model = build_model(
        from_dict(ModelConfig, {"encoder": ENCODER, **HEADS[family]}, "model"),
        tokenizer.vocab_size,
        stats,
    )
    data = DataConfig(max_frames=10**6, num_buckets=1, spec_augment=None, num_workers=0)
    (batch,) = list(
        build_loader(manifest, tokenizer, data, input_spec=model.input_spec, seed=0, train=False)
    )
    assert batch.size == 20
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses, accuracies = [], []
    for _ in range(250):
        out = model(batch)
        check_step_output(AsrModel.metric_units, out)
        loss = out.loss / out.weight
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        accuracies.append(out.metrics["th_accuracy"].value)
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], (
        f"{family}: loss {losses[0]:.1f} -> {losses[-1]:.1f} in {len(losses)} steps"
    )
    assert accuracies[-1] > accuracies[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hybrid", "transducer"])
def test_trained_models_overfit_twenty_utterances(trained, kind):
    exp, _ = trained(kind)
    lines = (exp / "metrics.jsonl").read_text().splitlines()
    windows = [r for r in map(json.loads, lines) if r["split"] == "train"]
    first, last = windows[0], windows[-1]
    assert last["step"] == 240
    assert last["loss"] < 0.1 * first["loss"], f"{kind}: {first['loss']} -> {last['loss']}"
    assert last["th_accuracy"] > 0.9 > first["th_accuracy"]
