"""The `model` config section and the model it builds, whatever its family.

The family follows from the heads a config names: `paraformer` (optionally with `ctc`)
is the Paraformer family (echoic.models.paraformer); any of `ctc`, `attention` and
`transducer` without it is the ASR family (echoic.models.asr). Both are frontend ->
encoder -> heads (echoic.models.base). `hubert` alone is HuBERT pretraining
(echoic.models.hubert), whose waveform feature extractor and transformer are one
HuggingFace backbone configured in its own section. Everything outside this module
takes the model `build_model` returns without asking which family it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from echoic.data.features import CmvnStats
from echoic.models.asr import build_asr
from echoic.models.base import EncoderModel
from echoic.models.contextual import build_contextual_paraformer
from echoic.models.encoders import EncoderConfig
from echoic.models.frontend import FrontendConfig
from echoic.models.heads.attention import AttentionDecoderConfig
from echoic.models.heads.ctc import CtcConfig
from echoic.models.heads.transducer import TransducerConfig
from echoic.models.hubert import HubertPretrainConfig, build_hubert
from echoic.models.paraformer import ParaformerConfig, build_paraformer


@dataclass(frozen=True)
class ModelConfig:
    frontend: FrontendConfig = FrontendConfig()
    encoder: EncoderConfig = EncoderConfig()
    ctc: CtcConfig | None = None  # a section (even empty: `ctc: {}`) adds the head
    attention: AttentionDecoderConfig | None = None
    transducer: TransducerConfig | None = None
    paraformer: ParaformerConfig | None = None  # the Paraformer family (with ctc at most)
    hubert: HubertPretrainConfig | None = None  # HuBERT pretraining (nothing else)

    def __post_init__(self) -> None:
        heads = (self.ctc, self.attention, self.transducer, self.paraformer, self.hubert)
        if all(head is None for head in heads):
            raise ValueError(
                "the model needs at least one head: ctc, attention, transducer, paraformer "
                "or hubert"
            )
        if self.hubert is not None:
            others = [
                name
                for name in ("ctc", "attention", "transducer", "paraformer")
                if getattr(self, name) is not None
            ]
            if others:
                raise ValueError(f"hubert pretrains alone: remove {', '.join(others)}")
            if self.frontend != FrontendConfig() or self.encoder != EncoderConfig():
                raise ValueError(
                    "hubert has its own waveform feature extractor and transformer "
                    "(model.hubert.backbone): remove model.frontend and model.encoder"
                )
        if self.paraformer is not None and (self.attention or self.transducer):
            raise ValueError(
                "a Paraformer has its own decoder and at most a ctc head besides: "
                "remove attention and transducer"
            )

    @property
    def family(self) -> str:
        if self.hubert is not None:
            return "hubert"
        return "paraformer" if self.paraformer is not None else "asr"

    @property
    def wants_cmvn(self) -> bool:
        """Whether the model normalises fbank with `echoic prepare`'s statistics."""
        fbank = self.frontend.fbank
        return self.hubert is None and fbank is not None and fbank.global_cmvn


def build_model(
    config: ModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> EncoderModel:
    """The model for `config`, with the vocabulary size from the tokenizer and, for an
    fbank frontend with global CMVN, the statistics from `echoic prepare`."""
    if config.hubert is not None:
        return build_hubert(config.hubert, vocab_size)
    if config.paraformer is not None and config.paraformer.bias is not None:
        return build_contextual_paraformer(config, vocab_size, cmvn)
    if config.paraformer is not None:
        return build_paraformer(config, vocab_size, cmvn)
    return build_asr(config, vocab_size, cmvn)
