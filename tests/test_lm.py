"""The word LM for character searches: exact scores, OOV handling, a misspelling
pulled back to a word, combination with hotwords, the CLI."""

import itertools
import json
import math

import pytest
import torch

from echoic.cli import main
from echoic.data.tokenizer import CharTokenizer
from echoic.decode.context import ContextGraph, Hotword
from echoic.decode.lm import END, WordLM, read_lm_text
from echoic.decode.search import ctc_prefix_beam
from echoic.errors import EchoicError

# Tests that use the session's `trained` models share one xdist worker (Makefile).
pytestmark = pytest.mark.xdist_group("trained")

SENTENCES = ["the cat sat", "the cat ran", "a dog sat", "the dog ran home"]


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.train([*SENTENCES, "kit"])  # "k" is spellable but not in the LM


def _walk(scorer, tokens: list[int]) -> float:
    state, total = scorer.initial_state(), 0.0
    for token in tokens:
        change, state = scorer.step(state, token)
        total += change
    return total + scorer.finish(state)


def test_a_sentence_scores_its_ngrams_and_word_bonuses(tokenizer):
    lm = WordLM(SENTENCES, tokenizer, weight=0.7, word_bonus=1.5)
    ids = {w: i for i, w in enumerate(lm.words)}
    expected = 0.7 * (
        lm.log_prob(ids["the"], (0, 0))
        + lm.log_prob(ids["cat"], (0, ids["the"]))
        + lm.log_prob(ids["sat"], (ids["the"], ids["cat"]))
        + lm.log_prob(END, (ids["cat"], ids["sat"]))
    )
    # Look-ahead scores along the way telescope to exactly the sentence's score.
    assert _walk(lm, tokenizer.encode("the cat sat")) == pytest.approx(expected + 3 * 1.5)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_for_any_history(tokenizer, order):
    lm = WordLM(SENTENCES, tokenizer, order=order)
    vocabulary = [*range(1, len(lm.words)), END]
    # every history of seen, unseen and <s> words, seen n-grams or not
    for history in itertools.product(range(len(lm.words)), repeat=order - 1):
        total = sum(math.exp(lm.log_prob(w, history)) for w in vocabulary)
        assert total == pytest.approx(1.0), history


def test_the_log_prob_cache_is_bounded_and_changes_no_value(tokenizer):
    reference = WordLM(SENTENCES, tokenizer)
    bounded = WordLM(SENTENCES, tokenizer)
    bounded.cache_entries = 3
    queries = list(itertools.product(range(len(reference.words)), repeat=3))
    for word, *history in queries * 2:
        value = bounded.log_prob(word, tuple(history))
        assert value == reference.log_prob(word, tuple(history))
        assert len(bounded._cache) <= 3
    assert len(reference._cache) == len(queries)


def test_kneser_ney_prefers_a_seen_continuation_and_backs_off(tokenizer):
    lm = WordLM(SENTENCES, tokenizer)
    ids = {w: i for i, w in enumerate(lm.words)}
    the_cat, a_dog = (ids["the"], ids["cat"]), (ids["a"], ids["dog"])
    # "the cat" was followed by sat and ran; "a dog" only by sat; "home" only after "ran"
    assert lm.log_prob(ids["sat"], a_dog) > lm.log_prob(ids["ran"], a_dog)
    assert lm.log_prob(ids["home"], (ids["dog"], ids["ran"])) > lm.log_prob(ids["home"], the_cat)
    # an unseen history uses the lower orders: P(sat | <unk> cat) = P(sat | cat)
    assert lm.log_prob(ids["sat"], (0, ids["cat"])) == lm.log_prob(
        ids["sat"], (ids["dog"], ids["cat"])
    )


def test_a_word_outside_the_lexicon_pays_the_penalty_once(tokenizer):
    lm = WordLM(SENTENCES, tokenizer, weight=0.5, word_bonus=0.0, oov_penalty=-7.0)
    ids = {w: i for i, w in enumerate(lm.words)}
    # "kit" leaves the lexicon at "k"; "cats" leaves it after a complete word.
    for sentence in ("the kit", "the cats"):
        after_oov = (ids["the"], 0)  # an OOV word leaves <s> in the history
        expected = 0.5 * (lm.log_prob(ids["the"]) + lm.log_prob(END, after_oov)) - 7.0
        assert _walk(lm, tokenizer.encode(sentence)) == pytest.approx(expected), sentence


