"""JSONL manifests: one utterance per line.

    {"id": "u1", "audio": "wav/u1.wav", "text": "hello world", "duration": 1.52,
     "speaker": "s1", "lang": "en", "offset": 0.0}

`id`, `audio`, `text` and `duration` (seconds) are required; `speaker`, `lang` and
`offset` (seconds into the audio file) are optional. A relative `audio` path is
relative to the manifest's own folder, so a corpus folder can be moved or copied
as a whole. Errors name the file and line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from echoic.errors import ManifestError

_REQUIRED = ("id", "audio", "text", "duration")
_OPTIONAL = ("speaker", "lang", "offset")


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute path once read from a manifest
    text: str
    duration: float  # seconds of audio used (from `offset`)
    speaker: str | None = None
    lang: str | None = None
    offset: float = 0.0  # seconds into the audio file where this utterance starts

    def to_json(self, base_dir: Path | None = None) -> str:
        record: dict[str, object] = {
            "id": self.id,
            "audio": _relative_if_inside(self.audio, base_dir),
            "text": self.text,
            "duration": self.duration,
        }
        if self.speaker is not None:
            record["speaker"] = self.speaker
        if self.lang is not None:
            record["lang"] = self.lang
        if self.offset:
            record["offset"] = self.offset
        return json.dumps(record, ensure_ascii=False)


@dataclass(frozen=True)
class Manifest:
    """The utterances of one manifest file, with the line each came from (for errors)."""

    path: Path
    utterances: list[Utterance]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.utterances)

    def where(self, index: int) -> str:
        """'path:line' of utterance `index`."""
        return f"{self.path}:{self.lines[index]}"


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest. Raises `ManifestError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base_dir = path.resolve().parent
    utterances: list[Utterance] = []
    lines: list[int] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            utterance = _parse_line(line, f"{path}:{number}", base_dir)
            if utterance.id in first_line_of:
                raise ManifestError(
                    f"{path}:{number}: duplicate id '{utterance.id}' "
                    f"(first on line {first_line_of[utterance.id]})"
                )
            first_line_of[utterance.id] = number
            utterances.append(utterance)
            lines.append(number)
    return Manifest(path=path, utterances=utterances, lines=lines)


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> int:
    """Write utterances as JSONL (atomically); audio under the manifest's folder is stored
    relative to it. Returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as stream:
        for utterance in utterances:
            stream.write(utterance.to_json(base_dir) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def _relative_if_inside(audio: str, base_dir: Path | None) -> str:
    if base_dir is None or not os.path.isabs(audio):
        return audio
    try:
        return Path(audio).relative_to(base_dir).as_posix()
    except ValueError:
        return audio


def _parse_line(line: str, where: str, base_dir: Path) -> Utterance:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{where}: malformed JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in _REQUIRED and key not in _OPTIONAL:
            allowed = ", ".join(_REQUIRED + _OPTIONAL)
            raise ManifestError(f"{where}: unknown key '{key}' (allowed: {allowed})")
    for key in _REQUIRED:
        if key not in record:
            raise ManifestError(f"{where}: missing key '{key}'")
    for key in ("id", "audio", "text"):
        if not isinstance(record[key], str):
            raise ManifestError(f"{where}: '{key}' must be a string")
    if not record["id"] or not record["audio"]:
        raise ManifestError(f"{where}: 'id' and 'audio' must not be empty")
    duration = _number(record, "duration", where)
    offset = _number(record, "offset", where) if "offset" in record else 0.0
    if duration < 0 or offset < 0:
        raise ManifestError(f"{where}: 'duration' and 'offset' must not be negative")
    for key in ("speaker", "lang"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise ManifestError(f"{where}: '{key}' must be a string")
    audio = record["audio"]
    if not os.path.isabs(audio):
        audio = str(base_dir / audio)
    return Utterance(
        id=record["id"],
        audio=audio,
        text=record["text"],
        duration=duration,
        speaker=record.get("speaker"),
        lang=record.get("lang"),
        offset=offset,
    )


def _number(record: dict, key: str, where: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"{where}: '{key}' must be a finite number of seconds, got {value!r}")
    return float(value)
