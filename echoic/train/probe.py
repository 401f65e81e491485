"""A live downstream probe: how good the representation being pretrained is for ASR,
measured while pretraining runs.

Every `every_steps` optimizer steps (and at step 0 of a new run), the model's features
(`model.probe_features`: a HuBERT model's hidden state, no masking, eval mode, no
gradient) are computed for a fixed labelled subset, a small CTC head (two 1-D convolutions
and a linear layer, or a linear layer alone) is trained on them for a fixed number of steps,
and greedy CTC on a fixed dev subset gives `probe_wer` and `probe_cer`; `probe_rank` is the
effective rank of the subset's features (see `effective_rank`). They are written
to metrics.jsonl (split "probe") and TensorBoard next to the losses, and `echoic plot`
draws them on the loss chart.

It runs in the training process, between optimizer steps, because that is the one
place where the weights of step N exist without a checkpoint and where the run's
threads are already paid for; its cost (seconds per probe) is logged with its result.
It leaves the pretraining run exactly as it was: the upstream is only read, the head
and its optimizer are the probe's own, its randomness comes from its own seed with the
global generators saved and restored, so a run with the probe on has bit-identical
pretraining weights to one with it off (tested).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echoic.data.audio import load_audio
from echoic.data.manifest import read_manifest
from echoic.data.tokenizer import Tokenizer, load_tokenizer
from echoic.errors import AudioError, EchoicError
from echoic.models.heads.ctc import best_path
from echoic.score import score_texts

log = logging.getLogger(__name__)

RANK_FRAMES = 20000  # frames the effective rank is computed on (an SVD of at most this many)


@dataclass(frozen=True)
class ProbeConfig:
    every_steps: int  # optimizer steps between probes
    train: str  # labelled manifest the head is trained on (a small fixed subset)
    dev: str  # labelled manifest it is scored on
    lang: str  # folder with tokenizer.json (a char or BPE tokenizer, `echoic prepare`)
    steps: int = 300  # head updates per probe
    lr: float = 0.003
    max_frames: int = 20000  # feature frames per head batch (batch x longest)
    layer: int | None = None  # hidden state probed; None: the last
    hidden: int = 128  # channels of the head's two convolutions; 0: a linear head
    seed: int = 0
    at_start: bool = True  # also probe the initial weights (step 0) of a new run

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.steps < 1:
            raise ValueError("probe every_steps and steps must be at least 1")
        if self.hidden < 0 or self.lr <= 0:
            raise ValueError("probe hidden must not be negative and lr must be positive")


class ProbeHead(nn.Module):
    """Two 1-D convolutions (kernel 5, GELU) and a linear layer to the vocabulary, or the
    linear layer alone. Convolutions, not an LSTM: on CPU a BiLSTM of 96 cells took 1.3 s
    per 20,000-frame batch here, ten times these convolutions, and the probe has to fit
    between pretraining steps."""

    def __init__(self, input_dim: int, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        width = input_dim
        for _ in range(2 if hidden else 0):
            self.convs.append(nn.Conv1d(width, hidden, kernel_size=5, padding=2))
            width = hidden
        self.output = nn.Linear(width, vocab_size)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B,) -> (B, T, V) CTC log-probabilities."""
        valid = torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]
        x = feats.transpose(1, 2)
        for conv in self.convs:  # padding zeroed before each, so it never leaks in
            x = F.gelu(conv(x * valid[:, None]))
        return self.output(x.transpose(1, 2)).log_softmax(-1)


@dataclass
class _Split:
    ids: list[str]
    texts: list[str]
    audio: list[np.ndarray]
    tokens: list[list[int]]