def test_a_hotword_the_text_lacks_joins_the_lexicon_without_the_penalty(tokenizer, tmp_path):
    lm = WordLM(
        SENTENCES, tokenizer, weight=0.5, word_bonus=1.0, oov_penalty=-7.0, extra_words=["kit"]
    )
    ids = {w: i for i, w in enumerate(lm.words)}
    after = (ids["the"], 0)  # like an OOV word, it leaves <s> in the history
    expected = 0.5 * (lm.log_prob(ids["the"]) + lm.unlisted_log_prob + lm.log_prob(END, after))
    assert _walk(lm, tokenizer.encode("the kit")) == pytest.approx(expected + 2 * 1.0)
    # as frequent as the rarest word of the text: "a" and "home" are 1 of 17 tokens (</s>
    # included)
    assert lm.unlisted_log_prob == pytest.approx(math.log(1 / 17))
    # a near miss still leaves the lexicon and pays the penalty
    near_miss = 0.5 * (lm.log_prob(ids["the"]) + lm.log_prob(END, after)) - 7.0 + 1.0
    assert _walk(lm, tokenizer.encode("the kat")) == pytest.approx(near_miss)
    # build_scorer hands the hotword list's words to the LM
    from echoic.decode.decoder import build_scorer

    (tmp_path / "hotwords.txt").write_text("kit\n")
    (tmp_path / "lm.txt").write_text("\n".join(SENTENCES) + "\n")
    scorer = build_scorer(
        tokenizer,
        hotwords=tmp_path / "hotwords.txt",
        lm=tmp_path / "lm.txt",
        lm_weight=0.5,
        word_bonus=1.0,
    )
    _, built = scorer.scorers
    assert built.unlisted_log_prob == lm.unlisted_log_prob
    assert _walk(built, tokenizer.encode("the kit")) == pytest.approx(expected + 2 * 1.0)


def test_the_lm_pulls_a_misspelling_back_to_a_word(tokenizer):
    # Frames spell "the ?at" with "k" a little more likely than "c" at the fourth letter.
    spelled = tokenizer.encode("the cat")
    k = tokenizer.tokens.index("k")
    rows = []
    for token in spelled:
        row = torch.full((tokenizer.vocab_size,), -8.0)
        row[token] = -0.05
        if token == tokenizer.tokens.index("c"):
            row[token], row[k] = -0.9, -0.6
        rows.append(row)
        rows.append(torch.full((tokenizer.vocab_size,), -8.0).index_fill(0, torch.tensor([0]), 0.0))
    log_probs = torch.stack(rows).log_softmax(-1)
    plain = ctc_prefix_beam(log_probs, beam=5)
    assert tokenizer.decode(plain[0].tokens) == "the kat"
    lm = WordLM(SENTENCES, tokenizer)
    assert tokenizer.decode(ctc_prefix_beam(log_probs, beam=5, context=lm)[0].tokens) == "the cat"


def test_hotwords_and_lm_together_add_up(tokenizer):
    from echoic.decode.lm import ScorerSum

    lm = WordLM(SENTENCES, tokenizer)
    graph = ContextGraph.build([Hotword("kit", 3.0)], tokenizer)
    both = ScorerSum([graph, lm])
    tokens = tokenizer.encode("the kit sat")
    assert _walk(both, tokens) == pytest.approx(_walk(graph, tokens) + _walk(lm, tokens))


def test_unusable_tokenizers_and_files_are_one_line_errors(tmp_path):
    chinese = CharTokenizer.train(["你好世界"])
    with pytest.raises(EchoicError, match="character tokenizer with spaces"):
        WordLM(["你好"], chinese)
    with pytest.raises(EchoicError, match="LM text not found"):
        read_lm_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EchoicError, match="no words"):
        WordLM.from_file(tmp_path / "empty.txt", CharTokenizer.train(["a b"]))


@pytest.mark.slow
def test_decode_cli_with_lm_and_hotwords(trained, tmp_path, capsys):
    exp, manifest = trained("hybrid")
    hotwords = tmp_path / "hotwords.txt"
    hotwords.write_text("mister\n")
    for method in ("ctc_prefix_beam", "attention_rescoring"):
        out = tmp_path / method
        args = f"decode --exp {exp} --manifest {manifest} --method {method} --out {out}"
        code = main([*args.split(), "--lm", str(manifest), "--hotwords", str(hotwords)])
        assert code == 0
        capsys.readouterr()
        assert (
            main(["score", "--ref", str(manifest), "--hyp", str(out / "hyp.jsonl"), "--json"]) == 0
        )
        # The LM learnt these very sentences: decoding them must stay (near) perfect.
        assert json.loads(capsys.readouterr().out)["wer"] < 0.1, method
    args = f"decode --exp {exp} --manifest {manifest} --method ctc_greedy --out {tmp_path / 'g'}"
    assert main([*args.split(), "--lm", str(manifest)]) == 2
    assert "work with" in capsys.readouterr().err
