"""Decoding: every method on tiny overfitted models, rescoring, hotword biasing, ONNX
and TorchScript export, transcription of arbitrary audio files."""

import json
import logging
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from echoic.cli import main
from echoic.data.dataset import build_loader
from echoic.data.manifest import read_manifest
from echoic.decode.context import ContextGraph, Hotword, read_hotwords
from echoic.decode.decoder import DecodeOptions, available_methods, decode_batch
from echoic.decode.search import attention_beam, attention_rescoring, ctc_prefix_beam
from echoic.errors import EchoicError
from echoic.train.experiment import load_experiment_model

# Tests that use the session's `trained` models share one xdist worker (Makefile).
pytestmark = pytest.mark.xdist_group("trained")

# -- the context graph ------------------------------------------------------------------------


def _walk(graph: ContextGraph, tokens: list[int]) -> float:
    state, total = graph.initial_state(), 0.0
    for token in tokens:
        change, state = graph.step(state, token)
        total += change
    return total + graph.finish(state)


BOUNDARY = 9


def test_context_graph_rewards_a_full_match_and_takes_back_a_partial_one():
    graph = ContextGraph([([BOUNDARY, 1, 2, 3], 1.5)], start_token=BOUNDARY)
    assert _walk(graph, [1, 2, 3]) == pytest.approx(4.5)  # at the start of the utterance
    assert _walk(graph, [5, BOUNDARY, 1, 2, 3, BOUNDARY, 6]) == pytest.approx(4.5)  # mid-sentence
    assert _walk(graph, [1, 2, 4]) == 0.0  # near miss: the partial bonus goes back
    assert _walk(graph, [1, 2]) == 0.0  # still pending at the end: taken back too
    assert _walk(graph, [5, 1, 2, 3]) == 0.0  # inside another word: no match
    state, running = graph.initial_state(), []
    for token in [1, 2, 4]:
        change, state = graph.step(state, token)
        running.append(change)
    assert running == [1.5, 1.5, -3.0]  # partial matches are rewarded while they last


def test_context_graph_overlapping_phrases():
    # Shared prefix: the longer phrase earns only its extra tokens.
    graph = ContextGraph(
        [([BOUNDARY, 1, 2], 1.0), ([BOUNDARY, 1, 2, BOUNDARY, 3], 1.0)], start_token=BOUNDARY
    )
    assert _walk(graph, [1, 2, BOUNDARY, 3]) == pytest.approx(4.0)
    assert _walk(graph, [1, 2, BOUNDARY, 4]) == pytest.approx(2.0)  # the shorter phrase is kept
    # Overlap of a suffix and a prefix: the second match starts inside the first.
    graph = ContextGraph([([1, 2, 3], 1.0), ([2, 3, 4], 1.0)])
    assert _walk(graph, [1, 2, 3, 4]) == pytest.approx(4.0)
    # A failed match restarts inside itself.
    graph = ContextGraph([([1, 1, 2], 1.0)])
    assert _walk(graph, [1, 1, 1, 2]) == pytest.approx(3.0)


def test_hotword_file_and_tokenization(tmp_path, trained):
    path = tmp_path / "hotwords.txt"
    path.write_text("# names\nnew york\t3.5\n\nzebra\n")
    assert read_hotwords(path) == [Hotword("new york", 3.5), Hotword("zebra", 2.0)]
    (tmp_path / "bad.txt").write_text("alpha\tlots\n")
    with pytest.raises(EchoicError, match=r"bad.txt:1: boost must be a number"):
        read_hotwords(tmp_path / "bad.txt")
    _, tokenizer, _ = load_experiment_model(trained("hybrid")[0])
    with pytest.raises(EchoicError, match="characters the tokenizer does not know"):
        ContextGraph.build([Hotword("naïve")], tokenizer)


