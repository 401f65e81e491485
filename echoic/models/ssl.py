"""Self-supervised frontends: a HuggingFace wav2vec2, HuBERT, WavLM or data2vec-audio
model from a local folder, raw waveform in, features for the encoder out.

Everything about the upstream is read from the folder, never typed: its hidden size
(the encoder's input width), number of layers, frame shift (the product of its conv
strides over the sample rate), receptive field, and whether it expects normalised
input (`preprocessor_config.json`'s `do_normalize`; without that file, the fairseq
convention: models with a layer-norm feature extractor were pretrained on normalised
audio, group-norm ones such as wav2vec2-base were not).

Padding never changes an utterance's features. A batch is zero-padded, which would
leak into the result in two places: the group norm of wav2vec2-base-style feature
extractors normalises each channel over the whole (padded) time axis, and
self-attention would attend to padded frames. So group-norm extractors run on each
utterance alone, the transformer gets a frame-level attention mask (whatever the
model type's own processor does), and data2vec-audio, whose stack of positional
convolutions also sees past an utterance's end, runs its transformer per utterance.

Features are the hidden states of the transformer layers: hidden state 0 is the
input of the first layer, hidden state i the output of layer i (as HuggingFace's
`output_hidden_states`, without the final layer norm of stable-layer-norm models).
One named layer, or a learned softmax-weighted sum of all of them (S3PRL's
featurizer), optionally followed by a layer norm.

A frozen upstream (`freeze: all`) runs in eval mode under no_grad, its weights are
not saved in checkpoints (they record the folder's content hash instead, and
loading against a changed folder is an error), and its features can be kept in a
cache folder, computed once per utterance and speed factor for every run that uses
the same upstream and layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from echoic.data.batch import Batch
from echoic.data.features import InputSpec
from echoic.errors import EchoicError
from echoic.models.layers import strided_input_length, strided_lengths

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
# Model types whose transformer input must not contain padding (see the module doc).
_ENCODE_ALONE = ("data2vec-audio",)
_NORMALIZE_EPS = 1e-7  # as HuggingFace's Wav2Vec2FeatureExtractor
_CMVN_EPS = 1e-5  # a dimension constant over an utterance stays zero instead of exploding
_HASHED_SUFFIXES = (".json", ".safetensors", ".bin")


@dataclass(frozen=True)
class SslFrontendConfig:
    path: str  # a local folder in HuggingFace format (config.json and weights); never downloaded
    # One hidden state (0: the first layer's input, N: the last layer's output); None: a
    # learned softmax-weighted sum of all of them
    layer: int | None = None
    layer_norm: bool = False  # a layer norm (with learned scale and shift) after the features
    # Each feature dimension to zero mean and unit variance over the utterance's frames
    # (before `layer_norm`). The residual stream of a pre-LN upstream carries a large
    # offset that is the same for every frame; a short-pretrained HuBERT's frames had a
    # cosine of 0.99 with their neighbours, and a downstream model could not overfit 20
    # utterances on them in 200 steps, where it could on a random upstream's.
    utterance_cmvn: bool = False
    # What stays frozen: all (the upstream is a fixed feature extractor), feature_extractor
    # (its convolutional waveform encoder; the transformer is fine-tuned) or none
    freeze: Literal["all", "feature_extractor", "none"] = "all"
    # Keep the whole upstream frozen for this many optimizer steps, then train it as
    # `freeze` says (the downstream model learns first; fairseq's freeze_finetune_updates)
    unfreeze_after_steps: int | None = None
    lr_scale: float = 1.0  # the upstream's learning rate relative to the rest of the model
    # A folder for the frozen upstream's features, one file per utterance and speed factor,
    # shared by every run with the same upstream and layer; needs freeze: all
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.unfreeze_after_steps is not None:
            if self.freeze == "all":
                raise ValueError(
                    "unfreeze_after_steps needs freeze: feature_extractor or none "
                    "(what to train after those steps)"
                )
            if self.unfreeze_after_steps < 1:
                raise ValueError("unfreeze_after_steps must be at least 1")
        if self.lr_scale <= 0:
            raise ValueError("lr_scale must be positive")
        if self.layer is not None and self.layer < 0:
            raise ValueError("layer must not be negative")
        if self.cache is not None and self.freeze != "all":
            raise ValueError("cache needs freeze: all (a trained upstream's features change)")


@dataclass(frozen=True)
class UpstreamInfo:
    """What echoic reads from an upstream folder, each with where it came from."""

    folder: Path
    model_type: str
    hidden_size: int
    num_layers: int
    sample_rate: int
    conv_layers: tuple[tuple[int, int], ...]  # (kernel, stride) of each conv layer
    do_normalize: bool
    normalize_source: str  # where do_normalize came from, for the log
    group_norm: bool  # the feature extractor's first layer normalises over time
    sha256: str  # of config.json, the weights and the other JSON files

    @property
    def frame_shift(self) -> float:
        stride = 1
        for _, s in self.conv_layers:
            stride *= s
        return stride / self.sample_rate

    def num_frames(self, num_samples: int) -> int:
        """Frames the feature extractor gives for `num_samples` samples."""
        return strided_lengths(num_samples, self.conv_layers)

    def samples_for_frames(self, frames: int) -> int:
        """The fewest samples that give `frames` frames."""
        return strided_input_length(frames, self.conv_layers)

    def describe(self) -> str:
        return f"hidden_size {self.hidden_size} in {self.folder / 'config.json'}"


def utterance_cmvn(features: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
    """(B, T, D) features with padding zeroed -> each dimension of each utterance at zero
    mean and unit variance over its own frames; padding stays zero, so the result does not
    depend on how much there is."""
    frames = features.shape[1]
    valid = torch.arange(frames, device=features.device)[None, :] < frame_lens[:, None]
    mask = valid[:, :, None].to(features.dtype)
    count = frame_lens.clamp(min=1)[:, None, None].to(features.dtype)
    mean = (features * mask).sum(1, keepdim=True) / count
    centred = (features - mean) * mask
    variance = centred.square().sum(1, keepdim=True) / count
    return centred * torch.rsqrt(variance + _CMVN_EPS)


def read_upstream(path: str, hash_files: bool = True) -> UpstreamInfo:
    """Check the folder and read what echoic needs from it; one-line errors otherwise.
    `hash_files=False` leaves `sha256` empty (reading the weights takes ~1 s per GB)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        looks_like_hub_id = (
            not folder.exists() and path.count("/") == 1 and not path.startswith(".")
        )
        hint = (
            ": it looks like a model hub id, and echoic never downloads; download the model "
            "yourself (its folder has config.json and model.safetensors) and give that folder"
            if looks_like_hub_id
            else ""
        )
        raise EchoicError(
            f"model.frontend.ssl.path: no folder {folder} (looked for a local "
            f"HuggingFace-format folder; nothing is downloaded){hint}"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EchoicError(f"model.frontend.ssl.path: {folder} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise EchoicError(f"{config_file}: not JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise EchoicError(
            f"{config_file}: model_type {model_type!r} is not a supported upstream "
            f"({', '.join(SUPPORTED_TYPES)})"
        )
    processor: dict = {}
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
    group_norm = config.get("feat_extract_norm", "layer") == "group"
    if "do_normalize" in processor:
        do_normalize, source = bool(processor["do_normalize"]), f"{processor_file.name}"
    else:
        do_normalize = not group_norm
        source = f"no {processor_file.name}: feat_extract_norm {'group' if group_norm else 'layer'}"
    try:
        kernels, strides = config["conv_kernel"], config["conv_stride"]
        info = UpstreamInfo(
            folder=folder,
            model_type=model_type,
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            sample_rate=int(processor.get("sampling_rate", 16000)),
            conv_layers=tuple((int(k), int(s)) for k, s in zip(kernels, strides)),
            do_normalize=do_normalize,
            normalize_source=source,
            group_norm=group_norm,
            sha256=_folder_sha256(folder) if hash_files else "",
        )
    except (KeyError, TypeError, ValueError) as error:
        raise EchoicError(f"{config_file}: missing or bad field ({error})") from None
    return info


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_upstream(info: UpstreamInfo) -> nn.Module:
    """The HuggingFace model in the folder, from local files only, no remote code."""
    try:
        import transformers
    except ImportError:
        raise EchoicError("an SSL frontend needs transformers: pip install 'echoic[ssl]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, loading = transformers.AutoModel.from_pretrained(
        str(info.folder),
        local_files_only=True,
        trust_remote_code=False,
        output_loading_info=True,
        layerdrop=0.0,  # skipped layers would leave parameters without gradients (DDP)
    )
    missing = [k for k in loading.get("missing_keys", []) if "masked_spec_embed" not in k]
    if missing:
        raise EchoicError(
            f"{info.folder}: its weights lack {len(missing)} parameters of a "
            f"{info.model_type} model (e.g. {missing[0]}); they would be random"
        )
    # Used only by HuggingFace's own time masking, which echoic does not call.
    if getattr(model, "masked_spec_embed", None) is not None:
        model.masked_spec_embed.requires_grad_(False)
    return model.float()


class SslFrontend(nn.Module):
    """forward(batch with raw waveform) -> features (B, T, D), lengths (B,)."""

    def __init__(self, config: SslFrontendConfig) -> None:
        super().__init__()
        self.config = config
        self.info = info = read_upstream(config.path)
        if config.layer is not None and config.layer > info.num_layers:
            raise EchoicError(
                f"model.frontend.ssl.layer {config.layer}: {info.folder} has hidden states "
                f"0 to {info.num_layers}"
            )
        self.upstream = load_upstream(info)
        layers = self.upstream.encoder.layers
        if config.layer is not None:
            # Layers above the chosen one would cost time and leave trained parameters
            # without gradients (an error under DDP): they are dropped.
            del layers[max(config.layer, 1) :]
        self.output_dim = info.hidden_size
        self.output_source = info.describe()
        self.frame_shift = info.frame_shift
        self.input_spec = InputSpec("waveform", info.sample_rate)
        num_states = info.num_layers + 1
        self.layer_weights = nn.Parameter(torch.zeros(num_states)) if config.layer is None else None
        self.norm = nn.LayerNorm(info.hidden_size) if config.layer_norm else None
        # Saved with every checkpoint: a frozen upstream's weights are not, so loading one
        # checks that the folder still holds the same model.
        self.register_buffer("upstream_sha256", _sha_tensor(info.sha256))
        # Hidden states are recorded by hooks on the transformer layers: the layer loop is
        # the model's own (position bias, layer drop), and differs between model types.
        self._captured: list[torch.Tensor] | None = None
        layers[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)
        for layer in layers:
            layer.register_forward_hook(self._capture_output)
        self.frozen = False  # the whole upstream, now (see start_step)
        self._upstream_from_checkpoint = False
        self.start_step(0)
        self.cache = FeatureCache(config.cache, info, config.layer) if config.cache else None
        log.info(
            "SSL upstream %s: %s, %d layers, hidden size %d, %.0f ms frames, input %s (%s)",
            info.folder,
            info.model_type,
            info.num_layers,
            info.hidden_size,
            info.frame_shift * 1000,
            "normalised" if info.do_normalize else "as is",
            info.normalize_source,
        )

    # -- training control -------------------------------------------------------------

    @property
    def saves_upstream(self) -> bool:
        """Whether checkpoints hold the upstream's weights: when it is trained, or when
        they came from a checkpoint (a trained upstream, now frozen) rather than the
        folder, so they are never silently replaced by the folder's."""
        return self.config.freeze != "all" or self._upstream_from_checkpoint

    @property
    def unfreezes_during_training(self) -> bool:
        return self.config.unfreeze_after_steps is not None

    def trained_upstream_parameters(self) -> list[nn.Parameter]:
        """The upstream parameters that are trained at some step (for the optimizer)."""
        if self.config.freeze == "all":
            return []
        fixed = {id(p) for p in self._fixed_parameters()}
        return [p for p in self.upstream.parameters() if id(p) not in fixed]

    def _fixed_parameters(self) -> list[nn.Parameter]:
        """Upstream parameters never trained: all, or the feature extractor, and those no
        feature here depends on (a gradient-less trained parameter is an error under
        DDP): the mask embedding of HuggingFace's own time masking, the final layer norm
        of stable-layer-norm models (hidden states are taken before it), an adapter, and
        layer 1 when hidden state 0 is the one used."""
        upstream = self.upstream
        if self.config.freeze == "all":
            return list(upstream.parameters())
        unused: list[nn.Module] = []
        if self.config.freeze == "feature_extractor":
            unused.append(upstream.feature_extractor)
        if getattr(upstream.config, "do_stable_layer_norm", False):
            unused.append(upstream.encoder.layer_norm)
        if getattr(upstream, "adapter", None) is not None:
            unused.append(upstream.adapter)
        if self.config.layer == 0:
            unused.append(upstream.encoder.layers[0])
        fixed = [p for module in unused for p in module.parameters()]
        spec_embed = getattr(upstream, "masked_spec_embed", None)
        return fixed + ([spec_embed] if spec_embed is not None else [])

    def start_step(self, step: int) -> None:
        """Called by the trainer before optimizer step `step + 1` (and on resume): the
        upstream is frozen until `unfreeze_after_steps` steps are done."""
        after = self.config.unfreeze_after_steps
        frozen = self.config.freeze == "all" or (after is not None and step < after)
        changed = frozen != self.frozen
        if self.frozen and not frozen:
            log.info("step %d: the SSL upstream is trained from here on", step + 1)
        self.frozen = frozen
        # Set every time, not only on a change: a fine-tuning stage may have set them
        # (echoic/train/stages.py), and this is the upstream's own schedule.
        fixed = {id(p) for p in self._fixed_parameters()}
        for parameter in self.upstream.parameters():
            parameter.requires_grad_(not frozen and id(parameter) not in fixed)
        if changed or step == 0:
            self.train(self.training)

    def train(self, mode: bool = True) -> SslFrontend:
        super().train(mode)
        if self.frozen:
            self.upstream.eval()  # no dropout: a fixed feature extractor
        return self

    @property
    def exact_for_padded_batches(self) -> bool:
        """Whether the exported (static) graph gives each utterance of a padded batch its
        own features: not for group-norm feature extractors or data2vec-audio."""
        return not self.info.group_norm and self.info.model_type not in _ENCODE_ALONE

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        if not self.saves_upstream:
            for key in [k for k in state if k.startswith(prefix + "upstream.")]:
                del state[key]
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved_hash = state_dict.get(prefix + "upstream_sha256")
        has_upstream = any(k.startswith(prefix + "upstream.") for k in state_dict)
        if saved_hash is not None and not has_upstream:
            # Weights from a run whose upstream stayed frozen: the folder supplies them, so
            # it must hold the model that run was trained on.
            if not torch.equal(saved_hash.to(self.upstream_sha256), self.upstream_sha256):
                raise EchoicError(
                    f"the SSL upstream folder {self.info.folder} has changed since this "
                    "model was trained (its files' SHA-256 differs, and the checkpoint "
                    "holds no upstream weights of its own): restore that folder"
                )
            for key, value in self.upstream.state_dict(prefix=prefix + "upstream.").items():
                state_dict[key] = value
        elif has_upstream:
            self._upstream_from_checkpoint = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- features -------------------------------------------------------------------------

    def num_frames(self, num_samples: int) -> int:
        return self.info.num_frames(num_samples)

    def seconds_for_frames(self, frames: int) -> float:
        return self.info.samples_for_frames(frames) / self.info.sample_rate

    def inputs_from_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """What a batch carries for one utterance's samples: the waveform itself."""
        return samples

    def export_features(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported graph's frontend: waveform (B, S), lengths (B,) -> features."""
        states, frame_lens = self.hidden_states(audio, lengths, static=True)
        return self.combine(states, frame_lens), frame_lens

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.audio is None:
            raise EchoicError("the SSL frontend needs a batch with raw waveform")
        audio, lengths = batch.audio, batch.audio_lens
        if self.cache is not None and self.frozen:
            states, frame_lens = self.cache.hidden_states(self, audio, lengths)
        elif self.frozen:
            with torch.no_grad():
                states, frame_lens = self.hidden_states(audio, lengths)
        else:
            states, frame_lens = self.hidden_states(audio, lengths)
        return self.combine(states, frame_lens), frame_lens

    def combine(self, states: list[torch.Tensor], frame_lens: torch.Tensor) -> torch.Tensor:
        """The chosen hidden states (padding zeroed) -> one (B, T, D) feature tensor."""
        if self.layer_weights is None:
            features = states[0]
        else:
            weights = torch.softmax(self.layer_weights, dim=0)
            features = torch.einsum("l,lbtd->btd", weights, torch.stack(states))
        if self.config.utterance_cmvn:
            features = utterance_cmvn(features, frame_lens)
        return self.norm(features) if self.norm is not None else features

    def hidden_states(
        self, audio: torch.Tensor, lengths: torch.Tensor, static: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Padded waveform (B, S), lengths (B,) -> the chosen hidden states, each
        (B, T, D) with padding zeroed (all L+1 for the weighted sum, else one), and frame
        lengths (B,). `static=True` (export) runs the whole batch at once, without the
        per-utterance passes that keep padding out: exact for one utterance, or for
        utterances of equal length."""
        upstream = self.upstream
        if self.info.do_normalize:
            audio = _normalize(audio, lengths)
        frame_lens = strided_lengths(lengths, self.info.conv_layers)
        freeze_extractor = self.frozen or self.config.freeze == "feature_extractor"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_extractor):
            if self.info.group_norm and not static:  # normalises over time: each alone
                pieces = [
                    upstream.feature_extractor(audio[i : i + 1, : int(n)])[0].transpose(0, 1)
                    for i, n in enumerate(lengths)
                ]
                extracted = nn.utils.rnn.pad_sequence(pieces, batch_first=True)
            else:
                extracted = upstream.feature_extractor(audio).transpose(1, 2)
        projected = upstream.feature_projection(extracted)
        projected = projected[0] if isinstance(projected, tuple) else projected
        frames = projected.shape[1]
        valid = torch.arange(frames, device=audio.device)[None, :] < frame_lens[:, None]
        if self.info.model_type in _ENCODE_ALONE and not static:
            per_utterance = [
                # A copy: the encoder zeroes padding in place, which on views of one
                # tensor would break the backward of the utterances before.
                self._encode(projected[i : i + 1, : int(n)].clone(), valid[i : i + 1, : int(n)])
                for i, n in enumerate(frame_lens)
            ]
            states = [
                nn.utils.rnn.pad_sequence([u[k][0] for u in per_utterance], batch_first=True)
                for k in range(len(per_utterance[0]))
            ]
        else:
            states = self._encode(projected, valid)
        mask = valid[:, :, None].to(states[0].dtype)
        return [s * mask for s in states], frame_lens

    def _encode(self, hidden: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        """Run the transformer, returning the hidden states this frontend uses."""
        self._captured = []
        try:
            self.upstream.encoder(hidden, attention_mask=valid)
            captured = self._captured
        finally:
            self._captured = None
        if self.config.layer is not None:
            return [captured[self.config.layer]]
        return captured

    def _capture_input(self, _module, args, kwargs) -> None:
        if self._captured is not None:
            self._captured.append(args[0] if args else kwargs["hidden_states"])

    def _capture_output(self, _module, _args, output) -> None:
        if self._captured is not None:
            self._captured.append(output[0] if isinstance(output, tuple) else output)


def _normalize(audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its own samples; padding stays 0."""
    valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
    count = lengths.clamp(min=1)[:, None].to(audio.dtype)
    mean = (audio * valid).sum(1, keepdim=True) / count
    var = (((audio - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return (audio - mean) / torch.sqrt(var + _NORMALIZE_EPS) * valid


def _sha_tensor(hex_digest: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


class FeatureCache:
    """A folder of a frozen upstream's hidden states, one safetensors file per
    utterance's samples (named by their SHA-1, so speed-perturbed copies are entries
    of their own). Each entry is computed from its utterance alone, so it is a pure function of
    the audio, and a resumed or a second run reads exactly what the first computed.
    `meta.json` names the upstream (content hash) and layer; another is an error."""

    def __init__(self, folder: str, info: UpstreamInfo, layer: int | None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"upstream_sha256": info.sha256, "layer": "all" if layer is None else layer}
        meta_file = self.folder / "meta.json"
        if meta_file.is_file():
            found = json.loads(meta_file.read_text())
            if found != meta:
                raise EchoicError(
                    f"SSL feature cache {self.folder} holds features of another upstream or "
                    f"layer ({found}, this run {meta}): use another cache folder"
                )
        else:
            _atomic_write(meta_file, lambda p: p.write_text(json.dumps(meta) + "\n"))
        self.hits = self.misses = 0

    def _file(self, samples: torch.Tensor) -> Path:
        """The entry of these samples: named by their content, so another recording under
        the same name (transcribe's file paths) or a speed-perturbed copy never reads
        another's features."""
        key = hashlib.sha1(samples.detach().cpu().numpy().tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def hidden_states(
        self, frontend: SslFrontend, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        rows = []
        for row, length in zip(audio, lengths):
            n = int(length)
            file = self._file(row[:n])
            states = self._read(file)
            if states is not None:
                states = states.to(audio.device)
                self.hits += 1
            else:
                with torch.no_grad():
                    alone, _ = frontend.hidden_states(row[None, :n], length[None])
                states = torch.stack(alone)[:, 0]
                file.parent.mkdir(exist_ok=True)
                cpu = states.cpu().contiguous()
                _atomic_write(file, lambda p, cpu=cpu: save_file({"states": cpu}, str(p)))
                self.misses += 1
            rows.append(states)  # (L, T, D)
        frame_lens = torch.tensor([r.shape[1] for r in rows], device=audio.device)
        padded = nn.utils.rnn.pad_sequence([r.transpose(0, 1) for r in rows], batch_first=True)
        # (B, T, L, D) -> a list of L tensors (B, T, D)
        return list(padded.permute(2, 0, 1, 3).unbind(0)), frame_lens

    def _read(self, file: Path) -> torch.Tensor | None:
        """An entry's states, or None when absent; an unreadable one is recomputed."""
        if not file.is_file():
            return None
        try:
            return load_file(file)["states"]
        except (SafetensorError, KeyError, OSError) as error:
            log.warning("SSL feature cache: %s is unreadable (%s): recomputed", file, error)
            return None


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary name: a reader never sees half a file, and two runs
    writing the same entry both leave a whole one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)
