"""How many directions an SSL upstream's features use, stage by stage: the effective rank
(echoic.train.probe.effective_rank) and RMS of the conv extractor's output, the
projection, the positional convolution's contribution and every hidden state, over the
first utterances of a manifest. A random upstream uses most of its width; a collapsed
pretraining run (recipes/synth_hubert/README.md) uses one or two directions. Prints one
JSON line per folder.

    python benchmarks/ssl_rank.py --manifest data/hubert/probe_train.jsonl \\
        exp/hubert_random/hf exp/hubert_it1/hf
"""

from __future__ import annotations

import argparse
import json

import torch

from echoic.data.audio import load_audio
from echoic.data.manifest import read_manifest
from echoic.models.ssl import _normalize, load_upstream, read_upstream
from echoic.train.probe import effective_rank


def _rms(frames: list[torch.Tensor]) -> float:
    return float(torch.cat(frames).square().mean().sqrt())


@torch.no_grad()
def stage_ranks(folder: str, waveforms: list[torch.Tensor]) -> dict:
    """Effective rank and RMS of each stage of the upstream in `folder`, each utterance
    run alone (no padding), frames of all utterances together."""
    info = read_upstream(folder, hash_files=False)
    model = load_upstream(info).eval()
    stages: dict[str, list[torch.Tensor]] = {}
    for audio in waveforms:
        audio = audio[None]
        if info.do_normalize:
            audio = _normalize(audio, torch.tensor([audio.shape[1]]))
        extracted = model.feature_extractor(audio).transpose(1, 2)
        projected = model.feature_projection(extracted)
        projected = projected[0] if isinstance(projected, tuple) else projected
        out = model(audio, output_hidden_states=True)
        named = {
            "conv_extractor": extracted,
            "projection": projected,
            "positional_conv": model.encoder.pos_conv_embed(projected),
            **{f"hidden_{i}": h for i, h in enumerate(out.hidden_states)},
        }
        for name, frames in named.items():
            stages.setdefault(name, []).append(frames[0].float())
    return {
        "folder": folder,
        "utterances": len(waveforms),
        "frames": sum(len(f) for f in stages["projection"]),
        "stages": {
            name: {
                "width": frames[0].shape[1],
                "effective_rank": round(effective_rank(frames), 2),
                "rms": round(_rms(frames), 4),
            }
            for name, frames in stages.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="HuggingFace-format upstream folders")
    parser.add_argument("--manifest", required=True, help="utterances to run (the first N)")
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = list(read_manifest(args.manifest).utterances)[: args.utterances]
    waveforms = [torch.from_numpy(load_audio(u.audio, sample_rate=16000)) for u in chosen]
    for folder in args.folders:
        print(json.dumps(stage_ranks(folder, waveforms)), flush=True)


if __name__ == "__main__":
    main()
