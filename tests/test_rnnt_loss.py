import itertools
import math

import pytest
import torch

from echoic.models.rnnt_loss import rnnt_loss


def brute_force(logits: torch.Tensor, targets: list[int], frames: int, blank: int = 0) -> float:
    """-log P by enumerating every alignment of one utterance (tiny sizes only)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    u_len = len(targets)
    total = []
    # An alignment: at each step, from (t, u), emit targets[u] (u += 1) or blank (t += 1);
    # it must end with the blank from (frames - 1, u_len). Choose where the emissions go
    # among the frames*... moves: T blanks and U emissions, the last move a blank.
    moves = frames - 1 + u_len
    for emit_steps in itertools.combinations(range(moves), u_len):
        t = u = 0
        score = 0.0
        for step in range(moves):
            if step in emit_steps:
                score += float(lp[t, u, targets[u]])
                u += 1
            else:
                score += float(lp[t, u, blank])
                t += 1
        score += float(lp[t, u, blank])  # the final blank
        total.append(score)
    return -float(torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0))


def _inputs(batch, frames, u, vocab, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, u + 1, vocab, generator=g, dtype=dtype)
    targets = torch.randint(1, vocab, (batch, u), generator=g)
    return logits, targets


@pytest.mark.parametrize(
    ("frames", "u", "vocab"), [(1, 0, 3), (1, 3, 4), (4, 2, 5), (5, 4, 3), (7, 3, 6)]
)
def test_matches_brute_force(frames, u, vocab):
    logits, targets = _inputs(1, frames, u, vocab, seed=frames + u)
    expected = brute_force(logits[0], targets[0].tolist(), frames)
    lengths = torch.tensor([frames]), torch.tensor([u])
    got = rnnt_loss(logits, targets, *lengths, reduction="none")
    assert float(got[0]) == pytest.approx(expected, abs=1e-5)
    log_probs = torch.log_softmax(logits, dim=-1)
    unfused = rnnt_loss(log_probs, targets, *lengths, reduction="none", fused_log_softmax=False)
    assert float(unfused[0]) == pytest.approx(expected, abs=1e-5)


def test_mixed_lengths_equal_per_utterance_losses():
    logits, targets = _inputs(4, 9, 5, 7, seed=3)
    frames = torch.tensor([9, 4, 7, 1])
    lens = torch.tensor([5, 2, 0, 3])
    batch = rnnt_loss(logits, targets, frames, lens, reduction="none")
    logits.requires_grad_(True)
    rnnt_loss(logits, targets, frames, lens, reduction="sum").backward()
    for b in range(4):
        one = logits.detach()[b : b + 1, : frames[b], : lens[b] + 1].clone().requires_grad_(True)
        single = rnnt_loss(
            one, targets[b : b + 1, : lens[b]], frames[b : b + 1], lens[b : b + 1], reduction="sum"
        )
        expected = brute_force(
            logits.detach()[b, : frames[b], : lens[b] + 1],
            targets[b, : lens[b]].tolist(),
            int(frames[b]),
        )
        assert float(batch[b]) == pytest.approx(float(single.detach()), abs=1e-5)
        assert float(batch[b]) == pytest.approx(expected, abs=1e-5)
        single.backward()
        # The batch gradient equals the single-utterance one inside the lattice, zero outside.
        grad = logits.grad[b]
        torch.testing.assert_close(
            grad[: frames[b], : lens[b] + 1], one.grad[0], atol=1e-6, rtol=1e-5
        )
        assert grad[frames[b] :].abs().sum() == 0 and grad[:, lens[b] + 1 :].abs().sum() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_float64(fused):
    logits, targets = _inputs(3, 5, 3, 4, seed=1, dtype=torch.float64)
    if not fused:
        logits = torch.log_softmax(logits, -1)
    logits.requires_grad_(True)
    frames, lens = torch.tensor([5, 3, 4]), torch.tensor([3, 1, 2])

    def loss(x):
        return rnnt_loss(x, targets, frames, lens, reduction="none", fused_log_softmax=fused)

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-5)


def test_gradient_matches_autograd_through_log_softmax():
    logits, targets = _inputs(2, 6, 4, 9, seed=5)
    frames, lens = torch.tensor([6, 5]), torch.tensor([4, 3])
    a = logits.clone().requires_grad_(True)
    rnnt_loss(a, targets, frames, lens, reduction="mean").backward()
    b = logits.clone().requires_grad_(True)
    rnnt_loss(
        torch.log_softmax(b, -1), targets, frames, lens, reduction="mean", fused_log_softmax=False
    ).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_reductions_padding_and_half_precision():
    logits, targets = _inputs(2, 5, 3, 6)
    targets[1, 2] = -1  # padding past the target length is ignored
    frames, lens = torch.tensor([5, 5]), torch.tensor([3, 2])
    none = rnnt_loss(logits, targets, frames, lens, reduction="none")
    assert torch.isfinite(none).all()
    assert float(rnnt_loss(logits, targets, frames, lens, reduction="sum")) == pytest.approx(
        float(none.sum())
    )
    assert float(rnnt_loss(logits, targets, frames, lens)) == pytest.approx(float(none.mean()))
    half = rnnt_loss(logits.bfloat16(), targets, frames, lens, reduction="none")
    torch.testing.assert_close(half.float(), none, atol=0.05, rtol=0.01)


def test_bad_arguments_are_clear():
    logits, targets = _inputs(1, 3, 2, 4)
    with pytest.raises(ValueError, match="logit_lengths must be within"):
        rnnt_loss(logits, targets, torch.tensor([4]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"targets must be \(B, U\)"):
        rnnt_loss(logits, targets[:, :1], torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(ValueError, match="reduction"):
        rnnt_loss(logits, targets, torch.tensor([3]), torch.tensor([2]), reduction="avg")


def test_the_uniform_case_has_a_closed_form():
    # With all-zero logits every symbol has probability 1/V, and there are
    # C(T-1+U, U) alignments of T+U steps: P = C(T-1+U, U) / V^(T+U).
    frames, u, vocab = 6, 3, 5
    logits = torch.zeros(1, frames, u + 1, vocab)
    loss = rnnt_loss(logits, torch.tensor([[1, 2, 3]]), torch.tensor([frames]), torch.tensor([u]))
    expected = -(math.log(math.comb(frames - 1 + u, u)) - (frames + u) * math.log(vocab))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