def test_biasing_turns_a_close_call_into_the_hotword():
    # Frames favour token 1 over token 2 slightly; a hotword made of token 2 wins with biasing.
    rows = [[-5.0, -0.9, -1.1], [-0.1, -3.0, -3.0]]
    log_probs = torch.tensor(rows).log_softmax(-1)
    plain = ctc_prefix_beam(log_probs, beam=3)
    assert plain[0].tokens == (1,)
    graph = ContextGraph([([2], 1.0)])
    biased = ctc_prefix_beam(log_probs, beam=3, context=graph)
    assert biased[0].tokens == (2,) and biased[0].context_score == pytest.approx(1.0)


# -- every method on overfitted models -----------------------------------------------------


def _batches(exp, manifest_path):
    model, tokenizer, config = load_experiment_model(exp)
    manifest = read_manifest(manifest_path)
    loader = build_loader(
        manifest, tokenizer, config.data, input_spec=model.input_spec, seed=0, train=False
    )
    return model, tokenizer, list(loader)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hybrid", "transducer"])
def test_beam_keeps_greedys_right_answers_or_finds_likelier_ones(trained, kind):
    model, tokenizer, batches = _batches(*trained(kind))
    pairs = {
        "hybrid": [(DecodeOptions("ctc_greedy"), DecodeOptions("ctc_prefix_beam", beam=4)),
                   (DecodeOptions("attention", beam=1), DecodeOptions("attention", beam=4))],
        "transducer": [(DecodeOptions("rnnt_greedy"), DecodeOptions("rnnt_beam", beam=4)),
                       (DecodeOptions("ctc_greedy"), DecodeOptions("ctc_prefix_beam", beam=4))],
    }[kind]  # fmt: skip
    batch = batches[0]
    for greedy, beam in pairs:
        first = decode_batch(model, batch, greedy)
        second = decode_batch(model, batch, beam)
        # Easy utterances: the ones greedy search already gets right.
        easy = [i for i, h in enumerate(first) if tokenizer.decode(h.tokens) == batch.texts[i]]
        assert easy, greedy.method
        changed = [i for i in easy if first[i].tokens != second[i].tokens]
        if greedy.method == "rnnt_greedy":
            # It reports no score to compare with (0.0): at most three of ~18 may change
            # (16 of 18 agreed after the held-out-split change, 15 once the encoder's
            # products moved to oneDNN, whose rounding gives another tiny model).
            assert len(changed) <= 3, (beam.method, len(changed), len(easy))
            continue
        # Beam search may trade a right greedy answer for a wrong one only if it scores
        # that one higher: a tiny model's ranking is not its accuracy. (Counting
        # agreements broke whenever the tiny fixture's rounding changed.)
        for i in changed:
            if second[i].score >= first[i].score - 1e-4:
                continue
            # Except where the search never scored the right answer: attention_beam stops
            # once `beam` hypotheses have ended (as ESPnet's does), so a right answer longer
            # than those is never finished. (Seen on a fixture trained on 2026-12-08: the
            # right 36 tokens at -0.105 per token lost to 35 at -0.125.)
            ended_later = len(first[i].tokens) > len(second[i].tokens)
            assert greedy.method == "attention" and ended_later, (greedy.method, i)


# Scores worked out by hand, one hypothesis at a time on the utterance's own frames (no
# padding, no batching, no masks), so that they share no code with the searches.


def _decoder_log_prob(decoder, memory, tokens, sos_eos, reverse=False) -> float:
    """log P(tokens + <eos> | memory (1, T, D)) under the teacher-forced decoder."""
    sequence = list(reversed(tokens)) if reverse else list(tokens)
    ys_in = torch.tensor([[sos_eos, *sequence]])
    whole = torch.ones(1, 1, 1, memory.shape[1], dtype=torch.bool)
    steps = decoder(memory, whole, ys_in, torch.tensor([len(sequence) + 1]))[0].log_softmax(-1)
    return sum(float(steps[i, t]) for i, t in enumerate([*sequence, sos_eos]))


