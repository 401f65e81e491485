import numpy as np
import pytest

from echoic.data.sampler import TOO_LONG, TOO_SHORT, BucketBatchSampler

DURATIONS = np.random.default_rng(0).uniform(0.5, 15.0, 500).tolist()


def _sampler(**kw):
    args = {"max_frames": 6000, "seed": 3, "num_buckets": 10}
    args.update(kw)
    return BucketBatchSampler(DURATIONS, **args)


def test_each_epoch_covers_every_utterance_once_within_max_frames():
    sampler = _sampler()
    for epoch in (0, 1):
        batches = sampler.epoch_batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(DURATIONS)))
        for batch in batches:
            longest = max(np.ceil(DURATIONS[i] * 100) for i in batch)
            assert len(batch) * longest <= 6000 or len(batch) == 1
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert _sampler().epoch_batches(4) == _sampler().epoch_batches(4)
    assert _sampler().epoch_batches(4) != _sampler(seed=4).epoch_batches(4)
    fresh = _sampler()
    fresh.epoch_batches(0)  # another epoch computed first changes nothing
    assert fresh.epoch_batches(4) == _sampler().epoch_batches(4)


def test_fixed_batch_size_and_unshuffled_order():
    sampler = _sampler(max_frames=None, batch_size=16, shuffle=False)
    batches = sampler.epoch_batches(0)
    assert all(len(b) <= 16 for b in batches)
    lengths = [DURATIONS[i] for b in batches for i in b]
    assert lengths == sorted(lengths)  # evaluation order: by duration


def test_bucketing_reduces_padding():
    bucketed = _sampler(num_buckets=20).padding_efficiency(0)
    single = _sampler(num_buckets=1).padding_efficiency(0)
    assert bucketed > 0.9 and bucketed > single


def test_duration_limits_exclude_and_report():
    sampler = _sampler(min_duration=1.0, max_duration=14.0)
    short = [i for i, d in enumerate(DURATIONS) if d < 1.0]
    long_ = [i for i, d in enumerate(DURATIONS) if d > 14.0]
    assert sampler.excluded == {TOO_SHORT: short, TOO_LONG: long_}
    used = {i for b in sampler.epoch_batches(0) for i in b}
    assert used.isdisjoint(short + long_) and len(used) == len(DURATIONS) - len(short) - len(long_)


def _run(sampler):
    return [(p.index, p.utterances) for p in sampler]


def test_resume_at_any_k_continues_the_same_sequence():
    full = _run(_sampler())
    for k in (0, 1, 17, len(full) - 1, len(full)):
        resumed = _sampler()
        resumed.load_state_dict({"epoch": 0, "batch_index": k})
        assert _run(resumed) == full[k:]
        assert len(resumed) == len(full) - k


def test_ranks_split_the_global_order_whatever_their_number():
    order = _sampler().epoch_batches(0)
    for world in (2, 3, 4):
        per_rank = [_run(_sampler(rank=r, world_size=world)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
        merged = sorted(item for p in per_rank for item in p)
        complete = len(order) // world * world  # the last incomplete group is dropped
        assert merged == [(i, order[i]) for i in range(complete)]
        for rank, plans in enumerate(per_rank):
            assert all(index % world == rank for index, _ in plans)


def test_a_run_resumed_with_another_number_of_ranks_keeps_the_global_order():
    order = _sampler().epoch_batches(0)
    two = [_sampler(rank=r, world_size=2) for r in range(2)]
    first_steps = [[p for _, p in zip(range(5), iter(s))] for s in two]
    epoch, k = two[0].position_after(first_steps[0][-1])
    assert (epoch, k) == (0, 10)
    assert two[1].position_after(first_steps[1][-1]) == (0, 10)
    single = _sampler()
    single.load_state_dict({"epoch": epoch, "batch_index": k})
    assert [p.utterances for p in single] == order[10:]
    three = [_sampler(rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.set_position(0, 11)  # any k, not only a multiple of the new world size
    step = [next(iter(s)).utterances for s in three]
    assert step == order[11:14]


def test_state_is_validated():
    sampler = _sampler()
    with pytest.raises(ValueError, match="keys epoch and batch_index"):
        sampler.load_state_dict({"epoch": 0, "batch": 3})
    with pytest.raises(ValueError, match="outside the epoch"):
        sampler.load_state_dict({"epoch": 0, "batch_index": 10_000})
    with pytest.raises(ValueError, match="exactly one"):
        BucketBatchSampler(DURATIONS, max_frames=100, batch_size=4)


def test_evaluation_keeps_every_batch_across_ranks():
    order = _sampler(shuffle=False).epoch_batches(0)
    for world in (2, 3):
        per_rank = [
            _sampler(shuffle=False, rank=r, world_size=world, drop_last=False) for r in range(world)
        ]
        merged = sorted(item for s in per_rank for item in _run(s))
        assert merged == list(enumerate(order))
        assert [len(s) for s in per_rank] == [len(_run(s)) for s in per_rank]
