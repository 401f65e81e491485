"""`echoic score`: word and character error rates, alignments, worst utterances, and
hotword recall/precision with biased and unbiased word error rates.

Error counts come from a minimum-edit alignment (rapidfuzz's Levenshtein opcodes, as
jiwer uses, so the numbers and their S/D/I breakdown equal jiwer's). Words are split
on whitespace; CJK text is scored per character (a Han character is a word), and its
CER ignores spaces. Text is compared as given unless normalisation flags say otherwise.

B-WER and U-WER (Le et al., 2021, "Contextualized streaming end-to-end speech
recognition with trie-based deep biasing"): reference words inside a hotword phrase
occurrence are "biased"; substitutions and deletions count for the class of their
reference word, insertions for the biased class when the inserted word belongs to a
hotword phrase occurrence in the hypothesis.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from echoic.data.manifest import read_manifest
from echoic.data.text import is_cjk
from echoic.errors import EchoicError


@dataclass
class Counts:
    sub: int = 0
    dele: int = 0
    ins: int = 0
    ref: int = 0

    @property
    def errors(self) -> int:
        return self.sub + self.dele + self.ins

    @property
    def rate(self) -> float:
        return self.errors / self.ref if self.ref else (0.0 if not self.errors else float("inf"))

    def __iadd__(self, other: Counts) -> Counts:
        self.sub += other.sub
        self.dele += other.dele
        self.ins += other.ins
        self.ref += other.ref
        return self


def normalise(text: str, *, lowercase: bool, remove_punctuation: bool) -> str:
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = "".join(" " if unicodedata.category(c)[0] in "PS" and c != "'" else c for c in text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Whitespace words; each CJK character is a word of its own."""
    out: list[str] = []
    for word in text.split():
        run = ""
        for char in word:
            if is_cjk(char):
                if run:
                    out.append(run)
                    run = ""
                out.append(char)
            else:
                run += char
        if run:
            out.append(run)
    return out


def characters(text: str) -> list[str]:
    """CER units: every character, spaces included (as jiwer counts them), except in
    CJK text, which is written without spaces."""
    if any(is_cjk(c) for c in text):
        return [c for c in text if not c.isspace()]
    return list(" ".join(text.split()))


def align(
    ref: list[str], hyp: list[str]
) -> tuple[Counts, list[tuple[str, str | None, str | None]]]:
    """Counts and the alignment as (op, ref item, hyp item), op in ok/sub/del/ins."""
    counts = Counts(ref=len(ref))
    pairs: list[tuple[str, str | None, str | None]] = []
    for tag, r0, r1, h0, h1 in Levenshtein.opcodes(ref, hyp):
        if tag == "equal":
            pairs.extend(("ok", ref[i], hyp[j]) for i, j in zip(range(r0, r1), range(h0, h1)))
        elif tag == "replace":
            counts.sub += r1 - r0
            pairs.extend(("sub", ref[i], hyp[j]) for i, j in zip(range(r0, r1), range(h0, h1)))
        elif tag == "delete":
            counts.dele += r1 - r0
            pairs.extend(("del", ref[i], None) for i in range(r0, r1))
        else:
            counts.ins += h1 - h0
            pairs.extend(("ins", None, hyp[j]) for j in range(h0, h1))
    return counts, pairs


def _occurrences(tokens: list[str], phrases: list[list[str]]) -> list[bool]:
    """For each word: whether it lies inside an occurrence of one of the phrases."""
    inside = [False] * len(tokens)
    for phrase in phrases:
        size = len(phrase)
        for start in range(len(tokens) - size + 1):
            if tokens[start : start + size] == phrase:
                inside[start : start + size] = [True] * size
    return inside


def _count(tokens: list[str], phrase: list[str]) -> int:
    size = len(phrase)
    return sum(tokens[i : i + size] == phrase for i in range(len(tokens) - size + 1))


@dataclass
class ScoreReport:
    words: Counts = field(default_factory=Counts)
    chars: Counts = field(default_factory=Counts)
    utterances: int = 0
    missing: list[str] = field(default_factory=list)  # reference ids without a hypothesis
    per_utterance: list[dict] = field(default_factory=list)
    hotwords: dict | None = None

    def to_dict(self, worst: int = 10) -> dict:
        out = {
            "wer": self.words.rate,
            "cer": self.chars.rate,
            "sub": self.words.sub,
            "del": self.words.dele,
            "ins": self.words.ins,
            "n_ref_words": self.words.ref,
            "n_ref_chars": self.chars.ref,
            "char_sub": self.chars.sub,
            "char_del": self.chars.dele,
            "char_ins": self.chars.ins,
            "utterances": self.utterances,
            "missing_hypotheses": len(self.missing),
            "worst": self.worst(worst),
        }
        if self.hotwords is not None:
            out["hotwords"] = self.hotwords
        return out

    def worst(self, count: int) -> list[dict]:
        ranked = sorted(self.per_utterance, key=lambda u: (-u["errors"], u["id"]))
        return [u for u in ranked[:count] if u["errors"]]