class Probe:
    """Loads the probe's audio and transcripts once; `run(model, step)` -> metrics."""

    def __init__(self, config: ProbeConfig, sample_rate: int) -> None:
        self.config = config
        self.tokenizer: Tokenizer = load_tokenizer(Path(config.lang) / "tokenizer.json")
        self.should_stop: Callable[[], bool] = lambda: False
        self.train = self._load(config.train, sample_rate)
        self.dev = self._load(config.dev, sample_rate)
        log.info(
            "probe: %d train and %d dev utterances, %d head steps every %d steps",
            len(self.train.ids),
            len(self.dev.ids),
            config.steps,
            config.every_steps,
        )

    def _load(self, path: str, sample_rate: int) -> _Split:
        manifest = read_manifest(path)
        split = _Split([], [], [], [])
        skipped = 0
        for utterance in manifest.utterances:
            try:
                samples = load_audio(
                    utterance.audio,
                    sample_rate=sample_rate,
                    offset=utterance.offset,
                    duration=utterance.duration,
                )
            except AudioError as error:
                skipped += 1
                log.warning("probe: %s skipped (%s)", utterance.id, error)
                continue
            tokens = self.tokenizer.encode(utterance.text)
            if not tokens:
                skipped += 1
                continue
            split.ids.append(utterance.id)
            split.texts.append(utterance.text)
            split.audio.append(samples)
            split.tokens.append(tokens)
        if not split.ids:
            raise EchoicError(f"probe: no usable utterance in {path}")
        if skipped:
            log.warning("probe: %d utterances of %s skipped", skipped, path)
        return split

    def run(
        self,
        model: nn.Module,
        device: torch.device,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, float] | None:
        """The probe's metrics for the model as it is; None when `should_stop` turned
        True on the way (a stop request: the run's checkpoint must not wait for it)."""
        self.should_stop = should_stop
        try:
            return self._run(model, device)
        except _Stopped:
            return None

    def _run(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            train_feats = self._features(model, self.train, device)
            dev_feats = self._features(model, self.dev, device)
        finally:
            model.train(was_training)
        # The head's randomness is the probe's own; the run's generators are untouched.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            head, loss = self._train_head(train_feats, device)
            hyps = self._decode(head, dev_feats, device)
        report = score_texts(dict(zip(self.dev.ids, self.dev.texts, strict=True)), hyps)
        return {
            "probe_wer": report.words.rate,
            "probe_cer": report.chars.rate,
            "probe_rank": effective_rank(train_feats),
            "probe_train_loss": loss,
            "probe_seconds": time.perf_counter() - started,
        }

    @torch.no_grad()
    def _features(self, model: nn.Module, split: _Split, device: torch.device) -> list:
        """Each utterance's features, computed in length-sorted batches (little padding)."""
        order = sorted(range(len(split.audio)), key=lambda i: len(split.audio[i]))
        feats: list[torch.Tensor | None] = [None] * len(order)
        budget = 16000 * 60  # samples per batch
        start = 0
        while start < len(order):
            if self.should_stop():
                raise _Stopped
            end = start + 1
            while end < len(order) and len(split.audio[order[end]]) * (end - start + 1) <= budget:
                end += 1
            chosen = order[start:end]
            lengths = torch.tensor([len(split.audio[i]) for i in chosen])
            longest = int(lengths.max())
            audio = torch.zeros(len(chosen), longest)
            for row, i in enumerate(chosen):
                audio[row, : len(split.audio[i])] = torch.from_numpy(split.audio[i])
            out, out_lens = model.probe_features(
                audio.to(device), lengths.to(device), self.config.layer
            )
            for row, i in enumerate(chosen):
                feats[i] = out[row, : int(out_lens[row])].float().cpu()
            start = end
        return feats

    def _batches(self, feats: list[torch.Tensor], epoch: int) -> list[list[int]]:
        """Shuffled (seed, epoch) batches of similar lengths within max_frames."""
        rng = np.random.default_rng([self.config.seed, epoch])
        order = sorted(rng.permutation(len(feats)).tolist(), key=lambda i: len(feats[i]))
        batches, current = [], []
        for i in order:
            if current and len(feats[i]) * (len(current) + 1) > self.config.max_frames:
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _train_head(self, feats: list[torch.Tensor], device: torch.device) -> tuple:
        config, tokenizer = self.config, self.tokenizer
        head = ProbeHead(feats[0].shape[1], tokenizer.vocab_size, config.hidden).to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr)
        steps, epoch, losses = 0, 0, []
        while steps < config.steps:
            for batch in self._batches(feats, epoch):
                if self.should_stop():
                    raise _Stopped
                x, lengths = _pad([feats[i] for i in batch])
                targets = [torch.tensor(self.train.tokens[i]) for i in batch]
                target_lens = torch.tensor([len(t) for t in targets])
                log_probs = head(x.to(device), lengths.to(device))
                loss = F.ctc_loss(
                    log_probs.transpose(0, 1),
                    torch.cat(targets).to(device),
                    lengths.to(device),
                    target_lens.to(device),
                    blank=tokenizer.blank_id,
                    reduction="sum",
                    zero_infinity=True,
                ) / len(batch)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(head.parameters(), 5.0)
                optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
                if steps == config.steps:
                    break
            epoch += 1
        tail = losses[-max(1, len(losses) // 10) :]
        return head, sum(tail) / len(tail)

    @torch.no_grad()
    def _decode(self, head: ProbeHead, feats: list, device: torch.device) -> dict[str, str]:
        head.eval()
        hyps = {}
        for start in range(0, len(feats), 16):
            chunk = feats[start : start + 16]
            x, lengths = _pad(chunk)
            log_probs = head(x.to(device), lengths.to(device)).cpu()
            best = best_path(log_probs, lengths, self.tokenizer.blank_id)
            for row, tokens in enumerate(best):
                hyps[self.dev.ids[start + row]] = self.tokenizer.decode(tokens)
        return hyps


class _Stopped(Exception):
    """A stop request arrived during the probe."""


def effective_rank(feats: list[torch.Tensor], max_frames: int = RANK_FRAMES) -> float:
    """exp of the entropy of the normalised singular-value energies of the frames
    (up to `max_frames`, centred): about D for features that use all D dimensions
    alike, 1 for features that vary along one direction only. A pretraining run whose
    features collapse shows it here long before its loss says anything."""
    frames = torch.cat(feats)[:max_frames].double()
    frames = frames - frames.mean(0)
    energy = torch.linalg.svdvals(frames).square()
    share = energy / energy.sum().clamp(min=1e-300)
    entropy = -(share * share.clamp(min=1e-300).log()).sum()
    return float(entropy.exp())


def _pad(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in feats])
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths
