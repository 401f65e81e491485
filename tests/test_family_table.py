"""Adding a model family is one module plus one table entry: a toy family, registered
here and nowhere else, trains, is killed and resumes bit-identically, decodes and
exports through echoic's own trainer, decoding, export and command line, none of which
is told about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import yaml
from helpers import TINY, VOCAB, assert_same_run, kill_and_resume, write_config

from echoic.cli import main
from echoic.data.batch import Batch
from echoic.data.manifest import read_manifest
from echoic.decode.decoder import default_method
from echoic.errors import ConfigError
from echoic.models.base import (
    EncoderModel,
    FrontendEncoderSection,
    build_frontend_encoder,
    step_output,
)
from echoic.models.contract import TOKENS, UTTERANCES, Metric, StepOutput, TrainableModel, Unit
from echoic.models.family import Family, register, unregister
from echoic.models.heads.ctc import CtcConfig, CtcHead
from echoic.score import read_hypotheses
from echoic.train.config import load_experiment
from echoic.train.experiment import load_experiment_model
from echoic.train.trainer import Trainer

# -- the toy family: this is all a new family needs ------------------------------------------


@dataclass(frozen=True)
class ToyConfig(FrontendEncoderSection):
    toy: CtcConfig = CtcConfig()  # `model.toy` selects the family: a lone CTC head


class ToyModel(EncoderModel):
    metric_units: ClassVar[dict[str, Unit]] = {"loss": UTTERANCES, "th_accuracy": TOKENS}

    def __init__(self, frontend, encoder, ctc: CtcHead) -> None:
        super().__init__(frontend, encoder)
        self.ctc = ctc

    def token_indexed_parameters(self) -> list[str]:
        return [f"ctc.{key}" for key in self.ctc.token_indexed()]

    def decode_methods(self) -> tuple[str, ...]:
        return ("ctc_prefix_beam", "ctc_greedy")

    def forward(self, batch: Batch) -> StepOutput:
        inputs = self.usable_inputs(batch, self.ctc)
        encoded, lengths = self.encoder(inputs.feats, inputs.lengths)
        out = self.ctc(encoded, lengths, inputs.tokens, inputs.token_lens, with_accuracy=True)
        metrics = {
            "loss": Metric(float(out.loss.detach()), float(inputs.used), UTTERANCES),
            "th_accuracy": out.accuracy,
        }
        return step_output(out.loss, inputs.used, metrics, inputs.dropped)


def build_toy(config: ToyConfig, vocab_size: int, cmvn) -> ToyModel:
    frontend, encoder = build_frontend_encoder(config.frontend, config.encoder, cmvn)
    return ToyModel(frontend, encoder, CtcHead(encoder.output_dim, vocab_size, config.toy))


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture
def toy_family():
    family = register(Family("toy", ToyConfig, build_toy, selected_by="toy"))
    yield family
    unregister(family.name)


def _toy_config(tmp_path, corpus, lang):
    """The trainer tests' config with the toy's model section instead of ASR heads."""
    path = write_config(tmp_path, corpus, lang, train={"max_steps": 8})
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"encoder": raw["model"]["encoder"], "toy": {}}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_a_registered_toy_family_trains_resumes_decodes_and_exports(
    tmp_path, corpus, lang, toy_family, capsys
):
    config_path = _toy_config(tmp_path, corpus, lang)
    config = load_experiment(config_path)
    assert isinstance(config.model, ToyConfig) and config.model.family == "toy"

    reference = tmp_path / "reference"
    assert Trainer(config, reference, progress=False).run() == 0

    exp = tmp_path / "exp"
    kill_and_resume(lambda: Trainer(config, exp, progress=False), "5:1")  # mid-accumulation
    assert_same_run(exp, reference)

    model, _, _ = load_experiment_model(exp)
    assert isinstance(model, ToyModel) and isinstance(model, TrainableModel)
    assert default_method(model) == "ctc_prefix_beam"

    test = corpus / "test.jsonl"
    for method in ("ctc_greedy", "ctc_prefix_beam"):
        out = tmp_path / f"decode_{method}"
        argv = ["decode", "--exp", str(exp), "--manifest", str(test), "--method", method]
        assert main([*argv, "--out", str(out), "--no-progress"]) in (0, None)
        hyps = read_hypotheses(out / "hyp.jsonl")
        assert set(hyps) == {u.id for u in read_manifest(test).utterances}
    argv = ["decode", "--exp", str(exp), "--manifest", str(test), "--out", str(tmp_path / "x")]
    assert main([*argv, "--method", "attention"]) == 2  # a method the family does not name
    assert capsys.readouterr().err.strip() == (
        "echoic: error: method 'attention' needs heads this model lacks; "
        "valid methods: ctc_greedy, ctc_prefix_beam"
    )
    assert main([*argv, "--method", "ctc_gredy"]) == 2  # one no family names
    assert capsys.readouterr().err.strip() == (
        "echoic: error: unknown method 'ctc_gredy'; did you mean 'ctc_greedy'? "
        "(this model runs ctc_greedy, ctc_prefix_beam)"
    )

    assert main(["export", "--exp", str(exp), "--format", "onnx", "--no-quantize"]) in (0, None)
    onnx_out = tmp_path / "decode_onnx"
    argv = ["decode", "--exp", str(exp), "--manifest", str(test), "--method", "ctc_greedy"]
    assert main([*argv, "--runtime", "onnx", "--out", str(onnx_out), "--no-progress"]) in (0, None)
    assert read_hypotheses(onnx_out / "hyp.jsonl") == read_hypotheses(
        tmp_path / "decode_ctc_greedy" / "hyp.jsonl"
    )


def test_a_family_section_is_strict_and_unregistered_families_are_unknown(toy_family):
    from echoic.config import from_dict
    from echoic.models.model import ModelConfig

    assert isinstance(from_dict(ModelConfig, {"toy": {}}, "model"), ToyConfig)
    with pytest.raises(ConfigError, match=r"a toy model takes .*: remove attention$"):
        from_dict(ModelConfig, {"toy": {}, "attention": {}}, "model")
    unregister("toy")
    try:
        with pytest.raises(ConfigError, match=r"unknown key 'model.toy'"):
            from_dict(ModelConfig, {"toy": {}}, "model")
    finally:
        register(toy_family)
    with pytest.raises(ValueError, match="registered already"):
        register(toy_family)


BUILT_IN = {
    "asr": {"encoder": {"conformer": dict(TINY, conv_kernel=3)}, "ctc": {}},
    "paraformer": {"encoder": {"conformer": dict(TINY, conv_kernel=3)}, "paraformer": {}},
    "hubert": {
        "hubert": {
            "backbone": {
                "hidden_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "ffn_dim": 64,
                "conv_layers": [[16, 10, 5], [16, 3, 2]],
                "conv_pos_kernel": 16,
                "conv_pos_groups": 2,
            },
            "final_dim": 16,
        }
    },
}


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_built_in_family_follows_the_contract(name):
    from echoic.config import from_dict
    from echoic.decode.decoder import METHODS
    from echoic.models.model import ModelConfig, build_model

    config = from_dict(ModelConfig, BUILT_IN[name], "model")
    assert config.family == name
    model = build_model(config, VOCAB)
    assert isinstance(model, TrainableModel)
    assert set(model.decode_methods()) <= set(METHODS)
    frames = model.input_frames_for(2)
    assert frames >= 2 and model.seconds_for_input_frames(frames) > 0
    assert len(model.repeated_blocks()) >= 1


def test_configs_saved_before_the_family_table_still_load():
    """config.yaml of runs made before each family had its own section: the other
    families' sections as null, and a HuBERT run's default frontend and encoder."""
    from echoic.config import from_dict, to_dict
    from echoic.models.encoders import EncoderConfig
    from echoic.models.frontend import FrontendConfig
    from echoic.models.model import ModelConfig

    nulls = {"attention": None, "transducer": None, "paraformer": None, "hubert": None}
    assert from_dict(ModelConfig, {"ctc": {}, **nulls}, "model").family == "asr"
    old = {
        "frontend": to_dict(FrontendConfig()),
        "encoder": to_dict(EncoderConfig()),
        "ctc": None,
        "attention": None,
        "transducer": None,
        "paraformer": None,
        "hubert": BUILT_IN["hubert"]["hubert"],
    }
    assert from_dict(ModelConfig, old, "model").family == "hubert"