def _greedy_attention(decoder, memory, sos_eos) -> tuple[int, ...]:
    """Most likely next token until <eos>, at most one token per encoder frame."""
    tokens: list[int] = []
    whole = torch.ones(1, 1, 1, memory.shape[1], dtype=torch.bool)
    while len(tokens) < memory.shape[1]:
        ys_in = torch.tensor([[sos_eos, *tokens]])
        token = int(decoder(memory, whole, ys_in, torch.tensor([len(tokens) + 1]))[0, -1].argmax())
        if token == sos_eos:
            break
        tokens.append(token)
    return tuple(tokens)


def _ctc_log_prob(frames: torch.Tensor, tokens: tuple[int, ...]) -> float:
    """log P(tokens) summed over every CTC alignment of frames (T, V): torch's forward
    algorithm."""
    loss = F.ctc_loss(
        frames[:, None],
        torch.tensor(tokens, dtype=torch.long),
        [frames.shape[0]],
        [len(tokens)],
        reduction="none",
    )
    return -float(loss)


@pytest.mark.slow
def test_rescoring_ranks_by_the_weighted_sum_of_scores_worked_out_by_hand(trained):
    model, _, batches = _batches(*trained("hybrid"))  # trains on first use: not under no_grad
    with torch.no_grad():
        _check_rescoring(model, batches[0])


def _check_rescoring(model, batch) -> None:
    encoded, lens = model.encode(batch)
    log_probs = model.ctc.log_probs(encoded)
    head = model.attention
    for b in range(3):
        frames, length = log_probs[b, : lens[b]], int(lens[b])
        first = ctc_prefix_beam(frames, beam=5)[0].tokens
        # A hotword on one token of the best path, so the context score is in the sum too.
        graph = ContextGraph([([first[1]], 0.7)])
        nbest = ctc_prefix_beam(frames, beam=5, context=graph)
        assert len({h.tokens for h in nbest}) >= 3
        memory = encoded[b : b + 1, :length]
        by_hand = {}
        for h in nbest:
            # The prefix search sums the alignments its beam kept: at most all of them.
            assert h.ctc_score <= _ctc_log_prob(frames, h.tokens) + 1e-4
            by_hand[h.tokens] = (
                h.ctc_score,  # what the rescoring is given to add, a number from here on
                _decoder_log_prob(head.decoder, memory, h.tokens, head.sos_eos_id),
                _decoder_log_prob(
                    head.reverse_decoder, memory, h.tokens, head.sos_eos_id, reverse=True
                ),
                _walk(graph, list(h.tokens)),
            )
        # Distinct weights, so that using one in another's place changes the sums.
        for ctc_weight, attention_weight, reverse_weight in ((0.5, 1.0, 0.3), (0.3, 0.25, 0.6)):
            ranked = attention_rescoring(
                head,
                encoded[b : b + 1],  # padded to the batch, as decoding passes it
                lens[b : b + 1],
                nbest,
                ctc_weight,
                reverse_weight,
                attention_weight,
            )
            expected = {
                tokens: ctc_weight * ctc
                + attention_weight * ((1 - reverse_weight) * left + reverse_weight * right)
                + bonus
                for tokens, (ctc, left, right, bonus) in by_hand.items()
            }
            got = {h.tokens: h.score for h in ranked}
            assert got == pytest.approx(expected, abs=1e-3), (ctc_weight, attention_weight)
            assert [h.tokens for h in ranked] == sorted(expected, key=expected.get, reverse=True)


