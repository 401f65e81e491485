"""Contextual and SeACo-Paraformer: training hotwords, the metrics contract, decoding
with a hotword list, the attention-score filter, and staged training that resumes."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    VOCAB,
    assert_same_run,
    deterministic_lines,
    kill_and_resume,
    make_batch,
    tiny_config,
    write_config,
)

from echoic.data.hotwords import (
    NO_BIAS,
    HotwordSamplingConfig,
    draw_span,
    hotword_tensors,
    phrase_tokens,
    sample_batch_hotwords,
)
from echoic.data.manifest import read_manifest, write_manifest
from echoic.data.tokenizer import BpeTokenizer, CharTokenizer
from echoic.decode.decoder import DecodeOptions, ScorerSettings, check_options
from echoic.decode.run import decode_manifest
from echoic.errors import ConfigError, EchoicError
from echoic.models.bias import BiasEncoder, expand_hotwords, filter_hotwords, merge_posteriors
from echoic.models.contract import TakesHotwords, check_step_output
from echoic.models.model import build_model
from echoic.score import read_hypotheses, score_texts
from echoic.train.config import load_experiment
from echoic.train.experiment import load_experiment_model
from echoic.train.trainer import Trainer

DECODER = {"num_layers": 1, "num_heads": 2, "ffn_dim": 64, "dropout": 0.0}
BIAS = {"num_layers": 1, "num_heads": 2, "ffn_dim": 64}
KINDS = ["seaco", "contextual"]
# ... and a SeACo-Paraformer whose hotword memory has one entry per hotword token.
MEMORIES = [*KINDS, "seaco:tokens", "seaco:copy"]


def _heads(kind: str) -> dict:
    return {
        "ctc": {"weight": 0.3},
        "paraformer": {"decoder": DECODER, "bias": _bias(kind)},
    }


def _bias(kind: str, **seaco) -> dict:
    """The bias section: the seaco decoder's size only where there is one; "kind:memory"
    also sets the memory."""
    kind, _, memory = kind.partition(":")
    section = {"kind": kind, **(seaco or BIAS)} if kind == "seaco" else {"kind": kind}
    if memory == "copy":  # the pointer posterior over a per-token memory
        return {**section, "memory": "tokens", "copy": True}
    return {**section, "memory": memory} if memory else section


def _with_hotwords(batch):
    """make_batch's tokens with a 2-entry hotword list: row 0's tokens 1-2 as its own
    hotword, row 1's first token as another's."""
    tokens = batch.tokens
    batch.hotwords, batch.hotword_lens = hotword_tensors(
        [tokens[0, 1:3].tolist(), tokens[1, :1].tolist()]
    )
    targets = torch.where(tokens >= 0, torch.full_like(tokens, NO_BIAS), tokens)
    targets[0, 1:3] = tokens[0, 1:3]
    batch.bias_targets = targets
    return batch


TEXTS = [
    "the other day the cat ran",
    "over the lazy dog",
    "a small cat sat down",
    "我们今天去公园散步",
]
IDS = ["u0", "u1", "u2", "u3"]


EVERY = HotwordSamplingConfig(rate=1.0, max_words=2)


def _sample(tokenizer, order, epoch=0, config=EVERY):
    tokens, lens = hotword_tensors([tokenizer.encode(TEXTS[i]) for i in order])
    return sample_batch_hotwords(
        [TEXTS[i] for i in order],
        [IDS[i] for i in order],
        tokens,
        lens,
        tokenizer,
        seed=7,
        epoch=epoch,
        config=config,
    )


def _whole_word_positions(tokenizer, text: str, phrases: list[str]) -> set[int]:
    """Token positions of every whole-word occurrence of the phrases, found on text."""
    from echoic.data.tokenizer import clean_text

    clean, ranges = clean_text(text), tokenizer.token_ranges(text)
    spaced = " " in clean
    found = set()
    for phrase in phrases:
        pattern = rf"(?<!\S){re.escape(phrase)}(?!\S)" if spaced else re.escape(phrase)
        for match in re.finditer(pattern, clean):
            found |= {
                i
                for i, (a, b) in enumerate(ranges)
                if a < b and a < match.end() and b > match.start()
            }
    return found


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_training_hotwords_are_a_pure_function_of_seed_epoch_and_utterance(kind):
    tokenizer = CharTokenizer.train(TEXTS) if kind == "char" else BpeTokenizer.train(TEXTS * 20, 60)
    first, again = _sample(tokenizer, [0, 1, 2, 3]), _sample(tokenizer, [0, 1, 2, 3])
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.bias_targets, again.bias_targets)
    listed = [tuple(row[row >= 0].tolist()) for row in first.tokens]
    assert len(listed) == len(TEXTS)  # every utterance gave one: its distractors are the rest
    # An utterance's hotword does not depend on the batch it is in.
    for i in range(len(TEXTS)):
        alone = _sample(tokenizer, [i])
        assert tuple(alone.tokens[0][alone.tokens[0] >= 0].tolist()) in listed
    # Every whole-word occurrence of every listed hotword is marked with its tokens
    # ("the" inside "other" is not), and nothing else.
    phrases = [tokenizer.decode(h) for h in listed]
    for row, text in enumerate(TEXTS):
        targets = first.bias_targets[row]
        marked = {int(i) for i in (targets > NO_BIAS).nonzero().flatten()}
        assert marked == _whole_word_positions(tokenizer, text, phrases), (text, phrases)
        encoded = tokenizer.encode(text)
        assert all(int(targets[i]) == encoded[i] for i in marked)
    # A new epoch draws anew; rate 0 draws nothing.
    assert [draw_span(t, i, 7, 1, HotwordSamplingConfig()) for t, i in zip(TEXTS, IDS)] != [
        draw_span(t, i, 7, 0, HotwordSamplingConfig()) for t, i in zip(TEXTS, IDS)
    ]
    assert draw_span(TEXTS[0], IDS[0], 7, 0, HotwordSamplingConfig(rate=0.0)) is None


def test_a_decode_time_hotword_has_the_tokens_training_saw_mid_sentence():
    tokenizer = BpeTokenizer.train(TEXTS * 20, 60)
    full, ranges = tokenizer.encode(TEXTS[3]), tokenizer.token_ranges(TEXTS[3])
    inside = [t for t, (a, b) in zip(full, ranges) if a < b and a < 7 and b > 5]  # 公园
    # sentencepiece starts "公园" alone with a lone word boundary that no span in
    # mid-sentence has.
    assert tokenizer.encode("公园") == [tokenizer.tokens.index("▁"), *inside]
    assert phrase_tokens(tokenizer, "公园") == inside
    char = CharTokenizer.train(TEXTS)
    assert phrase_tokens(char, "the cat") == char.encode("the cat")


@pytest.mark.parametrize("kind", MEMORIES)
def test_both_models_keep_the_metrics_contract(kind):
    torch.manual_seed(0)
    model = build_model(tiny_config(_heads(kind)), VOCAB)
    batch = _with_hotwords(make_batch())
    model.train()
    train = model(batch)
    check_step_output(model.metric_units, train)
    train.loss.backward()
    hotword_grads = [p.grad for n, p in model.named_parameters() if n.startswith("bias_encoder")]
    assert hotword_grads and all(g is not None and torch.isfinite(g).all() for g in hotword_grads)
    model.eval()
    with torch.no_grad():
        evaluation = model(batch)
    check_step_output(model.metric_units, evaluation)
    for name in model.metric_units:
        assert (train.metrics[name] is None) == (evaluation.metrics[name] is None), name
    assert ("loss_seaco" in model.metric_units) == kind.startswith("seaco")
    if kind.startswith("seaco"):
        assert evaluation.metrics["loss_seaco"].total > 0
        expected = sum(
            w * evaluation.metrics[k].total
            for k, w in [("loss_att", 1), ("loss_pre", 1), ("loss_ctc", 0.3), ("loss_seaco", 1)]
        )
        assert float(evaluation.loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", MEMORIES)
def test_every_parameter_gets_a_gradient_from_a_batch_without_hotwords(kind):
    """Distributed training needs a gradient for every parameter at every step, also
    when no utterance of a batch gave a hotword."""
    torch.manual_seed(0)
    model = build_model(tiny_config(_heads(kind)), VOCAB).train()
    batch = make_batch()
    batch.hotwords, batch.hotword_lens = hotword_tensors([])
    batch.bias_targets = torch.where(batch.tokens >= 0, NO_BIAS, batch.tokens)
    model(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_config_and_decoding_refuse_what_they_cannot_use():
    from echoic.config import from_dict
    from echoic.models.model import ModelConfig

    contextual = {"paraformer": {"bias": {"kind": "contextual", "merge_weight": 0.3}}}
    with pytest.raises(ConfigError, match="merge_weight set the seaco decoder"):
        from_dict(ModelConfig, contextual, "model")
    tokenizer = CharTokenizer.train(TEXTS[:3])
    from echoic.decode.decoder import with_scorer

    with pytest.raises(EchoicError, match="--hotword-boost is for the context graph"):
        with_scorer(
            DecodeOptions("paraformer"),
            ScorerSettings(hotwords=__file__, hotword_boost=2.0),
            tokenizer,
        )
    with pytest.raises(EchoicError, match="takes no word LM"):
        with_scorer(DecodeOptions("paraformer"), ScorerSettings(lm=__file__), tokenizer)


@pytest.mark.parametrize("kind", MEMORIES)
def test_an_empty_hotword_list_decodes_as_no_list(kind):
    torch.manual_seed(0)
    model = build_model(tiny_config(_heads(kind)), VOCAB).eval()
    batch = make_batch()
    encoded, lengths = model.encode(batch)
    plain = model.parallel_decode(encoded, lengths)
    empty = model.parallel_decode(encoded, lengths, hotword_tensors([]))
    assert [(d.tokens, d.score) for d in plain] == [(d.tokens, d.score) for d in empty]
    listed = model.parallel_decode(encoded, lengths, hotword_tensors([[3, 4], [5]]))
    assert len(listed) == len(plain)
    check_options(model, DecodeOptions("paraformer", hotwords=((3, 4),)))
    plain_model = build_model(tiny_config({"paraformer": {"decoder": DECODER}}), VOCAB)
    with pytest.raises(EchoicError, match="needs a contextual or SeACo-Paraformer"):
        check_options(plain_model, DecodeOptions("paraformer", hotwords=((3, 4),)))


def test_a_per_token_memory_has_an_entry_per_hotword_token_and_sums_them_per_hotword():
    torch.manual_seed(0)
    hotwords, lens = hotword_tensors([[3, 4, 5], [6]])
    last = BiasEncoder(VOCAB, 8)(hotwords, lens)
    assert last.entries.shape == (3, 8) and last.owner.tolist() == [0, 1, 2]
    per_token = BiasEncoder(VOCAB, 8, per_token=True)
    per_token.load_state_dict(BiasEncoder(VOCAB, 8).state_dict())  # same parameters
    memory = per_token(hotwords, lens)
    # no-bias, then 3 entries per hotword (its padded width); the second's last two pad.
    assert memory.owner.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert memory.valid.tolist() == [True, True, True, True, True, False, False]
    # An entry is the LSTM's state after that token, so a hotword's last entry is what
    # the one-entry memory holds.
    reference = BiasEncoder(VOCAB, 8)
    reference.load_state_dict(per_token.state_dict())
    torch.testing.assert_close(memory.entries[3], reference(hotwords, lens).entries[1])
    weights = torch.tensor([[[0.1, 0.2, 0.3, 0.1, 0.3, 0.0, 0.0]]])
    torch.testing.assert_close(memory.per_hotword(weights), torch.tensor([[[0.1, 0.6, 0.3]]]))
    # Filtering a hotword masks all its entries; padding stays masked.
    _, mask = expand_hotwords(memory, 2, torch.tensor([[True, False, True], [True, True, True]]))
    assert mask[:, 0, 0].tolist() == [
        [True, False, False, False, True, False, False],
        [True, True, True, True, True, False, False],
    ]


def test_the_attention_score_filter_drops_hotwords_attention_never_picks():
    # 2 utterances, 3 positions (the second has 2), no-bias + 3 hotwords.
    weights = torch.tensor(
        [
            [[0.7, 0.1, 0.15, 0.05], [0.2, 0.6, 0.1, 0.1], [0.9, 0.05, 0.05, 0.0]],
            [[0.5, 0.1, 0.1, 0.3], [0.8, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0]],
        ]
    )
    counts = torch.tensor([3, 2])
    keep = filter_hotwords(weights, counts, threshold=0.2, max_kept=10)
    # Utterance 0: hotword 1 peaks at 0.6, hotwords 2 (0.15) and 3 (0.1) stay below.
    # Utterance 1: hotword 3 peaks at 0.3; its 1.0 lies at a padded position.
    assert keep.tolist() == [[True, True, False, False], [True, False, False, True]]
    assert filter_hotwords(weights, counts, 0.0, max_kept=1).tolist() == [
        [True, True, False, False],
        [True, False, False, True],
    ]
    # The merge: where the hotword posterior names a token, it is mixed in; where its
    # best is NO_BIAS, the ASR posterior stands.
    asr = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]]]))
    bias = torch.log(torch.tensor([[[0.8, 0.05, 0.15], [0.1, 0.1, 0.8]]]))
    merged = merge_posteriors(asr, bias, merge_weight=0.5).exp()
    torch.testing.assert_close(merged[0, 0], torch.tensor([0.1, 0.6, 0.3]))
    assert merged[0, 1].argmax() == 2


def test_a_contextual_model_needs_training_hotwords(tmp_path, corpus, lang):
    with pytest.raises(ConfigError, match=r"set data\.hotwords"):
        load_experiment(write_config(tmp_path, corpus, lang, **_seaco_experiment("seaco", 0)))
    with pytest.raises(ConfigError, match=r"data\.hotwords is for a model with"):
        load_experiment(write_config(tmp_path, corpus, lang, data={"hotwords": {"rate": 0.5}}))


def _seaco_experiment(kind: str, rate: float | None = 0.8, **sections) -> dict:
    experiment = {
        "model": {
            "encoder": {"conformer": {"d_model": 32, "num_layers": 1, "num_heads": 2,
                                      "ffn_dim": 64, "conv_kernel": 5}},
            "ctc": None,
            "attention": None,
            "paraformer": {"decoder": DECODER, "bias": _bias(kind)},
        },
        "data": {"speed_perturb": [1.0], **({"hotwords": {"rate": rate}} if rate else {})},
    }  # fmt: skip
    for key, value in sections.items():
        experiment[key] = {**experiment.get(key, {}), **value} if key == "data" else value
    return experiment


# The staged recipe's stages (stage 1: the ASR part with the hotword modules frozen;
# stage 2: only the hotword modules), 4 steps each.
RECIPE = Path(__file__).parents[1] / "recipes/synth_seaco/conf/ft_staged.yaml"
_recipe = yaml.safe_load(RECIPE.read_text())
STAGES = {
    "stages": [{**stage, "steps": 4, "warmup_steps": 2} for stage in _recipe["stages"]],
    "freeze_mode": _recipe["freeze_mode"],
    "train": {"max_steps": 100, "save_every_steps": 2, "keep_last": 10, "valid_every": 4},
}


@pytest.mark.slow
def test_a_seaco_run_killed_in_stage_2_resumes_bit_identically(tmp_path, corpus, lang):
    def trainer(name):
        config = write_config(tmp_path / name, corpus, lang, **_seaco_experiment("seaco", **STAGES))
        return Trainer(load_experiment(config), tmp_path / name / "exp", progress=False)

    assert trainer("reference").run() == 0
    kill_and_resume(lambda: trainer("resumed"), "7:1")
    assert_same_run(tmp_path / "resumed" / "exp", tmp_path / "reference" / "exp")
    reference = deterministic_lines(tmp_path / "reference" / "exp")
    lines = [json.loads(line) for line in reference]
    assert {"loss_seaco", "stage"} <= set(lines[0])
    assert [r["stage"] for r in lines if r["split"] == "train"] == [1] * 4 + [2] * 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_both_models_overfit_20_utterances_and_take_a_hotword_list(tmp_path, corpus, lang, kind):
    shortest = sorted(read_manifest(corpus / "train.jsonl").utterances, key=lambda u: u.duration)
    few = shortest[:20]
    manifest = tmp_path / "few.jsonl"
    write_manifest(manifest, few)
    config = write_config(
        tmp_path,
        corpus,
        lang,
        data={"train": str(manifest), "dev": None, "max_frames": 10**6, "num_buckets": 1,
              "speed_perturb": [1.0], "spec_augment": None, "feature_cache": True,
              "hotwords": {"rate": 0.8}},
        model={
            "encoder": {"conformer": {"d_model": 64, "num_layers": 2, "num_heads": 4,
                                      "ffn_dim": 128, "conv_kernel": 7, "dropout": 0.0}},
            "ctc": {"weight": 0.3},
            "attention": None,
            "paraformer": {"decoder": {"num_layers": 1, "num_heads": 4, "ffn_dim": 128,
                                       "dropout": 0.0},
                           "cif": {"dropout": 0.0}, "label_smoothing": 0.0,
                           "bias": _bias(kind, num_layers=1, num_heads=4, ffn_dim=128)},
        },
        optim={"lr": 0.005, "scheduler": "constant", "warmup_steps": 0},
        train={"max_steps": 200, "max_epochs": None, "accum_grad": 1, "log_every": 25,
               "valid_every": None, "save_every_steps": 200},
    )  # fmt: skip
    exp = tmp_path / "exp"
    assert Trainer(load_experiment(config), exp, progress=False).run() == 0
    references = {u.id: u.text for u in few}
    hotwords = tmp_path / "hotwords.txt"
    # A word of each of 5 utterances, and 20 that none of them says.
    words = [max(u.text.split(), key=len) for u in few[:5]]
    # Absent words are spelt from the corpus's own letters: an unknown letter is an error.
    letters = sorted(set("".join(references.values())) - {" "})
    absent = ["".join(letters[(i + 7 * k) % len(letters)] for k in range(5)) for i in range(20)]
    assert not any(w in text for w in absent for text in references.values())
    hotwords.write_text("".join(f"{w}\n" for w in words + absent))
    rates = {}
    for name, listed in (("plain", None), ("listed", hotwords)):
        out = tmp_path / name
        decode_manifest(
            exp,
            manifest,
            out,
            DecodeOptions("paraformer"),
            scorer=ScorerSettings(hotwords=listed),
            progress=False,
        )
        rates[name] = score_texts(references, read_hypotheses(out / "hyp.jsonl")).chars.rate
    # Measured at 200 steps: CER 0.109 (SeACo), below the plain Paraformer test's 0.1 bar
    # at 150 steps: the hotword loss shares the ASR part's gradient (0.0985 at 300 steps).
    assert rates["plain"] < 0.15, rates
    # The list (mostly words no utterance says) does not derail decoding.
    assert rates["listed"] < rates["plain"] + 0.05, rates
    model, _, _ = load_experiment_model(exp)
    assert isinstance(model, TakesHotwords)
    with pytest.raises(EchoicError, match="takes no hotword list"):  # not silently dropped
        decode_manifest(
            exp,
            manifest,
            tmp_path / "onnx",
            DecodeOptions("paraformer"),
            scorer=ScorerSettings(hotwords=hotwords),
            runtime="onnx",
        )
