import json

import pytest

from echoic.data.manifest import Utterance, read_manifest, write_manifest
from echoic.errors import ManifestError


def test_round_trip_with_relative_paths(tmp_path):
    utts = [
        Utterance("a", str(tmp_path / "wav" / "a.wav"), "hello", 1.5, speaker="s1", lang="en"),
        Utterance("b", "/elsewhere/b.flac", "world", 2.0, offset=3.25),
    ]
    path = tmp_path / "m.jsonl"
    assert write_manifest(path, utts) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "id": "a",
        "audio": "wav/a.wav",
        "text": "hello",
        "duration": 1.5,
        "speaker": "s1",
        "lang": "en",
    }
    assert lines[1]["audio"] == "/elsewhere/b.flac" and lines[1]["offset"] == 3.25
    manifest = read_manifest(path)
    assert manifest.utterances == utts
    assert manifest.where(1) == f"{path}:2"


def _write(tmp_path, *lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"id": "a", "audio": "a.wav", "text": "x", "duration": 1.0}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"id": "b", "audio": "b.wav", "text": "x", "duration": 1.0',
            r"bad.jsonl:3: malformed JSON",
        ),
        ('{"id": "b", "audio": "b.wav", "text": "x"}', r"bad.jsonl:3: missing key 'duration'"),
        (
            '{"id": "b", "audio": "b.wav", "text": "x", "duration": 1, "spk": "s"}',
            r":3: unknown key 'spk' \(allowed: id, audio",
        ),
        ('{"id": "b", "audio": "b.wav", "text": 5, "duration": 1}', r":3: 'text' must be a string"),
        (
            '{"id": "b", "audio": "b.wav", "text": "x", "duration": "long"}',
            r":3: 'duration' must be a finite number",
        ),
        (
            '{"id": "b", "audio": "b.wav", "text": "x", "duration": -1}',
            r":3: 'duration' and 'offset' must not be negative",
        ),
        ("[1, 2]", r":3: expected a JSON object"),
        (GOOD, r":3: duplicate id 'a' \(first on line 1\)"),
    ],
)
def test_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, GOOD, "", line)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest not found: .*nope\.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_empty_text_is_allowed_when_reading(tmp_path):
    # Empty transcripts are skipped (and counted) by the data pipeline, not rejected here.
    path = _write(tmp_path, '{"id": "a", "audio": "a.wav", "text": "", "duration": 1.0}')
    assert read_manifest(path).utterances[0].text == ""
