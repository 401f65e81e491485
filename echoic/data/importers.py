"""Convert other corpus layouts into echoic manifests.

- kaldi:       a data dir with wav.scp, text and optional segments and utt2spk
- librispeech: a tree of <spk>/<chapter>/<spk>-<chapter>.trans.txt with .flac files
- folder:      audio files with a same-named .txt transcript beside each
- lhotse:      a lhotse CutSet manifest (needs the optional `lhotse` extra)
- musan:       a MUSAN-style tree of noise recordings (<category>/**/*.wav, no text), as a
               noise manifest for `data.augment.noise.files`

Every importer reads audio headers for durations, so a missing or unreadable file
is reported here, naming the line that points to it, instead of mid-training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from echoic.data.audio import EMPTY, audio_info
from echoic.data.manifest import Utterance
from echoic.data.text import normalize_text
from echoic.errors import AudioError, EchoicError, ManifestError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")


def import_corpus(
    kind: str, source: str | Path, *, normalize: bool = False, lang: str | None = None
) -> list[Utterance]:
    """Read a corpus of layout `kind`; `normalize` applies echoic's text normalisation."""
    importers: dict[str, Callable[[Path], list[Utterance]]] = {
        "kaldi": import_kaldi,
        "librispeech": import_librispeech,
        "folder": import_folder,
        "lhotse": import_lhotse,
        "musan": import_musan,
    }
    if kind not in importers:
        raise EchoicError(f"unknown import format '{kind}' (allowed: {', '.join(importers)})")
    source = Path(source)
    if not source.exists():
        raise EchoicError(f"import source not found: {source}")
    utterances = importers[kind](source)
    if lang is not None or normalize:
        utterances = [
            Utterance(
                id=u.id,
                audio=u.audio,
                text=normalize_text(u.text, lang or u.lang or "en") if normalize else u.text,
                duration=u.duration,
                speaker=u.speaker,
                lang=lang or u.lang,
                offset=u.offset,
            )
            for u in utterances
        ]
    if not utterances:
        raise EchoicError(f"no utterances found in {source} as a {kind} corpus")
    return utterances


def _duration(path: str, where: str) -> float:
    try:
        return audio_info(path).duration
    except AudioError as error:
        raise ManifestError(f"{where}: {error}") from None


# -- Kaldi ---------------------------------------------------------------------------------


def _read_table(
    path: Path, *, required: bool, allow_empty_value: bool = False
) -> dict[str, tuple[str, int]]:
    """A Kaldi `key value...` file as {key: (value, line)}."""
    if not path.is_file():
        if required:
            raise ManifestError(f"missing Kaldi file: {path}")
        return {}
    table: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            line = line.strip()
            if not line:
                continue
            key, _, value = line.partition(" ")
            value = value.strip()
            if not value and not allow_empty_value:
                raise ManifestError(f"{path}:{number}: expected '<id> <value>', got '{line}'")
            if key in table:
                raise ManifestError(f"{path}:{number}: duplicate id '{key}'")
            table[key] = (value, number)
    return table


def _kaldi_audio_path(value: str, where: str, base: Path) -> str:
    if value.endswith("|"):
        raise ManifestError(
            f"{where}: piped command in wav.scp is not supported ('{value}'); "
            "convert the audio to files first (e.g. with sox) and list their paths"
        )
    if len(value.split()) != 1 or (":" in value and value.rsplit(":", 1)[-1].isdigit()):
        raise ManifestError(f"{where}: expected a plain audio file path, got '{value}'")
    path = Path(value)
    return str(path if path.is_absolute() else (base / path).resolve())


def import_kaldi(data_dir: Path) -> list[Utterance]:
    wav_scp = data_dir / "wav.scp"
    recordings = _read_table(wav_scp, required=True)
    texts = _read_table(data_dir / "text", required=True, allow_empty_value=True)
    speakers = _read_table(data_dir / "utt2spk", required=False)
    segments = _read_table(data_dir / "segments", required=False)
    # Relative paths in wav.scp are relative to where Kaldi scripts run: the data
    # dir's grandparent (egs/<corpus>/s5); fall back to the data dir itself.
    base = data_dir.resolve().parent.parent

    paths: dict[str, str] = {}
    for recording, (value, number) in recordings.items():
        where = f"{wav_scp}:{number}"
        path = _kaldi_audio_path(value, where, base)
        if not os.path.exists(path) and not os.path.isabs(value):
            path = str((data_dir / value).resolve())
        paths[recording] = path

    utterances: list[Utterance] = []
    missing_text = 0
    if segments:
        for utt_id, (value, number) in tqdm(
            segments.items(), desc="kaldi", unit="utt", leave=False
        ):
            where = f"{data_dir / 'segments'}:{number}"
            fields = value.split()
            if len(fields) != 3:
                raise ManifestError(f"{where}: expected '<utt> <recording> <start> <end>'")
            recording, start_s, end_s = fields
            if recording not in paths:
                raise ManifestError(f"{where}: recording '{recording}' is not in wav.scp")
            try:
                start, end = float(start_s), float(end_s)
            except ValueError:
                raise ManifestError(f"{where}: start and end must be numbers of seconds") from None
            if utt_id not in texts:
                missing_text += 1
                continue
            total = _duration(paths[recording], f"{wav_scp}:{recordings[recording][1]}")
            if end < 0 or end > total:  # Kaldi writes -1 for "to the end"
                end = total
            if not 0 <= start < end:
                raise ManifestError(
                    f"{where}: segment [{start}, {end}] is empty or outside the audio"
                )
            utterances.append(
                Utterance(
                    id=utt_id,
                    audio=paths[recording],
                    text=texts[utt_id][0],
                    duration=round(end - start, 6),
                    speaker=speakers.get(utt_id, (None,))[0],
                    offset=start,
                )
            )
    else:
        for utt_id, path in tqdm(paths.items(), desc="kaldi", unit="utt", leave=False):
            if utt_id not in texts:
                missing_text += 1
                continue
            utterances.append(
                Utterance(
                    id=utt_id,
                    audio=path,
                    text=texts[utt_id][0],
                    duration=_duration(path, f"{wav_scp}:{recordings[utt_id][1]}"),
                    speaker=speakers.get(utt_id, (None,))[0],
                )
            )
    if missing_text:
        log.warning(
            "kaldi import: %d utterances without a transcript in 'text' were left out", missing_text
        )
    return utterances


