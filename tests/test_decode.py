"""Decoding: every method on tiny overfitted models, rescoring, hotword biasing, ONNX
and TorchScript export, transcription of arbitrary audio files."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from echoic.cli import main
from echoic.data.dataset import build_loader
from echoic.data.manifest import read_manifest
from echoic.decode.context import ContextGraph, Hotword, read_hotwords
from echoic.decode.decoder import (
    DecodeOptions,
    available_methods,
    decode_batch,
    load_experiment_model,
)
from echoic.decode.search import attention_rescoring, ctc_prefix_beam, sequence_log_probs
from echoic.errors import EchoicError

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
def test_greedy_and_beam_agree_on_easy_utterances(trained, kind):
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
        assert len(easy) >= 3, (greedy.method, len(easy))
        agree = sum(first[i].tokens == second[i].tokens for i in easy)
        assert agree >= len(easy) - 1, (greedy.method, beam.method, agree, len(easy))


@pytest.mark.slow
def test_rescoring_picks_the_best_combined_score(trained):
    model, _, batches = _batches(*trained("hybrid"))  # trains on first use: not under no_grad
    with torch.no_grad():
        _check_rescoring(model, batches[0])


def _check_rescoring(model, batch) -> None:
    encoded, lens = model.encode(batch)
    log_probs = model.ctc.log_probs(encoded)
    for b in range(3):
        nbest = ctc_prefix_beam(log_probs[b, : lens[b]], beam=5)
        memory, memory_len = encoded[b : b + 1], lens[b : b + 1]
        candidates = [h.tokens for h in nbest]
        left = sequence_log_probs(
            model.attention.decoder, memory, memory_len, candidates, model.attention.sos_eos_id
        )
        right = sequence_log_probs(
            model.attention.reverse_decoder,
            memory,
            memory_len,
            candidates,
            model.attention.sos_eos_id,
            reverse=True,
        )
        for attention_weight in (1.0, 0.25):
            ranked = attention_rescoring(
                model.attention, memory, memory_len, nbest, 0.5, 0.3, attention_weight
            )
            combined = [
                0.5 * h.ctc_score + attention_weight * (0.7 * float(l2r) + 0.3 * float(r2l))
                for h, l2r, r2l in zip(nbest, left, right)
            ]
            assert ranked[0].score == pytest.approx(max(combined), abs=1e-4)
            assert all(ranked[0].score >= h.score for h in ranked)


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
            # A 240-step decoder still loops in free running; the other searches must be good.
            assert wer < (1.0 if method == "attention" else 0.3), (kind, method, wer)
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