def score_texts(
    refs: dict[str, str], hyps: dict[str, str], hotwords: list[str] | None = None
) -> ScoreReport:
    report = ScoreReport(utterances=len(refs))
    biased, unbiased = Counts(), Counts()
    phrases = [p.split() for p in hotwords or []]
    phrase_stats = {p: [0, 0, 0] for p in (hotwords or [])}  # ref count, hyp count, matched
    for utt_id, ref_text in refs.items():
        if utt_id not in hyps:
            report.missing.append(utt_id)
        hyp_text = hyps.get(utt_id, "")
        ref_words, hyp_words = words(ref_text), words(hyp_text)
        counts, pairs = align(ref_words, hyp_words)
        report.words += counts
        char_counts, _ = align(characters(ref_text), characters(hyp_text))
        report.chars += char_counts
        report.per_utterance.append(
            {
                "id": utt_id,
                "errors": counts.errors,
                "ref_words": counts.ref,
                "sub": counts.sub,
                "del": counts.dele,
                "ins": counts.ins,
                "alignment": pairs,
            }
        )
        if phrases:
            ref_inside, hyp_inside = (
                _occurrences(ref_words, phrases),
                _occurrences(hyp_words, phrases),
            )
            r = h = 0
            for op, _, _ in pairs:
                if op == "ins":
                    target = biased if hyp_inside[h] else unbiased
                    target.ins += 1
                    h += 1
                    continue
                target = biased if ref_inside[r] else unbiased
                target.ref += 1
                if op == "sub":
                    target.sub += 1
                elif op == "del":
                    target.dele += 1
                r += 1
                h += op != "del"
            for text, phrase in zip(hotwords, phrases):
                in_ref, in_hyp = _count(ref_words, phrase), _count(hyp_words, phrase)
                stats = phrase_stats[text]
                stats[0] += in_ref
                stats[1] += in_hyp
                stats[2] += min(in_ref, in_hyp)
    if phrases:
        ref_total = sum(s[0] for s in phrase_stats.values())
        hyp_total = sum(s[1] for s in phrase_stats.values())
        matched = sum(s[2] for s in phrase_stats.values())
        report.hotwords = {
            "recall": matched / ref_total if ref_total else None,
            "precision": matched / hyp_total if hyp_total else None,
            "ref_occurrences": ref_total,
            "hyp_occurrences": hyp_total,
            "matched": matched,
            "b_wer": biased.rate if biased.ref else None,
            "u_wer": unbiased.rate if unbiased.ref else None,
            "biased_ref_words": biased.ref,
            "unbiased_ref_words": unbiased.ref,
        }
    return report


def read_hypotheses(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise EchoicError(f"hypothesis file not found: {path}")
    hyps: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            hyps[record["id"]] = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EchoicError(
                f"{path}:{number}: expected a JSON object with 'id' and 'text'"
            ) from None
    return hyps


def write_alignment(report: ScoreReport, path: Path) -> None:
    lines = []
    for utt in report.per_utterance:
        lines.append(
            f"{utt['id']}  S={utt['sub']} D={utt['del']} I={utt['ins']}  "
            f"({utt['errors']}/{utt['ref_words']})"
        )
        ref_row, hyp_row = [], []
        for op, r, h in utt["alignment"]:
            r, h = r or "*" * len(h or ""), h or "*" * len(r or "")
            if op != "ok":
                r, h = r.upper(), h.upper()
            width = max(len(r), len(h))
            ref_row.append(r.ljust(width))
            hyp_row.append(h.ljust(width))
        lines.extend([f"REF: {' '.join(ref_row)}", f"HYP: {' '.join(hyp_row)}", ""])
    path.write_text("\n".join(lines))


def speaker_groups(ref_manifest: str | Path, train_manifest: str | Path) -> dict[str, str]:
    """Reference id -> "<engine> seen" or "<engine> unseen": whether its speaker is heard
    in `train_manifest`, with the part of the speaker name before ':' (the synthesizer,
    for the built-in corpus: espeak, festival; empty for plain speaker names). Without
    a speaker, "unknown"."""
    heard = {u.speaker for u in read_manifest(train_manifest).utterances if u.speaker}
    groups = {}
    for utterance in read_manifest(ref_manifest).utterances:
        speaker = utterance.speaker
        if not speaker:
            groups[utterance.id] = "unknown"
            continue
        engine = speaker.split(":", 1)[0] + " " if ":" in speaker else ""
        groups[utterance.id] = f"{engine}{'seen' if speaker in heard else 'unseen'}"
    return groups


def group_rates(report: ScoreReport, groups: dict[str, str]) -> dict[str, dict]:
    """WER per group of utterances (sorted by group name): wer, utterances, ref_words."""
    counts: dict[str, Counts] = {}
    sizes: dict[str, int] = {}
    for utterance in report.per_utterance:
        group = groups.get(utterance["id"], "unknown")
        total = counts.setdefault(group, Counts())
        total += Counts(
            sub=utterance["sub"],
            dele=utterance["del"],
            ins=utterance["ins"],
            ref=utterance["ref_words"],
        )
        sizes[group] = sizes.get(group, 0) + 1
    return {
        g: {"wer": counts[g].rate, "utterances": sizes[g], "ref_words": counts[g].ref}
        for g in sorted(counts)
    }


def score_files(
    ref_manifest: str | Path,
    hyp_path: str | Path,
    *,
    lowercase: bool = False,
    remove_punctuation: bool = False,
    hotwords: list[str] | None = None,
    alignment: str | Path | None = None,
) -> ScoreReport:
    def norm(text: str) -> str:
        return normalise(text, lowercase=lowercase, remove_punctuation=remove_punctuation)

    refs = {u.id: norm(u.text) for u in read_manifest(ref_manifest).utterances}
    hyps = {k: norm(v) for k, v in read_hypotheses(hyp_path).items()}
    report = score_texts(refs, hyps, [norm(h) for h in hotwords] if hotwords else None)
    path = Path(alignment) if alignment else Path(hyp_path).with_name("alignment.txt")
    write_alignment(report, path)
    return report