# -- LibriSpeech ---------------------------------------------------------------------------


def import_librispeech(root: Path) -> list[Utterance]:
    utterances: list[Utterance] = []
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise ManifestError(f"no *.trans.txt files under {root}")
    for trans in tqdm(transcripts, desc="librispeech", unit="chapter", leave=False):
        with trans.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                line = line.strip()
                if not line:
                    continue
                utt_id, _, text = line.partition(" ")
                where = f"{trans}:{number}"
                audio = next(
                    (
                        trans.parent / f"{utt_id}{s}"
                        for s in AUDIO_SUFFIXES
                        if (trans.parent / f"{utt_id}{s}").exists()
                    ),
                    trans.parent / f"{utt_id}.flac",
                )
                utterances.append(
                    Utterance(
                        id=utt_id,
                        audio=str(audio.resolve()),
                        text=text.strip(),
                        duration=_duration(str(audio), where),
                        speaker=utt_id.split("-")[0],
                    )
                )
    return utterances


# -- folder of audio + .txt ----------------------------------------------------------------


def import_folder(root: Path) -> list[Utterance]:
    audio_files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )
    utterances: list[Utterance] = []
    without_text = []
    for path in tqdm(audio_files, desc="folder", unit="file", leave=False):
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            without_text.append(path)
            continue
        text = " ".join(transcript.read_text(encoding="utf-8").split())
        relative = path.relative_to(root).with_suffix("")
        utterances.append(
            Utterance(
                id="-".join(relative.parts),
                audio=str(path.resolve()),
                text=text,
                duration=_duration(str(path), str(path)),
            )
        )
    if without_text:
        log.warning(
            "folder import: %d audio files without a .txt transcript were left out (e.g. %s)",
            len(without_text),
            without_text[0],
        )
    return utterances


# -- MUSAN ---------------------------------------------------------------------------------


def import_musan(root: Path) -> list[Utterance]:
    """Every audio file under `root` as a noise entry: empty text, the top folder under
    `root` (MUSAN's noise, music or speech) as `speaker`. Noise is not transcribed data,
    so an unreadable or empty file is left out and counted instead of stopping the import."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    utterances: list[Utterance] = []
    skipped: dict[str, list[Path]] = {}
    for path in tqdm(files, desc="musan", unit="file", leave=False):
        try:
            duration = audio_info(str(path)).duration
            if duration == 0:
                raise AudioError(EMPTY, f"{path}: no audio samples")
        except AudioError as error:
            skipped.setdefault(error.reason, []).append(path)
            continue
        relative = path.relative_to(root)
        utterances.append(
            Utterance(
                id="-".join(relative.with_suffix("").parts),
                audio=str(path.resolve()),
                text="",
                duration=duration,
                speaker=relative.parts[0] if len(relative.parts) > 1 else None,
            )
        )
    if skipped:
        counts = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(skipped.items()))
        first = next(iter(skipped.values()))[0]
        log.warning("musan import: left out %s (e.g. %s)", counts, first)
    return utterances


# -- lhotse --------------------------------------------------------------------------------


def import_lhotse(path: Path) -> list[Utterance]:
    try:
        from lhotse import CutSet
    except ImportError as error:
        raise EchoicError(
            f"importing lhotse manifests needs lhotse ({error}): pip install 'echoic[lhotse]'"
        ) from None
    try:
        cuts = CutSet.from_file(path)
    except Exception as error:  # lhotse raises many types for a bad file
        raise ManifestError(f"{path}: not a lhotse CutSet manifest ({error})") from None
    utterances: list[Utterance] = []
    for number, cut in enumerate(cuts, start=1):
        where = f"{path}: cut {number} ('{cut.id}')"
        recording = getattr(cut, "recording", None)
        if recording is None:
            raise ManifestError(f"{where}: has no recording")
        if len(recording.sources) != 1 or recording.sources[0].type != "file":
            raise ManifestError(
                f"{where}: only recordings with one audio file source are supported"
            )
        audio = Path(recording.sources[0].source)
        if not audio.is_absolute():
            audio = (path.resolve().parent / audio).resolve()
        supervisions = sorted(cut.supervisions, key=lambda s: s.start)
        text = " ".join((s.text or "").strip() for s in supervisions).strip()
        first = supervisions[0] if supervisions else None
        utterances.append(
            Utterance(
                id=cut.id,
                audio=str(audio),
                text=text,
                duration=float(cut.duration),
                speaker=first.speaker if first else None,
                lang=first.language if first else None,
                offset=float(cut.start),
            )
        )
    return utterances
