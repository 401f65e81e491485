import json

import pytest
from conftest import write_sine

from echoic.cli import main
from echoic.data.importers import import_corpus
from echoic.data.manifest import read_manifest
from echoic.errors import EchoicError, ManifestError


def _kaldi_dir(tmp_path, *, segments=False):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_sine(audio / "r1.wav", seconds=3.0)
    write_sine(audio / "r2.wav", seconds=1.5, rate=8000)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(f"r1 {audio / 'r1.wav'}\nr2 {audio / 'r2.wav'}\n")
    if segments:
        (data / "segments").write_text("u1 r1 0.0 1.25\nu2 r1 1.25 -1\nu3 r2 0.5 1.0\n")
        (data / "text").write_text("u1 HELLO THERE\nu2 GENERAL KENOBI\nu3 YES\n")
        (data / "utt2spk").write_text("u1 s1\nu2 s1\nu3 s2\n")
    else:
        (data / "text").write_text("r1 hello there\nr2 \n")
        (data / "utt2spk").write_text("r1 spk1\nr2 spk2\n")
    return data


def test_kaldi_plain(tmp_path):
    utts = import_corpus("kaldi", _kaldi_dir(tmp_path))
    assert [(u.id, u.text, u.speaker, u.duration) for u in utts] == [
        ("r1", "hello there", "spk1", 3.0),
        ("r2", "", "spk2", 1.5),  # an empty transcript stays; training skips and counts it
    ]


def test_kaldi_segments(tmp_path):
    utts = import_corpus("kaldi", _kaldi_dir(tmp_path, segments=True), normalize=True)
    assert [(u.id, u.offset, u.duration, u.text) for u in utts] == [
        ("u1", 0.0, 1.25, "hello there"),
        ("u2", 1.25, 1.75, "general kenobi"),  # end -1 means to the end of the recording
        ("u3", 0.5, 0.5, "yes"),
    ]


def test_kaldi_pipes_and_missing_audio_are_clear_errors(tmp_path):
    data = _kaldi_dir(tmp_path)
    (data / "wav.scp").write_text("r1 sox in.flac -t wav - |\n")
    with pytest.raises(
        ManifestError, match=r"wav.scp:1: piped command in wav.scp is not supported"
    ):
        import_corpus("kaldi", data)
    (data / "wav.scp").write_text(f"r1 {tmp_path / 'audio' / 'r1.wav'}\nr2 /no/such/file.wav\n")
    with pytest.raises(ManifestError, match=r"wav.scp:2: audio file not found: /no/such/file.wav"):
        import_corpus("kaldi", data)
    (data / "wav.scp").write_text("r1 foo.ark:1234\n")
    with pytest.raises(ManifestError, match=r"wav.scp:1: expected a plain audio file path"):
        import_corpus("kaldi", data)


def test_librispeech_tree(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    write_sine(chapter / "84-121123-0000.flac", seconds=2.0)
    write_sine(chapter / "84-121123-0001.flac", seconds=1.0)
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
    )
    utts = import_corpus("librispeech", tmp_path / "LibriSpeech")
    assert [(u.id, u.speaker, u.duration, u.text) for u in utts] == [
        ("84-121123-0000", "84", 2.0, "GO DO YOU HEAR"),
        ("84-121123-0001", "84", 1.0, "BUT IN LESS THAN FIVE MINUTES"),
    ]


def test_folder_of_audio_and_transcripts(tmp_path, caplog):
    (tmp_path / "spk1").mkdir()
    write_sine(tmp_path / "spk1" / "a.wav", seconds=1.0)
    (tmp_path / "spk1" / "a.txt").write_text("Hello, world!\n")
    write_sine(tmp_path / "b.flac", seconds=0.5)
    (tmp_path / "b.txt").write_text("second one")
    write_sine(tmp_path / "orphan.wav", seconds=0.5)
    utts = import_corpus("folder", tmp_path, normalize=True, lang="en")
    assert [(u.id, u.text, u.lang) for u in utts] == [
        ("b", "second one", "en"),
        ("spk1-a", "hello world", "en"),
    ]
    assert "1 audio files without a .txt transcript" in caplog.text


def test_lhotse_cutset(tmp_path):
    from lhotse import CutSet, Recording, SupervisionSegment
    from lhotse.cut import MonoCut

    write_sine(tmp_path / "rec.wav", seconds=4.0)
    recording = Recording.from_file(tmp_path / "rec.wav", recording_id="rec")
    supervision = SupervisionSegment(
        id="s1",
        recording_id="rec",
        start=0.0,
        duration=2.0,
        text="hi there",
        speaker="A",
        language="en",
    )
    cut = MonoCut(
        id="c1", start=1.0, duration=2.0, channel=0, recording=recording, supervisions=[supervision]
    )
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([cut]).to_file(path)
    (utt,) = import_corpus("lhotse", path)
    assert (utt.id, utt.offset, utt.duration, utt.text, utt.speaker, utt.lang) == (
        "c1",
        1.0,
        2.0,
        "hi there",
        "A",
        "en",
    )
    assert utt.audio == str((tmp_path / "rec.wav").resolve())


def test_import_cli_writes_a_manifest(tmp_path, capsys):
    data = _kaldi_dir(tmp_path)
    out = tmp_path / "m.jsonl"
    assert main(["import", "--format", "kaldi", str(data), "--out", str(out)]) == 0
    assert "wrote 2 utterances" in capsys.readouterr().out
    assert len(read_manifest(out)) == 2
    assert json.loads(out.read_text().splitlines()[0])["id"] == "r1"
    assert main(["import", "--format", "folder", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "import source not found" in capsys.readouterr().err


def test_empty_source_is_an_error(tmp_path):
    with pytest.raises(EchoicError, match="no utterances found"):
        import_corpus("folder", tmp_path)
