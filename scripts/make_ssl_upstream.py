"""Save a randomly initialised HuggingFace SSL model (wav2vec2, HuBERT, WavLM or
data2vec-audio) in HuggingFace format: a stand-in upstream for recipes and benchmarks
until echoic pretrains its own. Real conv strides (20 ms frames at 16 kHz), everything
else as given. Nothing is downloaded.

    .venv/bin/python scripts/make_ssl_upstream.py --out data/ssl_upstream --hidden 144
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

CLASSES = {
    "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
    "hubert": (transformers.HubertConfig, transformers.HubertModel),
    "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
    "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (config.json, weights)")
    parser.add_argument("--type", choices=list(CLASSES), default="wav2vec2")
    parser.add_argument("--hidden", type=int, default=144, help="hidden size")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--conv-dim", type=int, default=32, help="feature extractor channels")
    parser.add_argument(
        "--norm",
        choices=["group", "layer"],
        default="group",
        help="feature extractor norm (group: as wav2vec2-base)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "config.json").is_file():
        print(f"{out} exists: kept")
        return
    config_class, model_class = CLASSES[args.type]
    settings = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.hidden,
        "conv_dim": (args.conv_dim,) * 7,
    }
    if args.type == "data2vec-audio":  # there: the number of positional conv layers
        settings.update(num_conv_pos_embeddings=5, conv_pos_kernel_size=19)
    else:
        settings.update(
            num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4, feat_extract_norm=args.norm
        )
    torch.manual_seed(args.seed)
    model = model_class(config_class(**settings))
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(out), "type": args.type, "params_m": round(params / 1e6, 3)}))


if __name__ == "__main__":
    main()
