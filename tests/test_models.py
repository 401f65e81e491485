import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, VOCAB, make_batch, tiny_config

from echoic.config import from_dict
from echoic.data.features import CmvnStats, FbankConfig
from echoic.errors import ConfigError, EchoicError
from echoic.models.asr import AsrModel
from echoic.models.contract import ContractError, Metric, check_step_output
from echoic.models.encoders import (
    ConformerConfig,
    Conv2dSubsampling,
    Encoder,
    SanmConfig,
    TransformerConfig,
)
from echoic.models.heads.ctc import CtcHead
from echoic.models.layers import (
    Dropout,
    Linear,
    MultiHeadAttention,
    RelativePositions,
    strided_conv2d,
)
from echoic.models.model import ModelConfig, build_model

HEADS = {
    "ctc": {"ctc": {}},
    "ctc+attention": {"ctc": {}, "attention": {"num_layers": 2, "num_heads": 2, "ffn_dim": 64}},
    "ctc+attention+r2l": {
        "ctc": {},
        "attention": {"num_layers": 1, "num_heads": 2, "ffn_dim": 64, "right_to_left_layers": 1},
    },
    "transducer+ctc": {
        "ctc": {},
        "transducer": {"joiner_dim": 16, "predictor": {"stateless": {"embed_dim": 16}}},
    },
    "transducer+ctc+attention": {
        "ctc": {},
        "attention": {"num_layers": 1, "num_heads": 2, "ffn_dim": 64},
        "transducer": {
            "joiner_dim": 16,
            "predictor": {"lstm": {"embed_dim": 16, "hidden_dim": 16}},
        },
    },
    "transducer": {
        "transducer": {
            "joiner_dim": 16,
            "predictor": {"stateless": {"embed_dim": 16, "context": 1}},
        }
    },
    "attention": {"attention": {"num_layers": 1, "num_heads": 2, "ffn_dim": 64}},
}


