"""`echoic export`: a model's decoding path as ONNX (for onnxruntime) or TorchScript.

Every format (model.onnx, its int8 copy model.int8.onnx, model.ts) takes fbank
features and their lengths (a model with an SSL frontend: the 16 kHz waveform and its
lengths, `audio` and `audio_lens`, the upstream inside the graph), with dynamic batch
and time axes, and returns what the family's `export_path` gives (its
`export_outputs`, listed in export.json). For the ASR family, the encoder + CTC path:

    feats (B, T, F) float32, feat_lens (B,) int64
    -> log_probs (B, T', V) float32 (blank id 0), out_lens (B,) int64

For a Paraformer, the whole one-pass decoding (encoder, CIF with its tail, the
parallel decoder, best token per position) at a fixed width N = T' + 1 (T' without a
CIF tail):

    -> tokens (B, N) int64, scores (B, N) float32, counts (B,) int64,
       positions (B, N) int64, out_lens (B,) int64

`feats` is what `echoic.data.features.compute_fbank` gives: kaldi-native-fbank log-mel
of the audio at the model's sample rate, samples scaled to the 16-bit range, the
model's mel bins, frame length and shift, no dither, kaldi's defaults otherwise
(povey window, pre-emphasis 0.97, snip_edges), zero-padded. It is not normalised: the
model's global CMVN (from `echoic prepare`; `global_cmvn`, on by default) is inside the
graph. `export_info` writes these settings, as the model has them, to export.json.
`quantize_onnx` makes a dynamic int8 copy (weights int8, activations quantized on the
fly) with onnxruntime's tools.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from echoic.errors import EchoicError
from echoic.models.base import CtcPath, EncoderModel

__all__ = ["CtcPath", "OnnxModel", "export_info", "export_model", "quantize_onnx"]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.ts"


def _example(model: EncoderModel) -> tuple[torch.Tensor, torch.Tensor]:
    frames = max(200, 4 * model.encoder.min_input_frames)
    if model.input_spec.kind == "waveform":  # an SSL frontend: 16 kHz samples
        samples = round(model.frontend.seconds_for_frames(frames) * model.input_spec.sample_rate)
        return torch.randn(2, samples) * 0.1, torch.tensor([samples, samples - 3700])
    feats = torch.randn(2, frames, model.frontend.output_dim)
    return feats, torch.tensor([frames, frames - 37])


def export_model(model: EncoderModel, out_dir: str | Path, fmt: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = model.eval().export_path().eval()
    example = _example(model)
    if fmt == "torchscript":
        target = out_dir / TORCHSCRIPT_FILE
        with torch.no_grad():
            torch.jit.trace(path, example, check_trace=False).save(str(target))
        return target
    if fmt != "onnx":
        raise EchoicError(f"unknown export format '{fmt}' (allowed: onnx, torchscript)")
    target = out_dir / ONNX_FILE
    shortest = model.encoder.min_input_frames + 1
    names = ["feats", "feat_lens"]
    if model.input_spec.kind == "waveform":
        names = ["audio", "audio_lens"]
        shortest = round(model.frontend.seconds_for_frames(shortest) * model.input_spec.sample_rate)
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=shortest)
    with torch.no_grad():
        program = torch.onnx.export(
            path,
            example,
            dynamo=True,
            input_names=names,
            output_names=list(model.export_outputs),
            # The forward's own argument names, whatever the graph's inputs are called.
            dynamic_shapes={"feats": {0: batch, 1: time}, "feat_lens": {0: batch}},
            optimize=True,
        )
    program.save(str(target))
    return target


def quantize_onnx(source: Path) -> Path:
    """Dynamic int8 quantization (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = source.with_name(ONNX_INT8_FILE)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


class OnnxModel:
    """An exported model in onnxruntime: (inputs, lengths) -> its outputs, by name."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise EchoicError(f"{path} not found: run `echoic export --format onnx` first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, lengths = (i.name for i in self.session.get_inputs())  # feats or audio
        outputs = self.session.run(
            None,
            {
                inputs: feats.numpy().astype(np.float32),
                lengths: feat_lens.numpy().astype(np.int64),
            },
        )
        return {name: torch.from_numpy(array) for name, array in zip(self.output_names, outputs)}


def export_info(model: EncoderModel, fmt: str, files: list[Path]) -> dict:
    """What the exported graph takes and gives, with this model's feature settings."""
    frontend = model.frontend
    spec = model.input_spec
    outputs: dict = {"outputs": dict(model.export_outputs)}
    if "log_probs" in model.export_outputs:
        outputs["blank_id"] = model.ctc.blank_id
    # Every family's token-indexed parameters have one row per token.
    parameters = dict(model.named_parameters())
    outputs["vocab_size"] = parameters[model.token_indexed_parameters()[0]].shape[0]
    if spec.kind == "waveform":
        info = frontend.info
        shortest = frontend.seconds_for_frames(model.encoder.min_input_frames)
        return {
            "format": fmt,
            "files": [p.name for p in files],
            "inputs": "audio (B, S) float32, audio_lens (B,) int64",
            "features": {
                "type": f"raw waveform into the {info.model_type} upstream (inside the graph)",
                "sample_rate": spec.sample_rate,
                "sample_scale": "samples in [-1, 1]",
                "normalised_in_graph": info.do_normalize,
                # Group-norm feature extractors and data2vec-audio see padding: batch
                # utterances of equal length, or one at a time, for exact results.
                "exact_for_padded_batches": frontend.exact_for_padded_batches,
            },
            "min_samples": round(shortest * spec.sample_rate),  # fewer gives no output
            **outputs,
        }
    return {
        "format": fmt,
        "files": [p.name for p in files],
        "inputs": "feats (B, T, F) float32, feat_lens (B,) int64",
        "features": {
            "type": "kaldi-compatible log-mel fbank (kaldi-native-fbank), no dither",
            "sample_rate": spec.sample_rate,
            "num_mel_bins": spec.fbank.num_mel_bins,
            "frame_length_ms": spec.fbank.frame_length_ms,
            "frame_shift_ms": spec.fbank.frame_shift_ms,
            "sample_scale": "samples in [-1, 1] times 32768 (16-bit range)",
            "cmvn_in_graph": bool(frontend.config.global_cmvn),  # feed fbank unnormalised
        },
        "min_frames": model.encoder.min_input_frames,  # fewer gives no output frame
        **outputs,
    }


def write_export_info(out_dir: Path, info: dict) -> None:
    (out_dir / "export.json").write_text(json.dumps(info, indent=1) + "\n")
