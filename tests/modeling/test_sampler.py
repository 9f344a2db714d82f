"""sample_balanced: per-row budgets, masks respected, uniform choice, batched == per-row rules."""

import pytest
import torch

from detkit.modeling.sampler import sample_balanced


def masks_from_counts(rows: list[tuple[int, int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with the given (#positive, #negative) candidates at shuffled positions, the rest neither."""
    g = torch.Generator().manual_seed(0)
    positive = torch.zeros(len(rows), width, dtype=torch.bool)
    negative = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (num_pos, num_neg) in enumerate(rows):
        perm = torch.randperm(width, generator=g)
        positive[r, perm[:num_pos]] = True
        negative[r, perm[num_pos : num_pos + num_neg]] = True
    return positive, negative


def expected_counts(num_pos: int, num_neg: int, batch: int, fraction: float) -> tuple[int, int]:
    pos = min(num_pos, int(batch * fraction))
    return pos, min(num_neg, batch - pos)


@pytest.mark.parametrize(
    "batch, fraction, rows",
    [
        # RPN-like: 10 per row, half positive.
        (10, 0.5, [(20, 20), (2, 20), (20, 3), (0, 0), (0, 30), (30, 0), (5, 5), (1, 1)]),
        # RoI-head-like budgets: 512 per image, 25% foreground -> at most 128 positives.
        (512, 0.25, [(600, 1400), (50, 1400), (600, 100), (0, 2000)]),
        # int(10 * 0.25) = 2: the positive budget rounds down.
        (10, 0.25, [(9, 9)]),
    ],
)
def test_counts_per_row(batch, fraction, rows):
    positive, negative = masks_from_counts(rows, width=2000 if batch == 512 else 60)
    sampled_pos, sampled_neg = sample_balanced(
        positive, negative, batch, fraction, generator=torch.Generator().manual_seed(1)
    )
    for r, (num_pos, num_neg) in enumerate(rows):
        assert (sampled_pos[r].sum().item(), sampled_neg[r].sum().item()) == expected_counts(
            num_pos, num_neg, batch, fraction
        )


def test_hand_counts():
    positive, negative = masks_from_counts([(600, 1400), (9, 9)], width=2000)
    sampled_pos, sampled_neg = sample_balanced(positive, negative, 512, 0.25)
    assert sampled_pos.sum(1).tolist() == [128, 9]
    assert sampled_neg.sum(1).tolist() == [384, 9]


def test_never_samples_outside_the_masks():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(-1, 2, (16, 300), generator=g)  # 1 pos, 0 neg, -1 neither
    positive, negative = labels == 1, labels == 0
    sampled_pos, sampled_neg = sample_balanced(positive, negative, 64, 0.5, generator=g)
    assert not (sampled_pos & ~positive).any()
    assert not (sampled_neg & ~negative).any()
    assert not (sampled_pos & sampled_neg).any()


def test_fixed_generator_is_deterministic():
    positive, negative = masks_from_counts([(40, 40)] * 3, width=100)
    first = sample_balanced(positive, negative, 16, 0.5, generator=torch.Generator().manual_seed(7))
    second = sample_balanced(positive, negative, 16, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = sample_balanced(positive, negative, 16, 0.5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(first[0], other[0])


def test_each_candidate_is_equally_likely():
    """4000 independent rows of the same masks: 10 positives of which 3 are taken, 20 negatives of
    which 7 are taken; each candidate should be picked in 30% / 35% of the rows (+- 5 sigma)."""
    draws, width = 4000, 40
    positive = torch.zeros(draws, width, dtype=torch.bool)
    negative = torch.zeros(draws, width, dtype=torch.bool)
    positive[:, 5:15] = True  # candidates spread over the row, with gaps of "neither"
    negative[:, 20:40] = True
    sampled_pos, sampled_neg = sample_balanced(positive, negative, 10, 0.3, generator=torch.Generator().manual_seed(3))
    assert (sampled_pos.sum(1) == 3).all() and (sampled_neg.sum(1) == 7).all()
    for freq_counts, mask, p in ((sampled_pos.sum(0), positive[0], 0.3), (sampled_neg.sum(0), negative[0], 0.35)):
        sigma = (draws * p * (1 - p)) ** 0.5
        counts = freq_counts[mask].float()
        assert ((counts - draws * p).abs() < 5 * sigma).all(), counts.tolist()
        assert (freq_counts[~mask] == 0).all()


def test_batched_equals_per_row_rules_on_random_inputs():
    g = torch.Generator().manual_seed(4)
    num_rows, width, batch, fraction = 12, 150, 32, 0.25
    # Rows of varied density: from almost no candidates to almost all.
    density = torch.linspace(0.02, 1.0, num_rows)[:, None]
    is_candidate = torch.rand(num_rows, width, generator=g) < density
    pos_share = torch.rand(num_rows, 1, generator=g)
    positive = is_candidate & (torch.rand(num_rows, width, generator=g) < pos_share)
    negative = is_candidate & ~positive
    sampled_pos, sampled_neg = sample_balanced(positive, negative, batch, fraction, generator=g)
    for r in range(num_rows):
        num_pos, num_neg = int(positive[r].sum()), int(negative[r].sum())
        want_pos, want_neg = expected_counts(num_pos, num_neg, batch, fraction)
        assert int(sampled_pos[r].sum()) == want_pos
        assert int(sampled_neg[r].sum()) == want_neg
        assert all(positive[r, m] for m in range(width) if sampled_pos[r, m])
        assert all(negative[r, m] for m in range(width) if sampled_neg[r, m])
