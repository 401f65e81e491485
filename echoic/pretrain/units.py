"""`echoic kmeans`: frame-level cluster labels ("units") as HuBERT's pretraining targets.

Iteration 1 clusters 39-dim MFCC (13 cepstra with deltas and delta-deltas); iteration 2
clusters a chosen hidden layer of an SSL model (a HuggingFace folder, such as the one
`echoic export --format hf` writes). K-means itself is a well-kept library's:
scikit-learn's MiniBatchKMeans, or faiss where it is installed. Every label is then the
nearest centroid, computed by echoic from the centroids alone, so both libraries'
labels mean the same thing and a saved `centroids.safetensors` labels new audio.

Labels are aligned to HuBERT's 20 ms frames: a wav2vec2-style feature extractor gives
frame i from samples [320 i, 320 i + 400) at 16 kHz (receptive field 25 ms, stride 20
ms), which is exactly MFCC frame 2 i at a 10 ms shift with a 25 ms window (snip_edges),
so iteration 1 takes every second MFCC frame and the counts agree for every length.

The output folder is a `data.lang` folder and its manifests are training manifests:
`<name>.jsonl` for each input manifest, the same utterances with `text` replaced by
their labels as space-separated integers, and `tokenizer.json` of kind `units` (the
K cluster ids). `report.json` says whether the targets mean anything before compute is
spent on them: cluster usage, label perplexity, and with `--align-exp` (a CTC model of
the same audio), cluster purity, character purity and character-normalised mutual
information (`unit_agreement`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import kaldi_native_fbank as knf
import numpy as np
from tqdm import tqdm

from echoic.data.audio import load_audio
from echoic.data.features import INT16_SCALE
from echoic.data.manifest import Manifest, Utterance, read_manifest, write_manifest
from echoic.data.tokenizer import UnitTokenizer
from echoic.data.workers import fork_map
from echoic.errors import AudioError, EchoicError
from echoic.seeding import make_rng

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
UNIT_SHIFT_MS = 20  # HuBERT's frame: the wav2vec2 feature extractor's stride ...
UNIT_WINDOW_MS = 25  # ... and receptive field
MFCC_SHIFT_MS = 10  # every second MFCC frame is a unit frame
_CHUNK = 32  # utterances per work item

Backend = Literal["sklearn", "faiss"]


def unit_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """20 ms frames (25 ms windows, no padding) in `num_samples` samples: as many as a
    wav2vec2-style feature extractor gives."""
    window = sample_rate * UNIT_WINDOW_MS // 1000
    shift = sample_rate * UNIT_SHIFT_MS // 1000
    return max(0, (num_samples - window) // shift + 1)


def add_deltas(feats: np.ndarray, order: int = 2, window: int = 2) -> np.ndarray:
    """(T, D) -> (T, D * (order + 1)): the features, their deltas and delta-deltas by
    Kaldi's regression formula (sum_n n (x[t+n] - x[t-n]) / (2 sum_n n^2), the edge
    frames repeated)."""
    outputs = [feats]
    current = feats
    scale = 2 * sum(n * n for n in range(1, window + 1))
    for _ in range(order):
        padded = np.pad(current, ((window, window), (0, 0)), mode="edge")
        steps = len(current)
        delta = sum(
            n * (padded[window + n : window + n + steps] - padded[window - n : window - n + steps])
            for n in range(1, window + 1)
        )
        current = (delta / scale).astype(np.float32)
        outputs.append(current)
    return np.concatenate(outputs, axis=1)


def mfcc_units_features(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(samples,) -> (unit_frames, 39) float32: 13 MFCC (no energy, no dither) with
    deltas and delta-deltas, every second 10 ms frame, normalised per utterance to zero
    mean and unit variance per dimension (k-means' Euclidean distance would otherwise be
    dominated by the first cepstra and by the speaker's channel)."""
    options = knf.MfccOptions()
    options.frame_opts.samp_freq = sample_rate
    options.frame_opts.frame_shift_ms = MFCC_SHIFT_MS
    options.frame_opts.frame_length_ms = UNIT_WINDOW_MS
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.num_ceps = 13
    options.use_energy = False
    mfcc = knf.OnlineMfcc(options)
    mfcc.accept_waveform(sample_rate, np.asarray(samples, dtype=np.float32) * INT16_SCALE)
    mfcc.input_finished()
    count = mfcc.num_frames_ready
    if count == 0:
        return np.zeros((0, 39), dtype=np.float32)
    feats = np.stack([mfcc.get_frame(i) for i in range(count)]).astype(np.float32)
    feats = add_deltas(feats)[::2]
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    return feats.astype(np.float32)


