"""The `model` config section and the model it builds, whatever its family.

The family follows from the heads a config names: `paraformer` (optionally with `ctc`)
is the Paraformer family (echoic.models.paraformer); any of `ctc`, `attention` and
`transducer` without it is the ASR family (echoic.models.asr). Both are frontend ->
encoder -> heads (echoic.models.base), and everything outside this module takes the
model `build_model` returns without asking which family it is.
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
from echoic.models.paraformer import ParaformerConfig, build_paraformer


@dataclass(frozen=True)
class ModelConfig:
    frontend: FrontendConfig = FrontendConfig()
    encoder: EncoderConfig = EncoderConfig()
    ctc: CtcConfig | None = None  # a section (even empty: `ctc: {}`) adds the head
    attention: AttentionDecoderConfig | None = None
    transducer: TransducerConfig | None = None
    paraformer: ParaformerConfig | None = None  # the Paraformer family (with ctc at most)

    def __post_init__(self) -> None:
        heads = (self.ctc, self.attention, self.transducer, self.paraformer)
        if all(head is None for head in heads):
            raise ValueError(
                "the model needs at least one head: ctc, attention, transducer or paraformer"
            )
        if self.paraformer is not None and (self.attention or self.transducer):
            raise ValueError(
                "a Paraformer has its own decoder and at most a ctc head besides: "
                "remove attention and transducer"
            )

    @property
    def family(self) -> str:
        return "paraformer" if self.paraformer is not None else "asr"


def build_model(
    config: ModelConfig, vocab_size: int, cmvn: CmvnStats | None = None
) -> EncoderModel:
    """The model for `config`, with the vocabulary size from the tokenizer and, for an
    fbank frontend with global CMVN, the statistics from `echoic prepare`."""
    if config.paraformer is not None and config.paraformer.bias is not None:
        return build_contextual_paraformer(config, vocab_size, cmvn)
    if config.paraformer is not None:
        return build_paraformer(config, vocab_size, cmvn)
    return build_asr(config, vocab_size, cmvn)
