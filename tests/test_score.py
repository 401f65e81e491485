import json
import random

import jiwer
import pytest

from echoic.cli import main
from echoic.data.manifest import Utterance, write_manifest
from echoic.score import (
    align,
    characters,
    group_rates,
    normalise,
    score_files,
    score_texts,
    speaker_groups,
    words,
)

VOCABULARY = "the cat sat on a mat and then ran off to see dog with hat".split()


def _pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        ref = [rng.choice(VOCABULARY) for _ in range(rng.randint(1, 12))]
        hyp = list(ref)
        for _ in range(rng.randint(0, 5)):
            edit = rng.random()
            position = rng.randrange(len(hyp) + 1)
            if edit < 0.33 and hyp:
                hyp[min(position, len(hyp) - 1)] = rng.choice(VOCABULARY)
            elif edit < 0.66 and hyp:
                del hyp[min(position, len(hyp) - 1)]
            else:
                hyp.insert(position, rng.choice(VOCABULARY))
        pairs.append((" ".join(ref), " ".join(hyp)))
    return pairs


def test_error_rates_and_counts_equal_jiwer():
    pairs = _pairs(300)
    refs = {f"u{i}": r for i, (r, _) in enumerate(pairs)}
    hyps = {f"u{i}": h for i, (_, h) in enumerate(pairs)}
    report = score_texts(refs, hyps)
    output = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    assert report.words.rate == pytest.approx(output.wer, abs=1e-12)
    assert (report.words.sub, report.words.dele, report.words.ins) == (
        output.substitutions,
        output.deletions,
        output.insertions,
    )
    assert report.chars.rate == pytest.approx(
        jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]), abs=1e-12
    )


def test_cjk_is_scored_per_character():
    assert words("我们去 公园") == ["我", "们", "去", "公", "园"]
    assert words("我用linux系统") == ["我", "用", "linux", "系", "统"]
    assert characters("今天 天气") == list("今天天气")
    report = score_texts({"a": "今天天气很好"}, {"a": "今天天汽很"})
    assert (report.words.sub, report.words.dele, report.words.ins, report.words.ref) == (1, 1, 0, 6)
    assert report.chars.rate == report.words.rate


def test_alignment_and_normalisation():
    counts, pairs = align("a b c d".split(), "a x c d e".split())
    assert (counts.sub, counts.dele, counts.ins) == (1, 0, 1)
    assert pairs == [
        ("ok", "a", "a"),
        ("sub", "b", "x"),
        ("ok", "c", "c"),
        ("ok", "d", "d"),
        ("ins", None, "e"),
    ]
    assert normalise("Hello, World!", lowercase=True, remove_punctuation=True) == "hello world"
    assert normalise("Don't stop", lowercase=True, remove_punctuation=True) == "don't stop"
    assert normalise("Hello, World!", lowercase=False, remove_punctuation=False) == "Hello, World!"


def test_hotword_recall_precision_and_biased_wer():
    refs = {"a": "we met alice in new york", "b": "bob likes tea", "c": "new york again"}
    hyps = {"a": "we met alex in new york", "b": "bob likes alice tea", "c": "new yolk again"}
    report = score_texts(refs, hyps, ["alice", "new york"])
    stats = report.hotwords
    assert (stats["ref_occurrences"], stats["hyp_occurrences"], stats["matched"]) == (3, 2, 1)
    assert stats["recall"] == pytest.approx(1 / 3) and stats["precision"] == pytest.approx(1 / 2)
    # biased reference words: alice, new, york (a) + new, york (c) = 5;
    # errors: alice->alex, york->yolk;
    # the inserted "alice" in b is a hotword, so it counts for the biased class.
    assert stats["biased_ref_words"] == 5 and stats["b_wer"] == pytest.approx(3 / 5)
    assert (
        stats["unbiased_ref_words"] == 7 and stats["u_wer"] == 0.0
    )  # we met in, bob likes tea, again


def test_score_cli(tmp_path, capsys):
    utterances = [
        Utterance("u1", "x.wav", "the cat sat", 1.0),
        Utterance("u2", "y.wav", "on the mat", 1.0),
    ]
    write_manifest(tmp_path / "ref.jsonl", utterances)
    (tmp_path / "hyp.jsonl").write_text(
        json.dumps({"id": "u1", "text": "The cat sat", "tokens": [], "score": 0}) + "\n"
    )
    score_args = [
        "score",
        "--ref",
        str(tmp_path / "ref.jsonl"),
        "--hyp",
        str(tmp_path / "hyp.jsonl"),
    ]
    assert main([*score_args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"wer", "cer", "sub", "del", "ins", "n_ref_words"} <= set(result)
    assert (result["sub"], result["del"], result["n_ref_words"], result["missing_hypotheses"]) == (
        1,
        3,
        6,
        1,
    )
    assert main([*score_args, "--lowercase"]) == 0
    printed = capsys.readouterr().out
    assert "WER 50.00% (S=0 D=3 I=0 / 6 words)" in printed and "u2: 3 errors" in printed
    alignment = (tmp_path / "alignment.txt").read_text()
    assert "REF: ON THE MAT" in alignment and "HYP: ** *** ***" in alignment  # errors upper-cased
    assert (
        main(["score", "--ref", str(tmp_path / "ref.jsonl"), "--hyp", str(tmp_path / "nope.jsonl")])
        == 2
    )


def test_wer_by_speaker_group_seen_or_unseen_in_train(tmp_path):
    def utt(i, speaker, text="a b c d"):
        return Utterance(f"u{i}", "x.wav", text, 1.0, speaker=speaker)

    write_manifest(tmp_path / "train.jsonl", [utt(0, "espeak:en+m1"), utt(1, "festival:kal")])
    refs = [utt(2, "espeak:en+m1"), utt(3, "espeak:en+f9"), utt(4, "festival:kal"), utt(5, None)]
    write_manifest(tmp_path / "test.jsonl", refs)
    hyps = {"u2": "a b c d", "u3": "a x c", "u4": "a b c", "u5": "a b c d"}
    (tmp_path / "hyp.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in hyps.items())
    )
    report = score_files(tmp_path / "test.jsonl", tmp_path / "hyp.jsonl")
    groups = speaker_groups(tmp_path / "test.jsonl", tmp_path / "train.jsonl")
    rates = group_rates(report, groups)
    assert list(rates) == ["espeak seen", "espeak unseen", "festival seen", "unknown"]
    assert rates["espeak seen"]["wer"] == 0.0 and rates["espeak unseen"]["wer"] == 0.5
    assert rates["festival seen"] == {"wer": 0.25, "utterances": 1, "ref_words": 4}