@dataclass(frozen=True)
class FeatureSpec:
    """`mfcc`, or `ssl:PATH:LAYER` (hidden state LAYER of the HuggingFace model at PATH)."""

    kind: Literal["mfcc", "ssl"]
    path: str | None = None
    layer: int | None = None

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        if text == "mfcc":
            return cls("mfcc")
        if text.startswith("ssl:"):
            path, _, layer = text[4:].rpartition(":")
            if path and layer.isdigit():
                return cls("ssl", path, int(layer))
        raise EchoicError(f"--features must be mfcc or ssl:PATH:LAYER, got {text!r}")


class FeatureExtractor:
    """Unit-frame features of one utterance's samples, for either kind of spec."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.frontend = None
        if spec.kind == "ssl":
            from echoic.models.ssl import SslFrontend, SslFrontendConfig

            self.frontend = SslFrontend(SslFrontendConfig(spec.path, layer=spec.layer)).eval()
            shift = self.frontend.frame_shift * 1000
            if abs(shift - UNIT_SHIFT_MS) > 1e-6:
                raise EchoicError(
                    f"{spec.path}: frames of {shift:g} ms; unit labels are {UNIT_SHIFT_MS} ms"
                )

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.frontend is None:
            return mfcc_units_features(samples)
        import torch

        with torch.inference_mode():
            audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
            states, frame_lens = self.frontend.hidden_states(audio, torch.tensor([audio.shape[1]]))
            feats = self.frontend.combine(states, frame_lens)[0]
        # Pad or cut to the label count (an extractor with another receptive field may
        # give one frame more or less at the end).
        frames = unit_frames(len(samples))
        feats = feats.numpy()[:frames]
        if len(feats) < frames:
            feats = np.pad(feats, ((0, frames - len(feats)), (0, 0)), mode="edge")
        return feats.astype(np.float32)


_EXTRACTOR: FeatureExtractor | None = None
_CENTROIDS: np.ndarray | None = None


def _features_chunk(items: list[tuple[str, str, float, float]]) -> list[tuple]:
    """-> (utterance id, features or None, skip reason) for each item."""
    results = []
    for utt_id, audio, offset, duration in items:
        try:
            samples = load_audio(
                audio, sample_rate=SAMPLE_RATE, offset=offset, duration=duration or None
            )
            feats = _EXTRACTOR(samples)
            if len(feats) == 0:
                raise AudioError("too_short", "shorter than one 25 ms frame")
            results.append((utt_id, feats, None))
        except AudioError as error:
            results.append((utt_id, None, f"{error.reason}: {error}"))
    return results


def _labels_chunk(items: list[tuple[str, str, float, float]]) -> list[tuple]:
    return [
        (utt_id, None if feats is None else assign(feats, _CENTROIDS), reason)
        for utt_id, feats, reason in _features_chunk(items)
    ]


def _items(utterances: Sequence[Utterance]) -> list[list[tuple[str, str, float, float]]]:
    items = [(u.id, u.audio, u.offset, u.duration) for u in utterances]
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def assign(feats: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(T, D) features, (K, D) centroids -> (T,) int64 index of the nearest centroid."""
    distances = (
        (feats * feats).sum(1, keepdims=True)
        - 2.0 * feats @ centroids.T
        + (centroids * centroids).sum(1)[None]
    )
    return distances.argmin(1).astype(np.int64)


def fit_kmeans(frames: np.ndarray, k: int, seed: int, backend: Backend = "sklearn") -> np.ndarray:
    """(N, D) frames -> (K, D) float32 centroids, the same for the same frames and seed."""
    if len(frames) < k:
        raise EchoicError(f"{len(frames)} sampled frames are fewer than --k {k}")
    if backend == "sklearn":
        from sklearn.cluster import MiniBatchKMeans

        # fairseq's HuBERT settings: k-means++ init on a subsample, 10k-frame batches.
        model = MiniBatchKMeans(
            n_clusters=k,
            init="k-means++",
            max_iter=100,
            batch_size=10000,
            n_init=20,
            max_no_improvement=100,
            reassignment_ratio=0.0,
            compute_labels=False,
            random_state=seed,
        )
        model.fit(frames)
        return model.cluster_centers_.astype(np.float32)
    try:
        import faiss
    except ImportError:
        raise EchoicError("--backend faiss needs faiss-cpu: pip install faiss-cpu") from None
    model = faiss.Kmeans(frames.shape[1], k, niter=100, seed=seed, verbose=False)
    model.train(np.ascontiguousarray(frames, dtype=np.float32))
    return np.asarray(model.centroids, dtype=np.float32)


def inertia(frames: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each frame to its nearest centroid."""
    nearest = centroids[assign(frames, centroids)]
    return float(((frames - nearest) ** 2).sum(1).mean())


def label_statistics(labels: Sequence[np.ndarray], k: int) -> dict:
    """Cluster usage and label perplexity (exp of the labels' entropy; K at most, for
    clusters used equally)."""
    counts = np.bincount(np.concatenate(list(labels)), minlength=k) if labels else np.zeros(k)
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum())
    return {
        "frames": int(total),
        "clusters_used": int((counts > 0).sum()),
        "usage": float((counts > 0).mean()),
        "perplexity": math.exp(entropy),
        "uniform_perplexity": k,
        "largest_cluster_share": float(counts.max() / max(total, 1)),
    }


def unit_agreement(
    labelled: Sequence[tuple[Utterance, np.ndarray]], align_exp: str | Path, max_utts: int = 300
) -> dict:
    """How well cluster labels agree with the characters spoken: each unit frame gets
    the character whose stretch it lies in (from a CTC forced alignment of the
    transcript by the model in `align_exp`: a token's stretch runs from its first frame
    to the next token's; frames before the first and after the last are silence), then
    cluster purity (each cluster's most common character), character purity (each
    character's most common cluster) and character-normalised mutual information
    I(char; cluster) / H(char), HuBERT's "PNMI" with characters for phones."""
    import torch

    from echoic.decode.align import ctc_forced_align
    from echoic.decode.transcribe import inputs_batch
    from echoic.train.experiment import load_experiment_model

    model, tokenizer, _ = load_experiment_model(align_exp)
    if getattr(model, "ctc", None) is None:
        raise EchoicError(f"--align-exp {align_exp}: the model has no CTC head to align with")
    shift = model.frontend.frame_shift * getattr(model.encoder.subsampling, "factor", 1)
    pairs: dict[tuple[str, int], int] = {}
    aligned = 0
    for utterance, labels in sorted(labelled, key=lambda item: item[0].id)[:max_utts]:
        tokens = tokenizer.encode(utterance.text)
        try:
            samples = load_audio(
                utterance.audio,
                sample_rate=model.input_spec.sample_rate,
                offset=utterance.offset,
                duration=utterance.duration or None,
            )
        except AudioError:
            continue
        inputs = model.frontend.inputs_from_samples(torch.from_numpy(samples))
        seconds = len(samples) / model.input_spec.sample_rate
        batch = inputs_batch(model, [utterance.id], [inputs], [seconds])
        with torch.inference_mode():
            encoded, lens = model.encode(batch)
            log_probs = model.ctc.log_probs(encoded)[0, : int(lens[0])]
        path = ctc_forced_align(log_probs, tokens, tokenizer.blank_id)
        if not tokens or not path:
            continue
        aligned += 1
        first = {}
        for frame, index in enumerate(path):
            if index >= 0 and index not in first:
                first[index] = frame
        last_emit = max(f for f, index in enumerate(path) if index >= 0)
        starts = [first[i] for i in range(len(tokens))]
        for i, cluster in enumerate(labels.tolist()):
            frame = int((i * UNIT_SHIFT_MS + UNIT_WINDOW_MS / 2) / 1000 / shift)
            if frame < starts[0] or frame > last_emit:
                char = "<sil>"
            else:
                index = int(np.searchsorted(starts, frame, side="right")) - 1
                char = tokenizer.tokens[tokens[index]]
            pairs[(char, cluster)] = pairs.get((char, cluster), 0) + 1
    if not pairs:
        raise EchoicError(f"--align-exp {align_exp}: no utterance could be aligned")
    chars = sorted({c for c, _ in pairs})
    clusters = sorted({k for _, k in pairs})
    joint = np.zeros((len(chars), len(clusters)))
    for (c, k), n in pairs.items():
        joint[chars.index(c), clusters.index(k)] = n
    joint /= joint.sum()
    p_char, p_cluster = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float(
        (joint[nonzero] * np.log(joint[nonzero] / np.outer(p_char, p_cluster)[nonzero])).sum()
    )
    entropy = float(-(p_char[p_char > 0] * np.log(p_char[p_char > 0])).sum())
    return {
        "align_exp": str(align_exp),
        "utterances": aligned,
        "characters": len(chars),
        "cluster_purity": float(joint.max(0).sum()),
        "char_purity": float(joint.max(1).sum()),
        "char_nmi": mutual / entropy if entropy else 0.0,
        "majority_char_share": float(p_char.max()),  # purity of one cluster for all
    }


@dataclass
class KmeansResult:
    centroids: np.ndarray
    report: dict
    manifests: list[Path]


def kmeans_units(
    manifests: Sequence[str | Path],
    out: str | Path,
    *,
    features: str = "mfcc",
    k: int = 100,
    seed: int = 0,
    sample_fraction: float = 0.1,
    max_sample_frames: int = 300_000,
    backend: Backend = "sklearn",
    jobs: int = 1,
    align_exp: str | Path | None = None,
    align_max_utts: int = 300,
    progress: bool = False,
) -> KmeansResult:
    """Fit k-means on a sample of the first manifest's frames and label every manifest
    (see the module docstring for what is written to `out`)."""
    global _EXTRACTOR, _CENTROIDS
    if k < 2:
        raise EchoicError("--k must be at least 2")
    if not 0.0 < sample_fraction <= 1.0:
        raise EchoicError("--sample-fraction must be in (0, 1]")
    out = Path(out)
    spec = FeatureSpec.parse(features)
    read = [read_manifest(path) for path in manifests]
    names = [Path(m.path).name for m in read]
    if len(set(names)) != len(names):
        raise EchoicError(f"manifests must have different file names: {names}")
    _EXTRACTOR = FeatureExtractor(spec)
    # An SSL model runs in this process (torch threads); MFCC in forked workers.
    jobs = 1 if spec.kind == "ssl" else jobs
    try:
        started = time.perf_counter()
        sample = _sample_frames(read[0], sample_fraction, max_sample_frames, seed, jobs)
        feature_seconds = time.perf_counter() - started
        started = time.perf_counter()
        centroids = fit_kmeans(sample, k, seed, backend)
        fit_seconds = time.perf_counter() - started
        _CENTROIDS = centroids
        out.mkdir(parents=True, exist_ok=True)
        report: dict = {
            "features": features,
            "k": k,
            "seed": seed,
            "backend": backend,
            "sample_frames": len(sample),
            "feature_seconds": round(feature_seconds, 2),
            "fit_seconds": round(fit_seconds, 2),
            "sample_inertia": inertia(sample, centroids),
            "manifests": {},
        }
        written = []
        for manifest, name in zip(read, names, strict=True):
            labelled, skipped = _label_manifest(manifest, jobs, progress)
            path = out / name
            write_manifest(
                path,
                [
                    Utterance(
                        u.id,
                        u.audio,
                        " ".join(map(str, labels)),
                        u.duration,
                        u.speaker,
                        u.lang,
                        u.offset,
                    )
                    for u, labels in labelled
                ],
            )
            written.append(path)
            stats = label_statistics([labels for _, labels in labelled], k)
            stats["utterances"] = len(labelled)
            stats["skipped"] = skipped
            if align_exp is not None:
                stats["agreement"] = unit_agreement(labelled, align_exp, align_max_utts)
            report["manifests"][name] = stats
    finally:
        _EXTRACTOR = _CENTROIDS = None
    UnitTokenizer(k).save(out / "tokenizer.json")
    from safetensors.numpy import save_file

    save_file({"centroids": centroids}, str(out / "centroids.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return KmeansResult(centroids, report, written)


def _sample_frames(
    manifest: Manifest, fraction: float, max_frames: int, seed: int, jobs: int
) -> np.ndarray:
    """The frames of a seeded random `fraction` of the utterances, at most `max_frames`
    (a seeded random subset of them when there are more)."""
    rng = make_rng(seed, "kmeans-sample")
    order = rng.permutation(len(manifest.utterances))
    chosen = [manifest.utterances[i] for i in order[: max(1, round(fraction * len(order)))]]
    chosen.sort(key=lambda u: u.id)
    frames = [
        feats
        for chunk in fork_map(_features_chunk, _items(chosen), jobs, name="kmeans features")
        for _, feats, _ in chunk
        if feats is not None
    ]
    if not frames:
        raise EchoicError(f"{manifest.path}: no readable audio in the k-means sample")
    sample = np.concatenate(frames)
    if len(sample) > max_frames:
        sample = sample[np.sort(rng.choice(len(sample), max_frames, replace=False))]
    return sample


def _label_manifest(
    manifest: Manifest, jobs: int, progress: bool = False
) -> tuple[list, dict[str, int]]:
    """-> [(utterance, labels)] for the readable ones, skip counts by reason."""
    utterances = manifest.utterances
    labelled, skipped = [], {}
    by_id = {u.id: u for u in utterances}
    chunks = fork_map(_labels_chunk, _items(utterances), jobs, name="kmeans labels")
    bar = tqdm(total=len(utterances), unit="utt", desc=f"labels {Path(manifest.path).name}",
               disable=not progress)  # fmt: skip
    for chunk in chunks:
        bar.update(len(chunk))
        for utt_id, labels, reason in chunk:
            if labels is None:
                key = reason.split(":", 1)[0]
                skipped[key] = skipped.get(key, 0) + 1
                log.warning("%s: %s skipped (%s)", manifest.path, utt_id, reason)
                continue
            labelled.append((by_id[utt_id], labels))
    bar.close()
    return labelled, skipped
