"""echoic's family table: each model family, the `model` key that selects it, its
config section and its builder. Adding a family is one module (its config, derived from
echoic.models.family.ModelSection or echoic.models.base.FrontendEncoderSection, and its
model, which follows echoic.models.contract.TrainableModel) plus one line here.

- asr (no selecting key): frontend -> encoder -> any of CTC, attention and transducer
  heads (echoic.models.asr);
- paraformer: CIF and a parallel decoder, with at most a CTC head besides; with
  `paraformer.bias`, a contextual or SeACo Paraformer (echoic.models.paraformer,
  echoic.models.contextual);
- hubert: masked prediction of cluster labels on a HuggingFace backbone of its own,
  with no frontend or encoder section (echoic.models.hubert).

Everything outside the families' modules takes the model `build_model` returns without
asking which family it is.
"""

from __future__ import annotations

from echoic.models.asr import AsrConfig, build_asr
from echoic.models.contextual import build_paraformer_family
from echoic.models.family import Family, ModelSection, build_model, register
from echoic.models.hubert import HubertModelConfig, build_hubert
from echoic.models.paraformer import ParaformerModelConfig

ASR = register(Family("asr", AsrConfig, build_asr, selected_by=None))
PARAFORMER = register(
    Family("paraformer", ParaformerModelConfig, build_paraformer_family, selected_by="paraformer")
)
HUBERT = register(Family("hubert", HubertModelConfig, build_hubert, selected_by="hubert"))

# The type of an experiment's `model` section: whichever family's config it selects.
ModelConfig = ModelSection

__all__ = ["ModelConfig", "build_model"]
