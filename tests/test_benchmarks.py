"""The benchmark scripts' own logic: peer rows, agreement checks, WeNet rows (no timing)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """benchmarks/ is not a package: load a script as a module by its path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rnnt_rows_agree_with_echoic_on_unequal_lengths():
    bench = _load("rnnt_loss")
    check = bench.agreement(["rowscan", "echoic_unfused"])
    for name, diffs in check.items():
        assert diffs["loss_diff"] < bench.LOSS_TOLERANCE, name
        assert diffs["grad_max_diff"] < bench.GRAD_TOLERANCE, name


def test_rnnt_row_that_raises_on_the_check_batch_is_reported(monkeypatch):
    bench = _load("rnnt_loss")

    def asserts(*args):
        raise AssertionError("tensor([7, 3, 0, 2])")

    monkeypatch.setitem(bench.IMPLEMENTATIONS, "fast_rnnt", asserts)
    check = bench.agreement(["fast_rnnt", "rowscan"])
    assert check["fast_rnnt"] == {"error": "AssertionError: tensor([7, 3, 0, 2])"}
    assert check["rowscan"]["loss_diff"] < bench.LOSS_TOLERANCE


def test_rnnt_missing_peer_gives_the_import_error(monkeypatch):
    bench = _load("rnnt_loss")
    monkeypatch.setitem(bench.PEERS, "fast_rnnt", "no_such_module_for_echoic_tests")
    assert bench.missing_peer("fast_rnnt").startswith("ModuleNotFoundError: No module named")
    assert bench.missing_peer("rowscan") is None


@pytest.mark.slow
def test_rnnt_benchmark_skips_a_missing_peer_and_keeps_its_keys(tmp_path):
    # a stand-in that fails to import hides whichever peer build may be installed here
    (tmp_path / "fast_rnnt.py").write_text("raise ImportError('built against another torch')\n")
    command = [sys.executable, str(BENCHMARKS / "rnnt_loss.py"), "--impls", "rowscan,fast_rnnt"]
    command += ["--B", "1", "--T", "4", "--U", "2", "--V", "5", "--rounds", "1", "--repeats", "1"]
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["skipped"] == {"fast_rnnt": "ImportError: built against another torch"}
    for key in ("echoic_ms", "rowscan_ms", "speed_ratio", "memory_ratio", "rowscan_loss_per_utt"):
        assert key in result
    assert "fast_rnnt_ms" not in result
    assert abs(result["echoic_loss_per_utt"] - result["rowscan_loss_per_utt"]) < 1e-3


FAKE_ANCHOR = """
import torch

CONFIG_12x256 = {"input_size": 80}


class Fake(torch.nn.Module):
    def __init__(self, input_size, use_sdpa, **config):
        super().__init__()
        self.use_sdpa = use_sdpa
        self.config = config


def load_conformer_encoder(root):
    return Fake, "fake", []
"""


@pytest.mark.parametrize(("row", "use_sdpa"), [("wenet", False), ("wenet_sdpa", True)])
def test_encoder_wenet_rows_set_use_sdpa(tmp_path, monkeypatch, row, use_sdpa):
    bench = _load("encoder")
    (tmp_path / "wenet_import.py").write_text(FAKE_ANCHOR)
    monkeypatch.setattr(sys, "path", list(sys.path))  # build() prepends the anchors folder
    monkeypatch.delitem(sys.modules, "wenet_import", raising=False)
    args = argparse.Namespace(anchors=str(tmp_path), wenet_root=str(tmp_path), positional="rel_pos")
    assert bench.build(row, args).use_sdpa is use_sdpa
    assert bench.build(row, args).config == {}  # the anchor's own rel_pos config
    args.positional = "rope"  # WeNet's rotary attention, the same model as echoic's rope
    assert bench.build(row, args).config == {
        "pos_enc_layer_type": "rope_pos",
        "selfattention_layer_type": "rope_abs_selfattn",
    }
    assert row in bench.SDPA_MODES["both"]
    assert bench.split_row(row + "_bf16") == (row, "bf16")
    assert bench.split_row(row) == (row, "fp32")


def test_encoder_summary_states_the_headline_and_best_against_best(monkeypatch, capsys):
    """Rows alternate per round; the headline is echoic fp32 over WeNet fp32, and
    best-vs-best names each side's fastest row (here WeNet's bf16 with use_sdpa)."""
    bench = _load("encoder")
    step_s = {"echoic": 4.0, "wenet": 5.0, "wenet_sdpa": 4.8, "echoic_bf16": 2.0}
    step_s.update(wenet_bf16=3.0, wenet_sdpa_bf16=2.5)
    order = []

    def run(row, args, extra):
        order.append(row)
        return {"frames_per_s": 0, "peak_mb": 100.0, "params_m": 20.0, "step_s": [step_s[row]]}

    monkeypatch.setattr(bench, "_run", run)
    argv = ["encoder.py", "--wenet-root", "W", "--precision", "fp32,bf16", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads(capsys.readouterr().out)
    assert order == list(step_s) * 2
    assert result["speedup"] == 1.25 and result["speedup_sdpa"] == 1.2
    assert (result["best_echoic"], result["best_wenet"]) == ("echoic_bf16", "wenet_sdpa_bf16")
    assert result["best_speedup"] == 1.25
    assert result["rows"]["echoic"]["frames_per_s_min"] == 2000.0


def test_encoder_recipe_rows_measure_the_recipes_conformer():
    bench = _load("encoder")
    recipe = BENCHMARKS.parent / "recipes" / "synth_en" / "conf" / "demo.yaml"
    args = argparse.Namespace(recipe=str(recipe), checkpointing=False, positional="rel_pos")
    encoder = bench.build("echoic", args)
    assert (encoder.output_dim, len(encoder.blocks), encoder.positional) == (96, 4, "rope")


def test_ssl_rank_reports_every_stage_of_an_upstream(tmp_path):
    import torch
    from conftest import save_tiny_upstream

    folder = save_tiny_upstream(tmp_path / "hubert", "hubert", 32)
    generator = torch.Generator().manual_seed(0)
    waveforms = [torch.randn(n, generator=generator) * 0.1 for n in (16000, 9000)]
    row = _load("ssl_rank").stage_ranks(str(folder), waveforms)
    stages = row["stages"]
    assert list(stages)[:3] == ["conv_extractor", "projection", "positional_conv"]
    assert [name for name in stages if name.startswith("hidden_")] == [
        "hidden_0",
        "hidden_1",
        "hidden_2",
    ]
    assert row["frames"] == 49 + 27  # 20 ms frames (25 ms window) of 1 s and 0.5625 s
    for stage in stages.values():
        assert 1.0 <= stage["effective_rank"] <= stage["width"] and stage["rms"] > 0
    json.dumps(row)  # printable as it is
