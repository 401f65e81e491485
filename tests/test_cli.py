import subprocess
import sys

import pytest

from echoic import __version__
from echoic.cli import main


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "echoic", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("synth", "import", "prepare"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["synth", "import", "prepare"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "usage: echoic" in capsys.readouterr().out


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["transcribe-everything"])
    assert exited.value.code == 2


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse rewraps: compare words


def test_export_help_says_what_each_format_takes_and_writes(capsys):
    from echoic.decode.export import ONNX_FILE, ONNX_INT8_FILE, TORCHSCRIPT_FILE

    text = _help("export", capsys)
    # The file names export writes, from the constants it writes them with.
    for name in (ONNX_FILE, ONNX_INT8_FILE, TORCHSCRIPT_FILE):
        assert f"OUT/{name}" in text, name
    for words in (
        "feats (B, T, F) float32 log-mel fbank, NOT normalised",
        "feat_lens (B,) int64",
        "log_probs (B, T', V) float32 CTC log-probabilities, blank id 0",
        "out_lens (B,) int64",
        "kaldi-native-fbank at the model's sample rate",
        "scaled by 32768",
        "Global CMVN from `echoic prepare` is inside the graph",
        "OUT/export.json records the exact settings",
    ):
        assert words in text, words


def test_decode_help_says_what_is_batched_and_what_the_rtfs_count(capsys):
    text = _help("decode", capsys)
    for words in (
        "go through the encoder together; the search then runs per utterance",
        "end to end, audio file to text (reading, resampling, fbank, encoder, search)",
        "model only (encoder + search)",
        "--workers",
    ):
        assert words in text, words


def test_average_best_says_why_it_has_nothing_to_average(tmp_path, capsys):
    """`average --best` names the real cause: no dev results, a metric the run does not
    record (with the ones it does), or no kept checkpoint with a dev result."""
    import json

    exp = tmp_path / "exp"
    for step in (4, 6):
        (exp / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    metrics = exp / "metrics.jsonl"
    metrics.write_text(json.dumps({"split": "train", "step": 2, "loss": 3.0}) + "\n")
    assert main(["average", "--exp", str(exp), "--best", "2"]) == 2
    assert "has none (train with data.dev); use --last" in capsys.readouterr().err
    dev = {"split": "dev", "step": 2, "epoch": 0, "loss": 1.5, "th_accuracy": 0.25}
    metrics.write_text(json.dumps(dev) + "\n")
    assert main(["average", "--exp", str(exp), "--best", "2", "--metric", "wer"]) == 2
    assert "--metric wer: this run's dev results have no such metric; they record loss, " \
        "th_accuracy" in capsys.readouterr().err  # fmt: skip
    assert main(["average", "--exp", str(exp), "--best", "2"]) == 2
    error = capsys.readouterr().err
    assert "none of the checkpoints with a dev result is kept" in error
    assert "(2 kept: step-00000004, step-00000006); use --last" in error


def test_plot_of_a_folder_that_is_no_experiment_says_so(tmp_path, capsys):
    assert main(["plot", "--exp", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"echoic: error: {tmp_path / 'nope'} is not an experiment folder (no config.yaml)"
