import json

import numpy as np

from echoic.cli import main
from echoic.data.features import CmvnStats
from echoic.data.manifest import Utterance, read_manifest, write_manifest
from echoic.data.tokenizer import load_tokenizer


def test_prepare_char(corpus, tmp_path, capsys):
    out = tmp_path / "lang"
    odd = tmp_path / "odd.jsonl"
    dev = read_manifest(corpus / "dev.jsonl").utterances[0]
    write_manifest(odd, [Utterance("x", dev.audio, "naïve café", dev.duration)])
    train = str(corpus / "train.jsonl")
    args = ["prepare", "--manifest", train, "--tokenizer", "char", "--out", str(out)]
    assert main([*args, "--report-on", str(odd), "--jobs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "char tokenizer" in printed and "odd.jsonl: 2 of 10 tokens map to <unk>" in printed
    tokenizer = load_tokenizer(out / "tokenizer.json")
    train = read_manifest(corpus / "train.jsonl")
    assert all(tokenizer.decode(tokenizer.encode(u.text)) == u.text for u in train.utterances)
    stats = CmvnStats.load(out / "cmvn.json")
    assert stats.fbank.num_mel_bins == 80 and stats.count > 1000
    assert np.all(stats.std > 0)
    report = json.loads((out / "prepare.json").read_text())
    assert report["unknown"][0]["unknown_chars"] == 0
    assert report["unknown"][1]["top_unknown"] == {"ï": 1, "é": 1}


def test_prepare_bpe(corpus, tmp_path):
    out = tmp_path / "bpe"
    assert (
        main(
            [
                "prepare",
                "--manifest",
                str(corpus / "train.jsonl"),
                "--tokenizer",
                "bpe",
                "--vocab-size",
                "60",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size <= 60


def test_prepare_errors_are_one_line(tmp_path, capsys):
    assert (
        main(["prepare", "--manifest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.strip() == f"echoic: error: manifest not found: {tmp_path / 'missing.jsonl'}"
