"""Paraformer's building blocks: CIF predictor, glancing sampler, NAR decoder."""

import itertools
import time

import pytest
import torch
import torch.nn.functional as F

from echoic.models.cif import (
    CifConfig,
    CifPredictor,
    append_tail,
    integrate_and_fire,
    quantity_loss,
    scale_to_targets,
    token_times,
)
from echoic.models.glm import glance, glancing_count, glancing_mask
from echoic.models.heads.paraformer_decoder import ParaformerDecoder, ParaformerDecoderConfig
from echoic.models.layers import lengths_to_mask

VOCAB = 8
TINY_DECODER = ParaformerDecoderConfig(num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0)


def eye_hidden(batch: int, frames: int) -> torch.Tensor:
    """Frame t is the unit vector e_t, so a fired embedding IS its per-frame weights."""
    return torch.eye(frames).expand(batch, frames, frames).clone()


def reference_cif(hidden, alphas, threshold=1.0):
    """The paper's loop, one utterance at a time, for weights <= threshold: accumulate,
    and on crossing give the token what completes it and carry the rest."""
    out = []
    for h, a in zip(hidden.double(), alphas.double()):
        tokens, positions, acc, frame = [], [], 0.0, torch.zeros(h.shape[1], dtype=h.dtype)
        for t in range(len(a)):
            alpha = float(a[t])
            if acc + alpha < threshold:
                acc += alpha
                frame = frame + alpha * h[t]
            else:
                used = threshold - acc
                tokens.append(frame + used * h[t])
                positions.append(t)
                acc = alpha - used
                frame = acc * h[t]
        out.append((tokens, positions))
    return out


class FixedWeights(CifPredictor):
    """A predictor whose weights are given, to test its scaling and tail by hand."""

    def __init__(self, alphas: torch.Tensor, config: CifConfig) -> None:
        super().__init__(alphas.shape[1], config)
        self.fixed = alphas

    def weights(self, encoded, lengths):
        return self.fixed * lengths_to_mask(lengths, self.fixed.shape[1])


# --- CIF ---------------------------------------------------------------------------


def test_cif_hand_computed_fires_at_the_right_frames_and_splits_crossing_frames():
    alphas = torch.tensor([[0.3, 0.5, 0.4, 0.9, 0.2, 0.6], [0.6, 0.7, 0.7, 0.0, 0.0, 0.0]])
    fired = integrate_and_fire(eye_hidden(2, 6), alphas)
    # Row 0: running sums 0.3 0.8 1.2 2.1 2.3 2.9. Frame 2 (0.4) gives 0.2 to token 0 and
    # 0.2 to token 1; frame 3 (0.9) gives 0.8 to token 1, 0.1 to the unfinished rest.
    # Row 1: 0.6 1.3 2.0: frame 1 splits 0.4 / 0.3, frame 2 completes token 1 exactly.
    assert fired.counts.tolist() == [2, 2]
    assert fired.positions.tolist() == [[2, 3], [1, 2]]
    expected = torch.tensor(
        [
            [[0.3, 0.5, 0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8, 0.0, 0.0]],
            [[0.6, 0.4, 0.0, 0.0, 0.0, 0.0], [0.0, 0.3, 0.7, 0.0, 0.0, 0.0]],
        ]
    )
    torch.testing.assert_close(fired.embeddings, expected, atol=1e-6, rtol=0)


def test_cif_splits_a_frame_heavier_than_the_threshold_over_several_tokens():
    # Scaled-up training weights: frame 1 (2.0) completes token 0, is token 1 entirely
    # and starts token 2.
    fired = integrate_and_fire(eye_hidden(1, 3), torch.tensor([[0.5, 2.0, 0.5]]))
    assert fired.counts.tolist() == [3]
    assert fired.positions.tolist() == [[1, 1, 2]]
    expected = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]])
    torch.testing.assert_close(fired.embeddings, expected, atol=1e-6, rtol=0)


def test_cif_matches_the_papers_loop_on_random_weights():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 50, 8, generator=g)
    alphas = torch.rand(4, 50, generator=g) * 0.8
    alphas[2, 30:] = 0.0  # a padded row
    fired = integrate_and_fire(hidden, alphas)
    for row, (tokens, positions) in enumerate(reference_cif(hidden, alphas)):
        count = len(tokens)
        assert fired.counts[row] == count
        assert fired.positions[row, :count].tolist() == positions
        assert (fired.positions[row, count:] == -1).all()
        torch.testing.assert_close(
            fired.embeddings[row, :count], torch.stack(tokens).float(), atol=1e-5, rtol=0
        )
        assert (fired.embeddings[row, count:] == 0).all()


