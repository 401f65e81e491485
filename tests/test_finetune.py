"""Fine-tuning: names, freezing, stages that resume exactly, per-module learning rates,
initialisation from checkpoints (renamed prefixes, shape mismatches, a new vocabulary)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_run,
    deterministic_lines,
    final_weights,
    kill_and_resume,
    write_config,
)
from safetensors.torch import load_file, save_file

from echoic.data.tokenizer import load_tokenizer
from echoic.errors import ConfigError
from echoic.train.checkpoint import list_checkpoints
from echoic.train.config import load_experiment
from echoic.train.distributed import unwrap
from echoic.train.plot import plot_curves
from echoic.train.stages import name_matches
from echoic.train.trainer import Trainer

# Two stages of 4 steps (2 micro-batches each): first everything but the attention
# decoder, then the attention decoder alone, at a restarted schedule.
STAGES = {
    "stages": [
        {"name": "asr", "steps": 4, "freeze": ["attention"]},
        {"name": "decoder", "steps": 4, "train_only": ["attention"], "lr": 0.004},
    ],
    "train": {"max_steps": 100, "save_every_steps": 2, "keep_last": 10, "valid_every": 4},
    "data": {"speed_perturb": [1.0]},
    # BatchNorm statistics of frozen modules stay fixed too (the default, train, lets
    # forward passes update them, as torch does)
    "freeze_mode": "eval",
}


def _trainer(tmp_path: Path, corpus, lang, name: str = "exp", **sections) -> Trainer:
    config = load_experiment(write_config(tmp_path / f"{name}-config", corpus, lang, **sections))
    return Trainer(config, tmp_path / name, progress=False)


def _checkpoint(exp: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(exp / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


@pytest.fixture(scope="module")
def staged(tmp_path_factory, corpus, lang) -> Path:
    """An uninterrupted two-stage run, and its starting weights (a 0-step run)."""
    base = tmp_path_factory.mktemp("staged")
    start = {**STAGES, "train": {**STAGES["train"], "max_steps": 0}}
    assert _trainer(base, corpus, lang, "start", **start).run() == 0
    assert _trainer(base, corpus, lang, **STAGES).run() == 0
    return base


def test_a_name_is_a_parameter_or_a_dotted_prefix_with_one_part_globs():
    assert name_matches("encoder", "encoder.layers.0.w")
    assert name_matches("encoder.layers.0.w", "encoder.layers.0.w")
    assert not name_matches("encoder", "encoder_proj.w")
    assert not name_matches("encoder.layers.1", "encoder.layers.10.w")
    assert name_matches("encoder.layers.*.conv", "encoder.layers.3.conv.pointwise.weight")
    assert not name_matches("encoder.layers.*.conv", "encoder.layers.3.conv_norm.weight")
    assert not name_matches("encoder.*", "encoder")


def test_names_that_select_nothing_and_unknown_keys_are_one_line_errors(tmp_path, corpus, lang):
    with pytest.raises(ConfigError) as error:
        _trainer(tmp_path, corpus, lang, freeze=["encodr"])._setup()
    message = str(error.value)
    assert (
        "'freeze': 'encodr' names no parameter" in message and "did you mean 'encoder'" in message
    )
    assert "frontend, encoder, ctc, attention" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"'lr_scale': 'encoder_proj' names no parameter"):
        _trainer(tmp_path, corpus, lang, lr_scale={"encoder_proj": 0.5})._setup()
    with pytest.raises(ConfigError, match=r"'stages\[1\].train_only': 'atention'.*'attention'"):
        stages = [{"steps": 2}, {"train_only": ["atention"]}]
        _trainer(tmp_path, corpus, lang, stages=stages)._setup()
    for sections, expected in (
        ({"stages": [{"step": 2}]}, r"unknown key 'stages\[0\].step'; did you mean 'steps'"),
        ({"init": {"checkpoint": "x", "strcit": True}}, r"'init.strcit'; did you mean 'strict'"),
        ({"lr_scale": {"ctc": "high"}}, r"'lr_scale.ctc' must be float"),
        ({"freeze": "encoder"}, r"'freeze' must be a list"),
        ({"stages": [{"steps": 2, "freeze": ["ctc"], "train_only": ["ctc"]}]}, "not both"),
        ({"stages": [{"name": "a"}, {"steps": 2}]}, r"stages\[0\] needs steps or epochs"),
    ):
        with pytest.raises(ConfigError, match=expected) as error:
            load_experiment(write_config(tmp_path, corpus, lang, **sections))
        assert "\n" not in str(error.value)


def test_each_stage_trains_only_its_parameters_and_says_so(staged):
    exp = staged / "exp"
    start, end1, end2 = (
        final_weights(staged / "start"),
        _checkpoint(exp, 4),
        _checkpoint(exp, 8),
    )
    attention = [k for k in start if k.startswith("attention.")]
    rest = [k for k in start if not k.startswith("attention.") and "cmvn" not in k]
    assert all(torch.equal(start[k], end1[k]) for k in attention)  # frozen in stage 1
    assert not all(torch.equal(start[k], end1[k]) for k in rest)
    assert all(torch.equal(end1[k], end2[k]) for k in rest)  # frozen in stage 2
    assert not all(torch.equal(end1[k], end2[k]) for k in attention)
    saved = [path.name for path in list_checkpoints(exp / "checkpoints")]
    assert saved[-1] == "step-00000008"  # the run ends with its last stage
    lines = [json.loads(line) for line in deterministic_lines(exp)]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["stage"] for r in train] == [1] * 4 + [2] * 4
    # Stage 2's schedule restarts: its first step is the noam warmup's first, at 0.004.
    assert train[4]["lr"] == pytest.approx(0.004 * 5**0.5 * 5**-1.5)
    assert {r["stage"] for r in lines if r["split"] == "dev"} == {1, 2}
    assert plot_curves(exp).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["7:1", "5:0"])  # inside stage 2; just after its start
def test_a_run_killed_in_stage_2_resumes_bit_identically(tmp_path, corpus, lang, staged, kill_at):
    # 7:1 resumes from step 6, inside stage 2; 5:0 from step 4, stage 1's last, saved
    # before the optimizer of stage 2 existed.
    kill_and_resume(lambda: _trainer(tmp_path, corpus, lang, **STAGES), kill_at)
    assert_same_run(tmp_path / "exp", staged / "exp")


def test_lr_scale_makes_param_groups_and_freeze_mode_eval_fixes_modules(tmp_path, corpus, lang):
    trainer = _trainer(
        tmp_path,
        corpus,
        lang,
        lr_scale={"encoder.blocks.0": 0.5, "encoder": 0.25, "ctc": 0.1},
        freeze=["attention.decoder.layers.*.ff"],
        freeze_mode="eval",
        train={"max_steps": 1},
    )
    assert trainer.run() == 0  # one step
    model = unwrap(trainer.model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {n: g["lr_scale"] for n, g in groups.items()} == {
        "model": 1.0,
        "model:encoder": 0.25,
        "model:encoder.blocks.0": 0.5,  # the most specific name wins
        "model:ctc": 0.1,
    }
    assert all(names[id(p)].startswith("ctc.") for p in groups["model:ctc"]["params"])
    in_optimizer = {names[id(p)] for g in groups.values() for p in g["params"]}
    assert not any(".ff." in n and n.startswith("attention.") for n in in_optimizer)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(trainer.config.optim.lr / 5 * group["lr_scale"])
    # metrics.jsonl logs the schedule's rate, not the first group's scaled one
    (line,) = [json.loads(x) for x in deterministic_lines(tmp_path / "exp") if '"train"' in x]
    assert trainer.optimizer.param_groups[0]["lr_scale"] != 1.0
    assert line["lr"] == pytest.approx(trainer.config.optim.lr / 5)
    trainer._train_mode()
    assert not model.attention.decoder.layers[0].ff.training
    assert model.attention.decoder.layers[0].self_attn.training


def test_init_with_a_renamed_prefix_loads_everything_and_writes_its_table(
    tmp_path, corpus, lang, staged
):
    source = final_weights(staged / "exp")
    renamed = {("enc." + k[8:] if k.startswith("encoder.") else k): v for k, v in source.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    init = {"checkpoint": str(tmp_path / "renamed.safetensors"), "rename": {"enc": "encoder"}}
    trainer = _trainer(tmp_path, corpus, lang, init=init)
    trainer._setup()
    loaded = unwrap(trainer.model).state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    table = (tmp_path / "exp" / "init.txt").read_text()
    assert "encoder" in table and "mismatched:" not in table and "missing:" not in table
    # An experiment folder: its best checkpoint by dev loss.
    trainer = _trainer(tmp_path, corpus, lang, "exp2", init={"checkpoint": str(staged / "exp")})
    trainer._setup()
    assert "best dev value" in (tmp_path / "exp2" / "init.txt").read_text()


def test_init_with_a_shape_mismatch_fails_strict_and_loads_the_rest_otherwise(
    tmp_path, corpus, lang, staged
):
    smaller = {"model": {"attention": {"ffn_dim": 32}}}
    init = {"checkpoint": str(staged / "exp")}
    with pytest.raises(ConfigError) as error:
        _trainer(tmp_path, corpus, lang, init=init, **smaller)._setup()
    assert "shape-mismatched (first attention.decoder.layers.0.ff" in str(error.value)
    assert "init.strict: false" in str(error.value)
    assert "mismatched: attention" in (tmp_path / "exp" / "init.txt").read_text()
    trainer = _trainer(tmp_path, corpus, lang, "exp2", init={**init, "strict": False}, **smaller)
    trainer._setup()
    source, loaded = final_weights(staged / "exp"), unwrap(trainer.model).state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source if k.startswith("encoder."))
    assert not torch.equal(loaded["ctc.proj.weight"], torch.zeros_like(loaded["ctc.proj.weight"]))
    assert all(torch.equal(loaded[k], source[k]) for k in source if k.startswith("ctc."))


def test_init_with_another_vocabulary_moves_the_rows_of_kept_tokens(tmp_path, corpus, lang, staged):
    old = load_tokenizer(lang / "tokenizer.json")
    dropped = old.tokens[5]
    tokens = [*old.tokens[:5], *old.tokens[6:-1], "@", "#", old.tokens[-1]]
    new_lang = tmp_path / "lang"
    new_lang.mkdir()
    (new_lang / "tokenizer.json").write_text(json.dumps({"type": "char", "tokens": tokens}))
    (new_lang / "cmvn.json").write_text((lang / "cmvn.json").read_text())
    trainer = _trainer(
        tmp_path,
        corpus,
        lang,
        init={"checkpoint": str(staged / "exp")},
        data={"lang": str(new_lang)},
    )
    trainer._setup()
    source, loaded = final_weights(staged / "exp"), unwrap(trainer.model).state_dict()
    for key in ("ctc.proj.weight", "attention.decoder.embed.weight", "attention.decoder.out.bias"):
        for new_id, token in enumerate(tokens):
            if token in old.tokens:
                assert torch.equal(loaded[key][new_id], source[key][old.tokens.index(token)])
        assert loaded[key].shape[0] == len(tokens) == len(old.tokens) + 1
    table = (tmp_path / "exp" / "init.txt").read_text()
    assert f"vocabulary changed: {len(tokens) - 2} of {len(tokens)} tokens kept" in table
    assert '2 new re-initialised ("@", "#")' in table and dropped not in ("@", "#")
