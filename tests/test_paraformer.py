"""The Paraformer family under the shared contract: metrics, decoding, training that
resumes exactly, and overfitting a handful of utterances."""

import json

import pytest
import torch
from helpers import (
    VOCAB,
    assert_same_run,
    deterministic_lines,
    kill_and_resume,
    make_batch,
    tiny_config,
    write_config,
)

from echoic.cli import main
from echoic.data.manifest import read_manifest, write_manifest
from echoic.decode.decoder import (
    DecodeOptions,
    available_methods,
    check_options,
    decode_batch,
    default_method,
)
from echoic.decode.run import decode_manifest
from echoic.errors import ConfigError, EchoicError
from echoic.models.contract import check_step_output
from echoic.models.model import ModelConfig, build_model
from echoic.score import read_hypotheses, score_texts
from echoic.train.config import load_experiment
from echoic.train.experiment import load_experiment_model
from echoic.train.trainer import Trainer

DECODER = {"num_layers": 1, "num_heads": 2, "ffn_dim": 64, "dropout": 0.0}
HEADS = {
    "paraformer": {"paraformer": {"decoder": DECODER}},
    "paraformer+ctc": {"ctc": {"weight": 0.3}, "paraformer": {"decoder": DECODER}},
}


@pytest.mark.parametrize("encoder", ["conformer", "san_m"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_the_family_keeps_the_metrics_contract(heads, encoder):
    torch.manual_seed(0)
    model = build_model(tiny_config(HEADS[heads], encoder), VOCAB)
    batch = make_batch()
    model.train()
    train = model(batch)
    check_step_output(model.metric_units, train)
    train.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        evaluation = model(batch)
    check_step_output(model.metric_units, evaluation)
    assert set(model.metric_units) == {"loss", "loss_att", "loss_pre", "loss_ctc", "th_accuracy"}
    for name in model.metric_units:  # None exactly where a head is absent, in both modes
        assert (train.metrics[name] is None) == (evaluation.metrics[name] is None), name
    assert (train.metrics["loss_ctc"] is not None) == ("ctc" in HEADS[heads])
    for out in (train, evaluation):
        metrics = out.metrics
        ctc = 0.3 * metrics["loss_ctc"].total if metrics["loss_ctc"] else 0.0
        expected = metrics["loss_att"].total + metrics["loss_pre"].total + ctc
        assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
        assert 0.0 <= metrics["th_accuracy"].value <= 1.0
        assert metrics["th_accuracy"].weight == 9  # 5 + 3 + 1 tokens
        assert out.weight == 3


def test_a_paraformer_takes_no_attention_or_transducer_head():
    from echoic.config import from_dict

    with pytest.raises(ConfigError, match=r"a paraformer model takes .*: remove attention$"):
        from_dict(ModelConfig, {"paraformer": {}, "attention": {}}, "model")
    with pytest.raises(ConfigError, match=r"remove attention and transducer$"):
        from_dict(ModelConfig, {"paraformer": {}, "attention": {}, "transducer": {}}, "model")
    with pytest.raises(ConfigError, match=r"model.paraformer and model.hubert are two model"):
        from_dict(ModelConfig, {"paraformer": {}, "hubert": {}}, "model")
    # Configs written before each family had its own section list the others' as null.
    old = {"ctc": {}, "attention": None, "transducer": None, "paraformer": None, "hubert": None}
    assert from_dict(ModelConfig, old, "model").family == "asr"
    with pytest.raises(ConfigError, match="did you mean 'paraformer'"):  # any family's keys
        from_dict(ModelConfig, {"paraformr": {}, "ctc": {}}, "model")
    with pytest.raises(ConfigError, match=r"'model.paraformer.glancing_ratio'|glancing_ratio"):
        from_dict(ModelConfig, {"paraformer": {"glancing_ratio": 2}}, "model")


def test_decoding_methods_times_and_hotwords_are_explicit():
    torch.manual_seed(0)
    model = build_model(tiny_config(HEADS["paraformer+ctc"]), VOCAB).eval()
    assert available_methods(model) == ["ctc_greedy", "ctc_prefix_beam", "paraformer"]
    assert default_method(model) == "paraformer"
    plain = build_model(tiny_config(HEADS["paraformer"]), VOCAB)
    assert available_methods(plain) == ["paraformer"]
    batch = make_batch()
    hypotheses = decode_batch(model, batch, DecodeOptions("paraformer"))
    _, lengths = model.encode(batch)
    for hypothesis, frames in zip(hypotheses, lengths.tolist()):
        duration = frames * model.encoder.frame_shift
        assert len(hypothesis.times) == len(hypothesis.tokens)
        ends = [end for _, end in hypothesis.times]
        starts = [start for start, _ in hypothesis.times]
        assert ends == sorted(ends) and all(s <= e for s, e in hypothesis.times)
        assert all(s >= 0.0 and e <= duration + 1e-9 for s, e in zip(starts, ends))
    with pytest.raises(EchoicError, match="paraformer"):
        check_options(model, DecodeOptions("paraformer", context=object()))


PARAFORMER_EXPERIMENT = {
    "model": {
        "encoder": {"conformer": {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64,
                                  "conv_kernel": 5}},
        "ctc": None,
        "attention": None,
        "paraformer": {"decoder": {"num_layers": 1, "num_heads": 2, "ffn_dim": 64}},
    },
}  # fmt: skip


@pytest.mark.slow
def test_a_paraformer_run_killed_mid_epoch_resumes_bit_identically(tmp_path, corpus, lang):
    def trainer(name):
        config = write_config(tmp_path / name, corpus, lang, **PARAFORMER_EXPERIMENT)
        return Trainer(load_experiment(config), tmp_path / name / "exp", progress=False)

    assert trainer("reference").run() == 0
    kill_and_resume(lambda: trainer("resumed"), "12:0")
    assert_same_run(tmp_path / "resumed" / "exp", tmp_path / "reference" / "exp")
    reference = deterministic_lines(tmp_path / "reference" / "exp")
    keys = set(json.loads(reference[0]))
    assert {"loss_att", "loss_pre", "th_accuracy"} <= keys


@pytest.mark.slow
def test_a_paraformer_overfits_a_few_utterances_and_decodes_them(tmp_path, corpus, lang):
    shortest = sorted(read_manifest(corpus / "train.jsonl").utterances, key=lambda u: u.duration)
    manifest = tmp_path / "few.jsonl"
    write_manifest(manifest, shortest[:8])
    config = write_config(
        tmp_path,
        corpus,
        lang,
        data={"train": str(manifest), "dev": None, "max_frames": 10**6, "num_buckets": 1,
              "speed_perturb": [1.0], "spec_augment": None, "feature_cache": True},
        model={
            "encoder": {"conformer": {"d_model": 64, "num_layers": 2, "num_heads": 4,
                                      "ffn_dim": 128, "conv_kernel": 7, "dropout": 0.0}},
            "ctc": {"weight": 0.3},
            "attention": None,
            "paraformer": {"decoder": {"num_layers": 1, "num_heads": 4, "ffn_dim": 128,
                                       "dropout": 0.0},
                           "cif": {"dropout": 0.0}, "label_smoothing": 0.0},
        },
        optim={"lr": 0.005, "scheduler": "constant", "warmup_steps": 0},
        train={"max_steps": 150, "max_epochs": None, "accum_grad": 1, "log_every": 25,
               "valid_every": None, "save_every_steps": 150},
    )  # fmt: skip
    exp = tmp_path / "exp"
    assert Trainer(load_experiment(config), exp, progress=False).run() == 0
    model, _, _ = load_experiment_model(exp)
    assert default_method(model) == "paraformer"
    summary = decode_manifest(
        exp, manifest, tmp_path / "decode", DecodeOptions("paraformer"), progress=False
    )
    assert summary["utterances"] == 8
    references = {u.id: u.text for u in shortest[:8]}
    report = score_texts(references, read_hypotheses(tmp_path / "decode" / "hyp.jsonl"))
    assert report.chars.rate < 0.1, report.to_dict()
    first = json.loads((tmp_path / "decode" / "hyp.jsonl").read_text().splitlines()[0])
    assert len(first["start"]) == len(first["end"]) == len(first["tokens"])

    # The whole one pass exported: onnxruntime gives PyTorch's tokens and times.
    assert main(["export", "--exp", str(exp), "--format", "onnx"]) == 0
    info = json.loads((exp / "export" / "export.json").read_text())
    assert list(info["outputs"]) == ["tokens", "scores", "counts", "positions", "out_lens"]
    onnx = decode_manifest(
        exp,
        manifest,
        tmp_path / "onnx",
        DecodeOptions("paraformer"),
        runtime="onnx",
        progress=False,
    )
    assert onnx["runtime"] == "onnx" and onnx["utterances"] == 8
    torch_lines = [
        json.loads(x) for x in (tmp_path / "decode" / "hyp.jsonl").read_text().splitlines()
    ]
    onnx_lines = [json.loads(x) for x in (tmp_path / "onnx" / "hyp.jsonl").read_text().splitlines()]
    for got, expected in zip(onnx_lines, torch_lines, strict=True):
        assert (got["tokens"], got["start"], got["end"]) == (
            expected["tokens"],
            expected["start"],
            expected["end"],
        )
        assert got["score"] == pytest.approx(expected["score"], abs=1e-3)
    with pytest.raises(EchoicError, match="runs paraformer on this export, not ctc_greedy"):
        decode_manifest(exp, manifest, tmp_path / "x", DecodeOptions("ctc_greedy"), runtime="onnx")
