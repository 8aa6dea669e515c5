"""The train/val split and the resumable, rank-sharded sampler."""

from __future__ import annotations

import pytest
import torch

from seemore_ds.data.dataset import CaptionData, ResumableSampler, split_train_val
from seemore_ds.errors import UserError


def numbered_data(n: int) -> CaptionData:
    """n rows whose caption is the row number and whose image is filled with it."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return CaptionData(images, [str(i) for i in range(n)], source=f"{n} numbered rows")


def draw(sampler: ResumableSampler, n_batches: int) -> list[list[int]]:
    return [sampler.next_indices().tolist() for _ in range(n_batches)]


# --- split -------------------------------------------------------------------------------------

def test_split_is_deterministic_from_the_seed_and_partitions_the_rows():
    data = numbered_data(50)
    train, val = split_train_val(data, 0.2, seed=7)
    train_again, val_again = split_train_val(data, 0.2, seed=7)
    _, val_other_seed = split_train_val(data, 0.2, seed=8)

    assert (train.captions, val.captions) == (train_again.captions, val_again.captions)
    assert val.captions != val_other_seed.captions
    assert len(val) == 10 and len(train) == 40
    assert sorted(train.captions + val.captions, key=int) == data.captions
    # Images travel with their captions.
    assert [int(img[0, 0, 0]) for img in val.images_at(torch.arange(len(val)))] == [int(c) for c in val.captions]


@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.0, 0), (1, 0.5, 0), (2, 0.01, 1), (3, 0.99, 2), (7, 0.5, 4)])
def test_split_sizes(n, fraction, n_val):
    train, val = split_train_val(numbered_data(n), fraction, seed=0)
    assert (len(train), len(val)) == (n - n_val, n_val)


# --- sampler -----------------------------------------------------------------------------------

def test_one_epoch_visits_every_row_once_and_the_next_is_reshuffled():
    sampler = ResumableSampler(40, batch_size=8, seed=3)
    first = sum(draw(sampler, 5), [])
    second = sum(draw(sampler, 5), [])
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second
    assert sampler.epoch == 1


def test_same_seed_same_order_other_seed_other_order():
    assert draw(ResumableSampler(40, 8, seed=3), 7) == draw(ResumableSampler(40, 8, seed=3), 7)
    assert draw(ResumableSampler(40, 8, seed=3), 7) != draw(ResumableSampler(40, 8, seed=4), 7)


@pytest.mark.parametrize("n", [40, 43])
def test_two_ranks_get_disjoint_shards_of_equal_length(n):
    ranks = [ResumableSampler(n, batch_size=4, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == (n // 2) // 4
    for epoch in range(2):
        shards = [sum(draw(sampler, sampler.batches_per_epoch), []) for sampler in ranks]
        assert not set(shards[0]) & set(shards[1])
        assert len(shards[0]) == len(shards[1]) == 4 * ranks[0].batches_per_epoch
        assert len(set(shards[0]) | set(shards[1])) == 2 * len(shards[0])
        if n % 8 == 0:  # nothing to drop: the two shards cover every row
            assert sorted(shards[0] + shards[1]) == list(range(n))


def test_a_short_tail_is_dropped_so_every_batch_is_full():
    sampler = ResumableSampler(43, batch_size=8, seed=0)
    batches = draw(sampler, 12)
    assert all(len(b) == 8 for b in batches)
    assert sampler.epoch == 2  # 5 batches per epoch


@pytest.mark.parametrize("stop_after", [0, 3, 5, 7])  # fresh, mid-epoch, exactly at an epoch end, next epoch
def test_state_dict_resumes_the_exact_sequence(stop_after):
    straight = ResumableSampler(40, 8, seed=11, rank=1, world_size=2)
    expected = draw(straight, stop_after + 6)

    interrupted = ResumableSampler(40, 8, seed=11, rank=1, world_size=2)
    draw(interrupted, stop_after)
    state = interrupted.state_dict()

    resumed = ResumableSampler(40, 8, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(dict(state))
    assert draw(resumed, 6) == expected[stop_after:]


def test_state_dict_is_plain_numbers():
    sampler = ResumableSampler(40, 8, seed=0)
    draw(sampler, 7)
    assert sampler.state_dict() == {"epoch": 1, "samples_seen_in_epoch": 16}


def test_a_split_smaller_than_one_batch_is_a_user_error():
    with pytest.raises(UserError, match="lower train.batch_size"):
        ResumableSampler(10, batch_size=8, seed=0, world_size=2)


# n: a whole number of steps before and after, so that no tail is dropped (a short tail is, at any rank count)
@pytest.mark.parametrize("before, after, n", [(2, 1, 48), (1, 2, 48), (2, 3, 52)])
def test_a_resume_on_another_rank_count_sees_every_sample_of_the_epoch_exactly_once(before, after, n):
    batch_size, steps_before = 4, 2
    ranks = [ResumableSampler(n, batch_size, seed=9, rank=r, world_size=before) for r in range(before)]
    seen = [i for _ in range(steps_before) for sampler in ranks for i in sampler.next_indices().tolist()]
    state = ranks[0].state_dict()
    assert state == {"epoch": 0, "samples_seen_in_epoch": steps_before * batch_size * before}

    resumed = [ResumableSampler(n, batch_size, seed=9, rank=r, world_size=after) for r in range(after)]
    for sampler in resumed:
        sampler.load_state_dict(dict(state))
    while resumed[0].position + batch_size * after <= n:  # the rest of the epoch
        seen += [i for sampler in resumed for i in sampler.next_indices().tolist()]
    assert sorted(seen) == list(range(n))  # each sample of the epoch exactly once
    assert all(sampler.next_indices().tolist() for sampler in resumed) and resumed[0].epoch == 1