@pytest.mark.parametrize("encoder", ["conformer", "transformer", "san_m"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_every_head_combination_keeps_the_metrics_contract(heads, encoder):
    torch.manual_seed(0)
    model = build_model(tiny_config(HEADS[heads], encoder), VOCAB)
    batch = make_batch()
    model.train()
    train = model(batch)
    check_step_output(AsrModel.metric_units, train)
    assert torch.isfinite(train.loss)
    train.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        evaluation = model(batch)
    check_step_output(AsrModel.metric_units, evaluation)
    assert set(train.metrics) == set(evaluation.metrics) == set(AsrModel.metric_units)
    for name in AsrModel.metric_units:  # None exactly where a head is absent, in both modes
        assert (train.metrics[name] is None) == (evaluation.metrics[name] is None), name
    present = {
        "loss_ctc": "ctc" in HEADS[heads],
        "loss_att": "attention" in HEADS[heads],
        "loss_rnnt": "transducer" in HEADS[heads],
    }
    for name, expected in present.items():
        assert (train.metrics[name] is not None) == expected, name
    for out in (train, evaluation):
        accuracy = out.metrics["th_accuracy"]
        assert accuracy.unit == "tokens" and 0.0 <= accuracy.value <= 1.0
        assert out.metrics["loss"].weight == 3 and out.weight == 3
        # The total, recomputed from the heads' own loss metrics and the weights the
        # config gives them (not from the model's `total`, which both sides share).
        config = tiny_config(HEADS[heads], encoder)
        sections = {
            "loss_ctc": config.ctc,
            "loss_att": config.attention,
            "loss_rnnt": config.transducer,
        }
        expected = sum(
            section.weight * out.metrics[name].total
            for name, section in sections.items()
            if section is not None
        )
        assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
        assert out.metrics["loss"].total == pytest.approx(expected, rel=1e-5)
    if "ctc" in HEADS[heads]:  # loss_ctc against torch's CTC loss, one utterance at a time
        with torch.no_grad():
            encoded, lengths = model.encode(batch)
            log_probs = model.ctc.log_probs(encoded)
        by_hand = sum(
            F.ctc_loss(
                log_probs[i, : lengths[i]].unsqueeze(1),
                batch.tokens[i, : batch.token_lens[i]].unsqueeze(0),
                lengths[i : i + 1],
                batch.token_lens[i : i + 1],
                reduction="sum",
            )
            for i in range(batch.size)
        )
        assert evaluation.metrics["loss_ctc"].total == pytest.approx(float(by_hand), rel=1e-5)


def test_an_undeclared_metric_fails_loudly():
    model = build_model(tiny_config(HEADS["ctc"]), VOCAB)
    out = model(make_batch())
    out.metrics["wer_guess"] = Metric(1.0, 1.0, "utterances")
    with pytest.raises(ContractError, match=r"undeclared \['wer_guess'\]"):
        check_step_output(AsrModel.metric_units, out)
    del out.metrics["wer_guess"], out.metrics["loss_att"]
    with pytest.raises(ContractError, match=r"missing \['loss_att'\]"):
        check_step_output(AsrModel.metric_units, out)


def test_metrics_average_exactly():
    parts = [Metric(3.0, 2.0, "tokens"), Metric(1.0, 6.0, "tokens")]
    assert (parts[0] + parts[1]).value == 0.5  # (3 + 1) / (2 + 6), not the mean of means
    with pytest.raises(ValueError, match="cannot add"):
        parts[0] + Metric(1.0, 1.0, "utterances")


def test_dimensions_flow_from_the_producer():
    raw = {
        "frontend": {"fbank": {"fbank": {"num_mel_bins": 40}, "global_cmvn": False}},
        "encoder": {"conformer": dict(TINY, conv_kernel=3)},
        "ctc": {},
    }
    model = build_model(from_dict(ModelConfig, raw, "model"), VOCAB)
    assert model.frontend.output_dim == 40
    assert model.encoder.subsampling.convs[0].in_channels == 1
    assert model.ctc.proj.in_features == 32 and model.ctc.proj.out_features == VOCAB
    assert model.input_spec.fbank.num_mel_bins == 40  # what the data pipeline computes
    # The width is never needed in a config; typed anyway, it is only checked.
    raw["encoder"]["conformer"]["input_dim"] = 40
    assert build_model(from_dict(ModelConfig, raw, "model"), VOCAB).encoder.output_dim == 32
    raw["encoder"]["conformer"]["input_dim"] = 80
    with pytest.raises(ConfigError, match=r"input_dim is 80, but the frontend gives 40 \(model"):
        build_model(from_dict(ModelConfig, raw, "model"), VOCAB)


def test_model_config_errors():
    with pytest.raises(ConfigError, match="at least one head"):
        from_dict(ModelConfig, {}, "model")
    with pytest.raises(ConfigError, match="exactly one of conformer, transformer, san_m"):
        from_dict(
            ModelConfig, {"encoder": {"conformer": {}, "transformer": {}}, "ctc": {}}, "model"
        )
    with pytest.raises(ConfigError, match="exactly one of stateless, lstm"):
        from_dict(
            ModelConfig, {"transducer": {"predictor": {"stateless": {}, "lstm": {}}}}, "model"
        )
    with pytest.raises(
        ConfigError,
        match=r"'model\.encoder\.conformer\.subsampling' must be one of 'auto', 1, 2, 4, 6, 8",
    ):
        from_dict(ModelConfig, {"encoder": {"conformer": {"subsampling": 3}}, "ctc": {}}, "model")
    with pytest.raises(ConfigError, match="conv_kernel must be odd"):
        from_dict(ModelConfig, {"encoder": {"conformer": {"conv_kernel": 4}}, "ctc": {}}, "model")
    assert from_dict(ModelConfig, {"ctc": {}}, "model").encoder.conformer == ConformerConfig()


@pytest.mark.parametrize("factor", [4, 6, 8])
def test_subsampling_lengths(factor):
    sub = Conv2dSubsampling(80, 16, factor)
    lengths = torch.tensor([sub.min_input_frames, 50, 101, sub.min_input_frames - 1])
    out, out_lens = sub(torch.randn(4, 101, 80), lengths)
    assert out.shape[1] == int(sub.output_lengths(torch.tensor([101])))
    assert out_lens.tolist()[0] == 1 and out_lens.tolist()[3] == 0
    encoder = Encoder(ConformerConfig(**TINY, conv_kernel=3, subsampling=factor), 80)
    with pytest.raises(ValueError, match="too short for subsampling"):
        encoder(
            torch.randn(1, sub.min_input_frames - 1, 80), torch.tensor([sub.min_input_frames - 1])
        )


def _reference_rel_pos(attn: MultiHeadAttention, x, positions, valid):
    """Transformer-XL relative attention written out directly, scores (i, j) by loops."""
    batch, frames, _ = x.shape
    heads, dk = attn.num_heads, attn.head_dim
    q = attn.query(x).view(batch, frames, heads, dk).transpose(1, 2)
    k = attn.key(x).view(batch, frames, heads, dk).transpose(1, 2)
    v = attn.value(x).view(batch, frames, heads, dk).transpose(1, 2)
    p = attn.position(positions).view(-1, heads, dk)  # row c: distance (T-1) - c
    scores = torch.empty(batch, heads, frames, frames)
    for i in range(frames):
        for j in range(frames):
            pos = p[(frames - 1) - (i - j)]  # (H, K)
            content = ((q[:, :, i] + attn.bias_u) * k[:, :, j]).sum(-1)
            position = ((q[:, :, i] + attn.bias_v) * pos).sum(-1)
            scores[:, :, i, j] = (content + position) / math.sqrt(dk)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    context = torch.softmax(scores, -1) @ v
    return attn.out(context.transpose(1, 2).reshape(batch, frames, -1))


def test_relative_position_attention_matches_the_written_out_formula():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, 0.0, "rel_pos").eval()
    x = torch.randn(2, 7, 16)
    positions = RelativePositions(16, 0.0)(7, x.device)
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    expected = _reference_rel_pos(attn, x, positions, valid)
    got = attn(x, x, x, mask=valid[:, None, None, :], positions=positions)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :5], expected[1, :5], atol=1e-5, rtol=1e-4)
    unmasked = attn(x[:1], x[:1], x[:1], mask=None, positions=positions)
    torch.testing.assert_close(unmasked[0], expected[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("encoder", "positional"),
    [
        ("conformer", "rel_pos"),
        ("conformer", "rope"),
        ("transformer", "absolute"),
        ("san_m", "absolute"),
        ("san_m", "none"),
    ],
)
def test_padding_does_not_change_an_utterances_output(encoder, positional):
    torch.manual_seed(0)
    kinds = {"conformer": ConformerConfig, "transformer": TransformerConfig, "san_m": SanmConfig}
    extra = {"conformer": {"conv_kernel": 3}, "san_m": {"fsmn_kernel": 5}}.get(encoder, {})
    config = kinds[encoder](**TINY, **extra, positional=positional)
    model = Encoder(config, 80).eval()
    feats = torch.randn(1, 40, 80)
    alone, alone_lens = model(feats, torch.tensor([40]))
    padded = torch.cat([feats, torch.zeros(1, 25, 80)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 65, 80)])
    together, _ = model(batch, torch.tensor([40, 65]))
    torch.testing.assert_close(together[0, : alone_lens[0]], alone[0], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        torch.manual_seed(0)
        model = Encoder(ConformerConfig(**TINY, conv_kernel=3), 80).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)  # same dropout draws in both runs; checkpointing replays them
        out, _ = model(torch.randn(2, 40, 80), torch.tensor([40, 31]))
        out.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dropout_rate_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = Dropout(0.1).train()(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert y[y != 0].unique().tolist() == pytest.approx([1 / 0.9])
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d/dx of x * mask * scale
    z = torch.ones(10)
    assert Dropout(0.5).eval()(z) is z
    h = torch.ones(1000, requires_grad=True) * 1.0
    torch.manual_seed(3)
    a = Dropout(0.3)(h.clone())
    torch.manual_seed(3)
    b = Dropout(0.3, inplace=True)(h.clone())
    torch.testing.assert_close(a, b)


def test_frontend_applies_global_cmvn():
    stats = CmvnStats.empty(16000, FbankConfig())
    feats = torch.randn(3, 50, 80) * 4 + 7
    stats.add(feats.reshape(-1, 80).numpy())
    config = from_dict(
        ModelConfig, {"ctc": {}, "encoder": {"conformer": dict(TINY, conv_kernel=3)}}, "model"
    )
    model = build_model(config, VOCAB, cmvn=stats)
    batch = make_batch(3, 50)
    batch.feats, batch.feat_lens = feats, torch.tensor([50, 50, 50])
    normalised, _ = model.frontend(batch)
    torch.testing.assert_close(normalised.mean(dim=(0, 1)), torch.zeros(80), atol=1e-4, rtol=0)
    state = model.state_dict()
    assert "frontend.cmvn_mean" in state  # CMVN travels with the weights
    with pytest.raises(EchoicError, match="40 mel bins"):
        model.frontend.set_cmvn(CmvnStats.empty(16000, FbankConfig(num_mel_bins=40)))


def test_ctc_greedy_collapses_repeats_and_blanks():
    head = CtcHead(4, 5, from_dict(ModelConfig, {"ctc": {}}, "model").ctc)
    frames = torch.tensor([[0, 3, 3, 0, 3, 2, 2, 0, 4]])
    log_probs = F.one_hot(frames, 5).float().log()
    assert head.greedy(log_probs, torch.tensor([9])) == [[3, 3, 2, 4]]
    assert head.greedy(log_probs, torch.tensor([4])) == [[3]]


@pytest.mark.parametrize(
    "predictor",
    [{"stateless": {"embed_dim": 8, "context": 3}}, {"lstm": {"embed_dim": 8, "hidden_dim": 8}}],
)
def test_predictor_steps_reproduce_the_training_forward(predictor):
    head = build_model(
        tiny_config({"transducer": {"predictor": predictor, "joiner_dim": 8}}), VOCAB
    ).transducer.eval()
    tokens = torch.tensor([[4, 7, 2, 9]])
    history = torch.cat([torch.zeros(1, 1, dtype=torch.long), tokens], dim=1)  # blank first
    full = head.predictor(history)
    state = head.predictor.initial_state(1, "cpu")
    for position, token in enumerate(history[0]):
        out, state = head.predictor.step(token[None], state)
        torch.testing.assert_close(out, full[:, position], atol=1e-6, rtol=1e-5)


def test_every_weight_appears_once_in_the_state_dict():
    model = build_model(tiny_config(HEADS["transducer+ctc+attention"]), VOCAB)
    names = list(model.state_dict())
    assert len(names) == len(set(names))
    assert not any(n.startswith("accuracy_head") for n in names)
    pointers = [t.data_ptr() for t in model.state_dict().values() if t.numel()]
    assert len(pointers) == len(set(pointers))


def test_free_running_accuracy_penalises_insertions():
    from echoic.models.heads import token_accuracy

    assert token_accuracy([[1, 2, 3, 4]], [[1, 2, 3, 4]]).value == 1.0
    assert (
        token_accuracy([[1, 2, 3, 4]], [[1, 9, 3]]).value == 0.5
    )  # one substitution, one deletion
    assert (
        token_accuracy([[1, 2]], [[1, 2, 5, 6, 7, 8, 9]]).value == 0.0
    )  # all matched, but 5 inserted
    both = token_accuracy([[1, 2, 3, 4], [5, 6]], [[1, 2, 3, 4], []])
    assert (both.total, both.weight) == (4.0, 6.0)


def test_both_relative_shifts_agree():
    from echoic.models.layers import rel_shift, rel_shift_padded

    scores = torch.randn(2, 3, 7, 13)
    torch.testing.assert_close(rel_shift(scores), rel_shift_padded(scores), rtol=0, atol=0)


def test_subsampling_auto_follows_the_frontends_frame_shift():
    """40 ms encoder frames: 4x for 10 ms fbank, 2x for 20 ms SSL frames, 1x for 40 ms;
    SSL widths get a time-only front (a conv2d over 768 features would be huge)."""
    config = ConformerConfig(**TINY, conv_kernel=3)
    assert Encoder(config, 80, frame_shift=0.01).subsampling.factor == 4
    ssl = Encoder(config, 768, frame_shift=0.02)
    assert ssl.subsampling.factor == 2 and ssl.subsampling.conv.in_channels == 768
    assert Encoder(config, 768, frame_shift=0.04).subsampling.factor == 1
    with pytest.raises(ConfigError, match="no factor for 15 ms input frames"):
        Encoder(config, 80, frame_shift=0.015)
    frames = torch.tensor([3, 4, 5, 50])
    out, lengths = ssl.subsampling(torch.randn(4, 50, 768), frames)
    assert lengths.tolist() == [1, 1, 2, 24] and out.shape == (4, 24, 32)
    assert ssl.subsampling.input_frames_for(2) == 5 and ssl.min_input_frames == 3
    with pytest.raises(ConfigError, match="subsampling_channels sets the conv2d front"):
        Encoder(ConformerConfig(**TINY, subsampling_channels=16), 768, frame_shift=0.02)


def _outputs_and_grads(module, forwards, inputs):
    """For each forward: its output and the gradients of the inputs and of `module`'s
    parameters, for the same upstream gradient."""
    results = []
    for forward in forwards:
        module.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        out = forward(*inputs)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads = [x.grad for x in inputs if x.requires_grad]
        results.append([out, *grads, *(p.grad for p in module.parameters())])
    return results


@pytest.mark.parametrize("bias", [True, False])
def test_the_onednn_linear_matches_nn_linear(bias):
    """Linear's oneDNN forward / input gradient and BLAS weight gradient give nn.Linear's
    numbers (to rounding), for 3-D and non-contiguous inputs; the state dict is nn.Linear's."""
    torch.manual_seed(0)
    linear = Linear(48, 96, bias=bias)
    assert list(linear.state_dict()) == list(torch.nn.Linear(48, 96, bias=bias).state_dict())
    for x in (torch.randn(3, 17, 48), torch.randn(48, 10).t()):
        x.requires_grad_()
        fast, plain = _outputs_and_grads(
            linear, [linear, lambda x: F.linear(x, linear.weight, linear.bias)], [x]
        )
        for a, b in zip(fast, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(torch.randn(2, 48)).dtype == torch.bfloat16  # autocast's own path


@pytest.mark.parametrize(
    ("in_channels", "kernel", "stride", "shape"),
    [(1, 3, 2, (2, 1, 41, 20)), (64, 3, 2, (2, 64, 19, 9)), (64, 5, 3, (2, 64, 22, 11))],
)
def test_the_subsampling_conv_gradients_match_conv2d(in_channels, kernel, stride, shape):
    """strided_conv2d's im2col weight gradient equals oneDNN's own, as does the rest
    (a 1-channel input takes nn.Conv2d's own path)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, 16, kernel, stride).to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(in_channels > 1)  # the first conv's input (fbank) has no gradient
    fast, plain = _outputs_and_grads(conv, [lambda x: strided_conv2d(x, conv), conv], [x])
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    strided_conv2d(x, conv).sum().backward()
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
