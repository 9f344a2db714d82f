"""Sample a fixed budget of positives and negatives per image, for all images at once.

Shapes: N images, M candidates per image.

Per image: at most round-down(batch_size_per_image * positive_fraction) positives, chosen at
random, and negatives fill the rest of the budget (Detectron2's `subsample_labels`). Random choice
without a loop: give every candidate a random key, rank the keys within each row among the
candidates of one kind, and keep the first k of that row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rank_in_row(keys: Tensor) -> Tensor:
    """(N, M) float keys -> (N, M) int64 rank of each key within its row (0 = smallest)."""
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


@torch.no_grad()
def sample_balanced(
    positive: Tensor,
    negative: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose positives and negatives per row.

    positive, negative: (N, M) bool, disjoint. Returns (sampled_pos, sampled_neg), (N, M) bool with
    per row sampled_pos.sum() = min(#pos, int(batch * fraction)) and
    sampled_neg.sum() = min(#neg, batch - sampled_pos.sum()).
    """
    num_pos = positive.sum(dim=1, keepdim=True)  # (N, 1)
    num_neg = negative.sum(dim=1, keepdim=True)
    pos_budget = torch.clamp(num_pos, max=int(batch_size_per_image * positive_fraction))
    neg_budget = torch.minimum(num_neg, batch_size_per_image - pos_budget)

    keys = torch.rand(positive.shape, device=positive.device, generator=generator)
    # Candidates of the other kind get keys above 1 so they rank after every candidate of this kind.
    pos_rank = _rank_in_row(torch.where(positive, keys, keys + 2.0))
    neg_rank = _rank_in_row(torch.where(negative, keys, keys + 2.0))
    sampled_pos = positive & (pos_rank < pos_budget)
    sampled_neg = negative & (neg_rank < neg_budget)
    return sampled_pos, sampled_neg