def test_cif_threshold_other_than_one():
    fired = integrate_and_fire(eye_hidden(1, 4), torch.tensor([[0.5, 0.5, 1.5, 0.2]]), 2.0)
    # Running sums 0.5 1.0 2.5 2.7: token 0 (weights summing to 2.0) fires at frame 2.
    assert fired.counts.tolist() == [1]
    assert fired.positions.tolist() == [[2]]
    torch.testing.assert_close(fired.embeddings, torch.tensor([[[0.5, 0.5, 1.0, 0.0]]]))


@pytest.mark.parametrize(("rest", "fires"), [(0.6, True), (0.5, False)])
def test_cif_tail_keeps_a_last_token_that_gathered_enough(rest, fires):
    # 1.0 fires token 0 at frame 1; `rest` is left. The tail (0.45 on a zero frame after
    # the audio) completes it when rest >= 0.55, and it is kept as the last real frame's.
    alphas = torch.tensor([[0.5, 0.5, rest, 0.0]])
    lengths = torch.tensor([3])
    hidden, tailed = append_tail(eye_hidden(1, 4), alphas, lengths, 0.45)
    assert hidden.shape == (1, 5, 4) and tailed[0].tolist() == pytest.approx(
        [0.5, 0.5, rest, 0.45, 0.0]
    )
    predictor = FixedWeights(alphas, CifConfig(dropout=0.0)).eval()
    out = predictor(eye_hidden(1, 4), lengths)
    if fires:
        assert out.counts.tolist() == [2]
        assert out.positions.tolist() == [[1, 2]]  # the tail's frame 3 moved to frame 2
        # Only real frames carry content: the tail adds weight, not signal.
        torch.testing.assert_close(
            out.embeddings[0, 1], torch.tensor([0.0, 0.0, rest, 0.0]), atol=1e-6, rtol=0
        )
    else:
        assert out.counts.tolist() == [1]
        assert out.positions.tolist() == [[1]]
    no_tail = FixedWeights(alphas, CifConfig(dropout=0.0, tail_threshold=0.0)).eval()
    assert no_tail(eye_hidden(1, 4), lengths).counts.tolist() == [1]


def test_scaling_makes_the_count_equal_the_target_length():
    torch.manual_seed(0)
    predictor = CifPredictor(16, CifConfig(dropout=0.0))
    encoded = torch.randn(4, 40, 16)
    lengths = torch.tensor([40, 33, 20, 7])
    targets = torch.tensor([11, 2, 19, 7])  # 19 > 20 frames' worth of sigmoid: weights > 1
    out = predictor(encoded, lengths, targets)
    assert out.counts.tolist() == targets.tolist()
    assert out.embeddings.shape == (4, 19, 16)
    torch.testing.assert_close(out.alphas.sum(1), targets.float(), atol=1e-4, rtol=0)
    assert (out.alphas[lengths_to_mask(lengths, 40) == 0] == 0).all()
    # The unscaled sum is what the quantity loss sees.
    torch.testing.assert_close(out.predicted, predictor.weights(encoded, lengths).sum(1))
    # All-zero weights cannot be scaled: uniform ones still fire the target's count.
    scaled = scale_to_targets(torch.zeros(1, 6), torch.tensor([4]), torch.tensor([3]))
    torch.testing.assert_close(scaled, torch.tensor([[0.75, 0.75, 0.75, 0.75, 0.0, 0.0]]))


def test_scaling_survives_float32_rounding_of_the_sum():
    # Many small weights scaled to a target: float32 leaves the sum a hair off it.
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        frames = int(torch.randint(50, 400, (1,), generator=g))
        alphas = torch.rand(1, frames, generator=g)
        target = torch.randint(1, frames, (1,), generator=g)
        scaled = scale_to_targets(alphas, torch.tensor([frames]), target)
        fired = integrate_and_fire(torch.zeros(1, frames, 2), scaled)
        assert fired.counts.tolist() == target.tolist()


def test_predictor_ignores_padding():
    torch.manual_seed(0)
    predictor = CifPredictor(8, CifConfig(dropout=0.0, left_context=2, right_context=2)).eval()
    encoded = torch.randn(2, 30, 8)
    lengths = torch.tensor([30, 17])
    batch = predictor.weights(encoded, lengths)
    alone = predictor.weights(encoded[1:, :17], lengths[1:])
    torch.testing.assert_close(batch[1, :17], alone[0])
    encoded[1, 17:] = 1e3  # garbage in the padding changes nothing
    torch.testing.assert_close(predictor.weights(encoded, lengths), batch)


def test_quantity_loss_falls_as_the_count_approaches_the_target():
    torch.manual_seed(0)
    predictor = CifPredictor(8, CifConfig(dropout=0.0))
    encoded = torch.randn(2, 30, 8)
    lengths = torch.tensor([30, 24])
    targets = torch.tensor([7, 3])
    assert quantity_loss(torch.tensor([7.5, 1.0]), targets).item() == pytest.approx(2.5)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = quantity_loss(predictor(encoded, lengths, targets).predicted, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 10  # about 15 and 12 weights of ~0.5 at start
    assert losses[-1] < 0.5
    predicted = predictor(encoded, lengths).predicted
    assert predicted.tolist() == pytest.approx([7, 3], abs=0.3)


def test_token_times_are_monotonic_and_inside_the_audio():
    times = token_times([2, 3, 3, 9], frame_shift=0.04, duration=0.38)
    flat = [t for pair in times for t in pair]
    assert flat == pytest.approx([0.0, 0.12, 0.12, 0.16, 0.16, 0.16, 0.16, 0.38])
    for (start, end), (next_start, _) in itertools.pairwise(times):
        assert start <= end <= next_start + 1e-12
    assert token_times([], 0.04, 1.0) == []
    with pytest.raises(ValueError, match="must not decrease"):
        token_times([3, 2], 0.04, 1.0)
    with pytest.raises(ValueError, match="frame_shift"):
        token_times([1], 0.0, 1.0)


def test_token_times_from_a_predictors_firing_positions():
    torch.manual_seed(1)
    predictor = CifPredictor(8, CifConfig(dropout=0.0, tail_threshold=0.45)).eval()
    lengths = torch.tensor([25, 12])
    out = predictor(torch.randn(2, 25, 8), lengths)
    for row, frames in enumerate(lengths.tolist()):
        count = int(out.counts[row])
        assert count > 0
        duration = frames * 0.04
        times = token_times(out.positions[row, :count].tolist(), 0.04, duration)
        flat = [t for pair in times for t in pair]
        assert flat == sorted(flat) and flat[0] >= 0.0 and flat[-1] <= duration


# --- glancing sampler ------------------------------------------------------------------


def glm_inputs(length: int, wrong: int, width: int | None = None):
    targets = torch.arange(length) % 5 + 2
    predictions = targets.clone()
    predictions[:wrong] = 1
    width = width or length
    pad = width - length
    return F.pad(predictions, (0, pad), value=0), F.pad(targets, (0, pad), value=-1)


def test_glancing_replaces_ratio_times_the_hamming_distance():
    p0, t0 = glm_inputs(8, wrong=5, width=12)
    p1, t1 = glm_inputs(12, wrong=12)
    p2, t2 = glm_inputs(3, wrong=1, width=12)
    mask = glancing_mask(
        torch.stack([p0, p1, p2]),
        torch.stack([t0, t1, t2]),
        torch.tensor([8, 12, 3]),
        ["a", "b", "c"],
        ratio=0.4,
        seed=1,
        epoch=0,
    )
    assert mask.dtype == torch.bool and mask.shape == (3, 12)
    assert mask.sum(1).tolist() == [2, 4, 0]  # floor(0.4*5), floor(0.4*12), floor(0.4*1)
    assert not mask[0, 8:].any() and not mask[2].any()
    assert glancing_count(100, 0.29) == 29  # not 28 from 28.999999999999996
    assert glancing_count(7, 0.0) == 0 and glancing_count(7, 1.0) == 7


def test_glancing_choice_is_a_pure_function_of_seed_epoch_and_utterance():
    p, t = glm_inputs(20, wrong=10)

    def mask_of(utt, row, batch_size, width, *, seed=7, epoch=3):
        pw, tw = glm_inputs(20, wrong=10, width=width)
        others_p, others_t = glm_inputs(width, wrong=width)
        preds = torch.stack([pw if r == row else others_p for r in range(batch_size)])
        targets = torch.stack([tw if r == row else others_t for r in range(batch_size)])
        lengths = torch.tensor([20 if r == row else width for r in range(batch_size)])
        ids = [utt if r == row else f"other-{r}" for r in range(batch_size)]
        out = glancing_mask(preds, targets, lengths, ids, ratio=1.0, seed=seed, epoch=epoch)
        return out[row, :20]

    alone = mask_of("utt-1", 0, 1, 20)
    assert alone.sum() == 10
    assert torch.equal(alone, mask_of("utt-1", 2, 4, 31))  # other row, batch, padding
    assert torch.equal(alone, mask_of("utt-1", 1, 2, 25))
    assert not torch.equal(alone, mask_of("utt-1", 0, 1, 20, epoch=4))
    assert not torch.equal(alone, mask_of("utt-1", 0, 1, 20, seed=8))
    assert not torch.equal(alone, mask_of("utt-2", 0, 1, 20))
    # A larger count only adds positions (the first ones of the same permutation).
    half = glancing_mask(
        p[None], t[None], torch.tensor([20]), ["utt-1"], ratio=0.5, seed=7, epoch=3
    )[0]
    assert half.sum() == 5 and torch.equal(half & alone, half)


def test_glance_mixes_embeddings_and_bad_input_is_one_line():
    acoustic = torch.zeros(1, 3, 2)
    target = torch.ones(1, 3, 2)
    mixed = glance(acoustic, target, torch.tensor([[True, False, True]]))
    assert mixed[0, :, 0].tolist() == [1.0, 0.0, 1.0]
    p, t = glm_inputs(4, wrong=2)
    with pytest.raises(ValueError, match="2 ids"):
        glancing_mask(p[None], t[None], torch.tensor([4]), ["a", "b"], ratio=0.5, seed=0, epoch=0)
    with pytest.raises(ValueError, match="ratio"):
        glancing_mask(p[None], t[None], torch.tensor([4]), ["a"], ratio=1.5, seed=0, epoch=0)


# --- decoder -------------------------------------------------------------------------


def test_decoder_shapes_and_token_indexed():
    torch.manual_seed(0)
    decoder = ParaformerDecoder(16, VOCAB, TINY_DECODER)
    logits = decoder(
        torch.randn(3, 5, 16),
        torch.tensor([5, 2, 4]),
        torch.randn(3, 20, 16),
        torch.tensor([20, 9, 14]),
    )
    assert logits.shape == (3, 5, VOCAB)
    params = dict(decoder.named_parameters())
    for name in decoder.token_indexed():
        assert params[name].shape[0] == VOCAB
    assert decoder.embed_tokens(torch.tensor([[3, -1]])).shape == (1, 2, 16)


def test_decoder_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    decoder = ParaformerDecoder(16, VOCAB, TINY_DECODER).eval()
    counts = torch.tensor([6, 2, 4])
    frames = torch.tensor([20, 9, 14])
    embeddings = torch.randn(3, 6, 16)
    memory = torch.randn(3, 20, 16)
    batch = decoder(embeddings, counts, memory, frames)
    for row in range(3):
        n, t = int(counts[row]), int(frames[row])
        alone = decoder(
            embeddings[row : row + 1, :n],
            counts[row : row + 1],
            memory[row : row + 1, :t],
            frames[row : row + 1],
        )
        torch.testing.assert_close(batch[row, :n], alone[0], atol=1e-5, rtol=0)


def test_decoder_row_without_tokens_keeps_gradients_finite():
    torch.manual_seed(0)
    decoder = ParaformerDecoder(16, VOCAB, TINY_DECODER)
    logits = decoder(
        torch.randn(2, 3, 16), torch.tensor([3, 0]), torch.randn(2, 10, 16), torch.tensor([10, 6])
    )
    assert torch.isfinite(logits).all()
    targets = torch.tensor([[1, 2, 3], [-1, -1, -1]])
    F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1).backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


def test_cif_and_decoder_overfit_one_utterance_with_glancing():
    torch.manual_seed(0)
    start = time.perf_counter()
    dim, frames = 16, 24
    features = torch.randn(1, frames, dim)
    lengths = torch.tensor([frames])
    tokens = torch.tensor([[3, 5, 2, 6, 4]])
    token_lens = torch.tensor([5])
    encoder = torch.nn.Linear(dim, dim)  # stands in for a trainable encoder
    predictor = CifPredictor(dim, CifConfig(dropout=0.0))
    decoder = ParaformerDecoder(dim, VOCAB, TINY_DECODER)
    modules = torch.nn.ModuleList([encoder, predictor, decoder])
    optimizer = torch.optim.Adam(modules.parameters(), lr=3e-3)
    for step in range(100):
        encoded = encoder(features)
        cif = predictor(encoded, lengths, token_lens)
        with torch.no_grad():  # first pass: how wrong is the decoder without help?
            first = decoder(cif.embeddings, token_lens, encoded, lengths).argmax(-1)
        mask = glancing_mask(
            first, tokens, token_lens, ["utt"], ratio=0.5, seed=0, epoch=step // 10
        )
        inputs = glance(cif.embeddings, decoder.embed_tokens(tokens), mask)
        logits = decoder(inputs, token_lens, encoded, lengths)
        loss = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="sum")
        loss = loss + quantity_loss(cif.predicted, token_lens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    modules.eval()
    with torch.no_grad():
        encoded = encoder(features)
        cif = predictor(encoded, lengths)  # inference: predicted count, tail
        hyp = decoder(cif.embeddings, cif.counts, encoded, lengths).argmax(-1)
    assert cif.counts.tolist() == [5]
    assert hyp.tolist() == tokens.tolist()
    assert time.perf_counter() - start < 5.0
