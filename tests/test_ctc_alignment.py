"""Utterances CTC cannot align (more tokens than the encoder's frames can hold) are left
out of the loss, its weight and the metrics, and reported as dropped, not silently
counted as a zero loss."""

import pytest
import torch
import torch.nn.functional as F

from echoic.config import from_dict
from echoic.data.batch import Batch
from echoic.models.contract import check_step_output
from echoic.models.heads.ctc import NO_CTC_ALIGNMENT, CtcHead
from echoic.models.model import ModelConfig, build_model

VOCAB = 12
HEADS = {
    "ctc+attention": {"ctc": {}, "attention": {"num_layers": 1, "num_heads": 2, "ffn_dim": 32}},
    "transducer+ctc": {
        "ctc": {},
        "transducer": {"joiner_dim": 16, "predictor": {"stateless": {"embed_dim": 16}}},
    },
    "attention": {"attention": {"num_layers": 1, "num_heads": 2, "ffn_dim": 32}},
}


def tiny_model(heads: dict):
    encoder = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "conv_kernel": 3}
    raw = {"frontend": {"fbank": {"global_cmvn": False}}, "encoder": {"conformer": encoder}}
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, {**raw, **heads}, "model"), VOCAB)


def batch_of(rows: list[tuple[int, list[int]]]) -> Batch:
    """One utterance per (input frames, tokens), its features a function of both."""
    longest, most = max(f for f, _ in rows), max(len(t) for _, t in rows)
    feats = torch.zeros(len(rows), longest, 80)
    tokens = torch.full((len(rows), most), -1)
    for row, (frames, ids) in enumerate(rows):
        g = torch.Generator().manual_seed(frames * 1000 + sum(ids))
        feats[row, :frames] = torch.randn(frames, 80, generator=g)
        tokens[row, : len(ids)] = torch.tensor(ids)
    return Batch(
        epoch=0,
        index=0,
        ids=[f"u{i}" for i in range(len(rows))],
        texts=[""] * len(rows),
        durations=[1.0] * len(rows),
        tokens=tokens,
        token_lens=torch.tensor([len(t) for _, t in rows]),
        feats=feats,
        feat_lens=torch.tensor([f for f, _ in rows]),
        audio=None,
        audio_lens=None,
    )


def test_frames_needed_is_exactly_where_torch_finds_no_alignment():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        length = int(torch.randint(1, 8, (1,), generator=g))
        # a small alphabet, so that repeats (which need a blank between them) are common
        target = torch.randint(1, 4, (1, length), generator=g)
        needed = int(CtcHead.frames_needed(target, torch.tensor([length])))
        for frames in (needed - 1, needed):
            if frames < 1:
                continue
            log_probs = torch.randn(frames, 1, 5, generator=g).log_softmax(-1)
            loss = F.ctc_loss(
                log_probs, target, torch.tensor([frames]), torch.tensor([length]), reduction="sum"
            )
            assert torch.isfinite(loss) == (frames >= needed), (target, frames, needed)
    # padding (-1) after the length is not a repeat
    padded = torch.tensor([[3, 3, -1, -1], [2, 2, 2, 5]])
    assert CtcHead.frames_needed(padded, torch.tensor([2, 4])).tolist() == [3, 6]


@pytest.mark.parametrize("heads", list(HEADS))
def test_an_utterance_ctc_cannot_align_is_left_out(heads):
    model = tiny_model(HEADS[heads]).eval()
    frames = model.encoder.subsampling.input_frames_for(6)  # six encoder frames
    good = [(frames, [2, 3, 4]), (frames + 8, [5, 6])]
    bad = (frames, [2, 3, 4, 5, 6, 7, 8])  # seven tokens in six frames
    with torch.no_grad():
        out = model(batch_of([good[0], bad, good[1]]))
        alone = model(batch_of(good))
    check_step_output(model.metric_units, out)
    if "ctc" not in HEADS[heads]:  # no CTC head: nothing to align, nothing left out
        assert out.dropped == {} and out.weight == 3
        return
    assert out.dropped == {1: NO_CTC_ALIGNMENT}
    assert out.weight == 2 and out.metrics["loss"].weight == 2
    # the same loss and metrics as the batch without it
    assert float(out.loss) == pytest.approx(float(alone.loss), rel=1e-5)
    for key, value in alone.metrics.items():
        if value is None:
            assert out.metrics[key] is None
        else:
            assert out.metrics[key].weight == value.weight, key
            assert out.metrics[key].total == pytest.approx(value.total, rel=1e-5), key


def test_a_batch_ctc_can_align_nothing_of_counts_for_nothing():
    model = tiny_model(HEADS["ctc+attention"]).train()
    frames = model.encoder.subsampling.input_frames_for(2)
    out = model(batch_of([(frames, [2, 3, 4]), (frames, [5, 5])]))  # 3 frames needed for 5 5
    check_step_output(model.metric_units, out)
    assert out.dropped == {0: NO_CTC_ALIGNMENT, 1: NO_CTC_ALIGNMENT} and out.weight == 0
    assert all(v is None or (v.total, v.weight) == (0.0, 0.0) for v in out.metrics.values())
    assert out.metrics["loss_ctc"] is not None  # the same None-ness as any other batch
    out.loss.backward()  # every parameter still gets a gradient (other ranks wait for it)
    assert float(out.loss.detach()) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