@pytest.mark.slow
def test_attention_search_scores_what_the_decoder_says(trained):
    """Every hypothesis attention beam search returns is scored with the decoder's own
    log P(tokens + <eos>) / (len + 1); beam 1 is the greedy decoder run by hand; no
    hypothesis is longer than the utterance's encoder frames. (A search that cut
    hypotheses at the length limit without scoring their <eos> let repeating tails win.)"""
    model, _, batches = _batches(*trained("hybrid"))
    head = model.attention
    checked = cut = 0
    with torch.no_grad():
        for batch in batches:
            encoded, lens = model.encode(batch)
            for beam in (1, 4):
                nbests = attention_beam(head, encoded, lens, beam, length_penalty=1.0)
                for b, nbest in enumerate(nbests):
                    length = int(lens[b])
                    memory = encoded[b : b + 1, :length]
                    assert 1 <= len(nbest) <= beam
                    for h in nbest:
                        assert len(h.tokens) <= length
                        log_p = _decoder_log_prob(head.decoder, memory, h.tokens, head.sos_eos_id)
                        assert h.score == pytest.approx(log_p / (len(h.tokens) + 1), abs=1e-3), (
                            batch.ids[b],
                            beam,
                        )
                        checked += 1
                    cut += len(nbest[0].tokens) == length
                    if beam == 1:
                        greedy = _greedy_attention(head.decoder, memory, head.sos_eos_id)
                        assert nbest[0].tokens == greedy, batch.ids[b]
    # The tiny decoder runs some utterances up to the limit: that path is covered.
    assert checked >= 40 and cut >= 1, (checked, cut)


@pytest.mark.slow
def test_decode_cli_every_method_and_clear_errors(trained, tmp_path, capsys):
    for kind in ("hybrid", "transducer"):
        exp, manifest = trained(kind)
        model, _, _ = load_experiment_model(exp)
        for method in available_methods(model):
            out = tmp_path / kind / method
            args = f"decode --exp {exp} --manifest {manifest} --method {method} --out {out}"
            code = main([*args.split(), "--beam", "4", "--no-progress"])
            assert code == 0
            printed = capsys.readouterr().out
            assert "RTF" in printed and "utterances/s" in printed
            lines = [json.loads(line) for line in (out / "hyp.jsonl").read_text().splitlines()]
            assert len(lines) == 20 and set(lines[0]) == {"id", "text", "tokens", "score"}
            assert (
                main(["score", "--ref", str(manifest), "--hyp", str(out / "hyp.jsonl"), "--json"])
                == 0
            )
            wer = json.loads(capsys.readouterr().out)["wer"]
            # The 240-step decoder is weak in free running (it drops words and loops on
            # some utterances): attention measured 0.54 (0.59 before the length-limit fix),
            # while emitting nothing scores 1.0 and a repeating search more. The hybrid
            # model's other searches measured 0.0.
            limit = 0.7 if method == "attention" else 0.3
            assert wer < limit, (kind, method, wer)
    exp, manifest = trained("hybrid")
    args = f"decode --exp {exp} --manifest {manifest} --method rnnt_beam --out {tmp_path / 'x'}"
    code = main(args.split())
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "echoic: error: method 'rnnt_beam' needs heads this model lacks; valid methods: "
        "ctc_greedy, ctc_prefix_beam, attention, attention_rescoring"
    )
    hotwords = tmp_path / "hotwords.txt"
    hotwords.write_text("the\n")
    args = f"decode --exp {exp} --manifest {manifest} --method ctc_greedy --out {tmp_path / 'y'}"
    code = main([*args.split(), "--hotwords", str(hotwords)])
    assert (
        code == 2
        and "hotwords and --lm work with ctc_prefix_beam, attention_rescoring"
        in capsys.readouterr().err
    )


FBANK_DELAY = 0.1  # seconds added to each utterance's fbank


@pytest.mark.slow
def test_decode_cli_headline_rtf_is_end_to_end(trained, tmp_path, monkeypatch, capsys):
    """The headline RTF runs from audio file to text: fbank made slower by FBANK_DELAY an
    utterance adds that to it, and nothing to the model-only figure printed beside it."""
    import echoic.data.dataset as dataset_module

    exp, manifest = trained("hybrid")
    compute_fbank = dataset_module.compute_fbank

    def slow_fbank(*args, **kwargs):
        time.sleep(FBANK_DELAY)
        return compute_fbank(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "compute_fbank", slow_fbank)
    out = tmp_path / "out"
    args = f"decode --exp {exp} --manifest {manifest} --method ctc_greedy --out {out}"
    assert main([*args.split(), "--workers", "0", "--no-progress"]) == 0  # fbank here
    printed = capsys.readouterr().out
    summary = json.loads((out / "decode.json").read_text())
    slept = FBANK_DELAY * summary["utterances"]
    assert summary["utterances"] == 20
    assert summary["rtf"] * summary["audio_s"] >= slept, summary
    assert summary["total_s"] >= summary["model_s"] + slept, summary
    assert summary["rtf"] == pytest.approx(summary["total_s"] / summary["audio_s"], rel=0.01)
    assert summary["model_rtf"] == pytest.approx(summary["model_s"] / summary["audio_s"], rel=0.01)
    assert f"RTF {summary['rtf']:.4f} end to end, audio file to text" in printed
    assert f"model only {summary['model_rtf']:.4f} (encoder + search" in printed
    assert "reading and fbank in this process" in printed


@pytest.mark.slow
def test_decode_cli_rescoring_weights_reach_the_search(trained, tmp_path):
    """Attention weight 0 and CTC weight 1 leave rescoring with the prefix search's own
    score, so both methods give the same hypotheses and scores."""
    exp, manifest = trained("hybrid")
    scores = {}
    for method, weights in (
        ("ctc_prefix_beam", []),
        ("attention_rescoring", ["--attention-weight", "0", "--ctc-weight", "1"]),
    ):
        out = tmp_path / method
        args = f"decode --exp {exp} --manifest {manifest} --method {method} --out {out}"
        assert main([*args.split(), "--beam", "4", *weights, "--no-progress"]) == 0
        lines = [json.loads(line) for line in (out / "hyp.jsonl").read_text().splitlines()]
        scores[method] = {line["id"]: (line["text"], line["score"]) for line in lines}
    plain, rescored = scores["ctc_prefix_beam"], scores["attention_rescoring"]
    assert plain.keys() == rescored.keys()
    for utt_id, (text, score) in plain.items():
        assert rescored[utt_id][0] == text
        assert rescored[utt_id][1] == pytest.approx(score, abs=1e-4)


@pytest.mark.slow
def test_onnx_and_torchscript_export_match_pytorch(trained, tmp_path, capsys):
    exp, manifest = trained("hybrid")
    assert main(["export", "--exp", str(exp), "--format", "onnx"]) == 0
    assert (exp / "export" / "model.onnx").is_file() and (
        exp / "export" / "model.int8.onnx"
    ).is_file()
    info = json.loads((exp / "export" / "export.json").read_text())
    spec = load_experiment_model(exp)[0].input_spec
    assert info["files"] == ["model.onnx", "model.int8.onnx"]
    assert info["features"]["cmvn_in_graph"] is True  # checked below: raw fbank in
    assert (info["features"]["sample_rate"], info["features"]["num_mel_bins"]) == (
        spec.sample_rate,
        spec.fbank.num_mel_bins,
    )
    for method in ("ctc_greedy", "ctc_prefix_beam"):
        outputs = {}
        for runtime in ("torch", "onnx"):
            out = tmp_path / method / runtime
            args = f"decode --exp {exp} --manifest {manifest} --method {method} --out {out}"
            assert main([*args.split(), "--runtime", runtime, "--no-progress"]) == 0
            lines = (out / "hyp.jsonl").read_text().splitlines()
            outputs[runtime] = [json.loads(line)["tokens"] for line in lines]
        assert outputs["torch"] == outputs["onnx"], method
    assert (
        main(
            ["export", "--exp", str(exp), "--format", "torchscript", "--out", str(tmp_path / "ts")]
        )
        == 0
    )
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.ts"))
    model, _, batches = _batches(exp, manifest)
    batch = batches[0]
    log_probs, lens = scripted(batch.feats, batch.feat_lens)
    encoded, reference_lens = model.encode(batch)
    torch.testing.assert_close(log_probs, model.ctc.log_probs(encoded), atol=1e-5, rtol=1e-4)
    assert torch.equal(lens, reference_lens)
    capsys.readouterr()


@pytest.mark.slow
def test_transcribe_a_44k_stereo_file(trained, tmp_path, capsys):
    exp, manifest = trained("hybrid")
    utterance = read_manifest(manifest).utterances[0]
    audio, rate = sf.read(utterance.audio)
    import soxr

    resampled = soxr.resample(audio, rate, 44100)
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, 44100)
    assert sf.info(path).channels == 2 and sf.info(path).samplerate == 44100
    assert main(["transcribe", "--exp", str(exp), str(path)]) == 0
    text = capsys.readouterr().out.strip()
    assert text == utterance.text
    assert main(["transcribe", "--exp", str(exp), str(tmp_path / "nope.wav")]) == 2
    assert "audio file not found" in capsys.readouterr().err


def test_transcribe_takes_decode_search_flags(trained, tmp_path, monkeypatch, capsys):
    """transcribe's search flags are decode's, with the same meaning: they reach the
    search (a flag parsed and dropped would leave a default here)."""
    import echoic.decode.transcribe as transcribe_module
    from echoic.decode.lm import WordLM

    exp, manifest = trained("hybrid")
    utterance = read_manifest(manifest).utterances[0]
    seen = []

    def spy(model, batch, options):
        seen.append(options)
        return decode_batch(model, batch, options)

    monkeypatch.setattr(transcribe_module, "decode_batch", spy)
    flags = "--beam 7 --attention-weight 0.25 --ctc-weight 0.6 --lm-weight 0.3 --word-bonus 2"
    args = ["transcribe", "--exp", str(exp), *flags.split(), "--lm", str(manifest)]
    assert main([*args, str(utterance.audio)]) == 0
    (options,) = seen
    assert options.method == "attention_rescoring"  # the best the hybrid model has
    assert (options.beam, options.attention_weight, options.ctc_weight) == (7, 0.25, 0.6)
    assert isinstance(options.context, WordLM)
    assert (options.context.weight, options.context.word_bonus) == (0.3, 2.0)
    assert capsys.readouterr().out.strip() == utterance.text


def test_transcribe_accepts_the_shortest_audio_the_encoder_takes(trained, tmp_path, capsys):
    """min_input_frames fbank frames give one encoder frame: transcribed; one fewer is a
    one-line error."""
    exp, _ = trained("hybrid")
    model, _, _ = load_experiment_model(exp)
    spec = model.input_spec
    shortest = round(spec.seconds_for_frames(model.encoder.min_input_frames) * spec.sample_rate)
    for samples, status in [(shortest, 0), (shortest - 10, 2)]:
        path = tmp_path / f"{samples}.wav"
        sf.write(path, np.full(samples, 0.1, dtype=np.float32), spec.sample_rate)
        assert main(["transcribe", "--exp", str(exp), str(path)]) == status
    assert "too short to transcribe" in capsys.readouterr().err


def test_an_utterance_too_short_for_the_encoder_is_skipped_not_a_crash(trained, tmp_path, caplog):
    """0.0844 s gives 6 fbank frames, one fewer than the subsampling front needs."""
    exp, _ = trained("hybrid")
    samples = 1350  # seconds_for_frames(7) is 0.085 s: 1,360 samples
    sf.write(tmp_path / "short.wav", np.full(samples, 0.1, dtype=np.float32), 16000)
    line = {"id": "short", "audio": "short.wav", "text": "a", "duration": samples / 16000}
    (tmp_path / "short.jsonl").write_text(json.dumps(line) + "\n")
    args = f"decode --exp {exp} --manifest {tmp_path / 'short.jsonl'} --method ctc_greedy"
    with caplog.at_level(logging.INFO, logger="echoic"):
        assert main([*args.split(), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "skipped 1 (1 too_short)" in caplog.text
    assert (tmp_path / "out" / "hyp.jsonl").read_text() == ""
