"""match_boxes: tiled matching == Matcher on the whole IoU matrix, bit for bit, in bounded memory.

Also pins the lighter batched_box_iou (widths and heights as separate tensors) to the old
(N, G, M, 2) corner-pair form, bit for bit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from detkit.modeling.matcher import MATCH_MAX_ELEMENTS, Matcher, match_boxes, match_tile_sizes
from detkit.structures.boxes import batched_box_iou, box_area

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MATCHERS = {
    "rpn": Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=True),
    "rpn without low-quality": Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=False),
    "roi heads": Matcher(low_threshold=0.5, high_threshold=0.5, allow_low_quality_matches=False),
}


def corner_pair_box_iou(boxes_a, boxes_b):
    """batched_box_iou as it was: (N, G, M, 2) top-left and bottom-right corners."""
    area_a, area_b = box_area(boxes_a), box_area(boxes_b)
    top_left = torch.maximum(boxes_a[:, :, None, :2], boxes_b[:, None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, :, None, 2:], boxes_b[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def grid_boxes(shape, generator, min_side=0):
    """(*shape, 4) boxes with corners on a 8-px grid in [0, 80]: equal boxes, equal IoUs and (with
    min_side 0) empty boxes are common, so every tie rule is exercised."""
    xy = torch.randint(0, 7, (*shape, 2), generator=generator).float() * 8
    wh = torch.randint(min_side, 4, (*shape, 2), generator=generator).float() * 8
    return torch.cat((xy, xy + wh), dim=-1)


def tie_case(seed=0, num_images=5, max_gt=7, num_boxes=40):
    """Images with 7, 0, 3, 1 and 6 valid GT slots; padding slots hold real-looking boxes (a bug
    that let them match would show); later GT slots repeat earlier ones (ties over G) and every
    GT box appears twice among the predictions (ties of each GT's best, far apart in M)."""
    g = torch.Generator().manual_seed(seed)
    gt_boxes = grid_boxes((num_images, max_gt), g, min_side=1)
    gt_boxes[:, 5] = gt_boxes[:, 1]
    gt_boxes[:, 6] = gt_boxes[:, 0]
    gt_valid = torch.arange(max_gt)[None, :] < torch.tensor([7, 0, 3, 1, 6])[:, None]
    boxes = grid_boxes((num_images, num_boxes), g)
    boxes[:, 3 : 3 + max_gt] = gt_boxes + 1.0  # a near copy: IoU < 1, so a low-quality tie is possible
    boxes[:, num_boxes - max_gt :] = gt_boxes + 1.0
    return gt_boxes, gt_valid, boxes


def test_batched_box_iou_is_bit_identical_to_the_corner_pair_form():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 60, 2, generator=g) * 500
    float_boxes = torch.cat((xy, xy + torch.rand(3, 60, 2, generator=g) * 300), dim=-1)
    float_boxes[0, :5, 2:] = float_boxes[0, :5, :2]  # empty boxes: union 0 with each other
    float_boxes[1, 0, 2] = float("inf")  # infinite area: inf - inf = NaN union -> IoU 0
    float_boxes[1, 1, 0] = float("nan")
    for boxes_a, boxes_b in [(float_boxes[:, :20], float_boxes[:, 20:]), tie_case()[0::2], (float_boxes, float_boxes)]:
        expected = corner_pair_box_iou(boxes_a, boxes_b)
        got = batched_box_iou(boxes_a, boxes_b)
        assert torch.equal(got, expected)
        assert not got.isnan().any()
        assert (got > 0).any() and (got == 0).any()


def test_the_tie_case_has_ties_over_gt_and_over_predictions():
    gt_boxes, gt_valid, boxes = tie_case()
    iou = batched_box_iou(gt_boxes, boxes)
    # Image 0: slots 0 and 6 are the same box, so every prediction ties over them.
    assert torch.equal(iou[0, 0], iou[0, 6]) and (iou[0, 0] > 0).any()
    # Each valid GT's best IoU is reached by at least two predictions (the two near copies).
    best = iou.max(dim=2, keepdim=True).values
    num_best = ((iou == best) & (best > 0)).sum(dim=2)
    assert (num_best[gt_valid] >= 2).all()
    # ... and for some below the 0.7 threshold, where only the low-quality rule makes them positive.
    assert ((best[..., 0] < 0.7) & gt_valid).sum() >= 3


# max_elements for the (5 images, 7 GT slots, 40 boxes) tie case, and the tile it must give.
TILINGS = {
    "one tile": (10**9, (5, 7, 40)),
    "images": (2 * 7 * 40 + 5, (2, 7, 40)),
    "gt slots": (3 * 40 + 1, (1, 3, 40)),
    "boxes": (7, (1, 1, 7)),
}


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("matcher_name", sorted(MATCHERS))
def test_tiled_matching_equals_the_whole_iou_matrix(tiling, matcher_name):
    matcher = MATCHERS[matcher_name]
    max_elements, tile = TILINGS[tiling]
    assert match_tile_sizes(5, 7, 40, max_elements) == tile
    for seed in range(3):
        gt_boxes, gt_valid, boxes = tie_case(seed)
        expected_idxs, expected_labels = matcher(batched_box_iou(gt_boxes, boxes), gt_valid)
        idxs, labels = match_boxes(matcher, gt_boxes, gt_valid, boxes, max_elements=max_elements)
        assert idxs.dtype == torch.int64 and labels.dtype == torch.int8
        assert torch.equal(idxs, expected_idxs)
        assert torch.equal(labels, expected_labels)
        assert labels[1].eq(0).all()  # the image without GT


def test_shared_anchors_as_an_expanded_view_and_padding_to_many_slots():
    # The RPN passes its (M, 4) anchors expanded to (N, M, 4) without a copy.
    g = torch.Generator().manual_seed(5)
    anchors = grid_boxes((90,), g)
    gt_boxes = grid_boxes((3, 11), g)
    gt_valid = torch.rand(3, 11, generator=g) < 0.5
    matcher = MATCHERS["rpn"]
    expected = matcher(batched_box_iou(gt_boxes, anchors.expand(3, -1, -1)), gt_valid)
    for max_elements in (10**9, 2 * 11 * 90, 5 * 90, 13):
        got = match_boxes(matcher, gt_boxes, gt_valid, anchors.expand(3, -1, -1), max_elements=max_elements)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert (expected[1] == 1).any() and (expected[1] == 0).any() and (expected[1] == -1).any()


def test_first_gt_slot_wins_a_tie_across_gt_tiles():
    # Slots 0 and 2 hold the same box; with one slot per tile the running max must keep slot 0.
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]])
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [52.0, 52.0, 60.0, 60.0], [90.0, 90.0, 99.0, 99.0]]]
    )
    valid = torch.ones(1, 3, dtype=torch.bool)
    idxs, labels = match_boxes(MATCHERS["rpn"], gt_boxes, valid, boxes, max_elements=4)
    assert match_tile_sizes(1, 3, 4, 4) == (1, 1, 4)
    assert idxs.tolist() == [[0, 0, 1, 0]]
    # IoUs 1, 0.5 (ignored), 0.64 (GT 1's best: low-quality positive), 0 (background).
    assert labels.tolist() == [[1, -1, 1, 0]]
    # Slot 0 as padding: slot 2 takes its place.
    idxs, _ = match_boxes(MATCHERS["rpn"], gt_boxes, torch.tensor([[False, True, True]]), boxes, max_elements=4)
    assert idxs.tolist() == [[2, 2, 1, 1]]  # prediction 3 overlaps nothing: IoU 0 with slots 1 and 2, first wins


def test_low_quality_ties_across_box_tiles_use_the_best_iou_over_all_boxes():
    # One GT; predictions 1 and 5 tie its best IoU 0.25 in different 2-box tiles, prediction 3
    # (0.2) is best only within its own tile and must stay background.
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    boxes = torch.tensor(
        [
            [
                [20.0, 20.0, 30.0, 30.0],
                [0.0, 0.0, 10.0, 2.5],
                [40.0, 40.0, 50.0, 50.0],
                [0.0, 0.0, 10.0, 2.0],
                [60.0, 60.0, 70.0, 70.0],
                [0.0, 0.0, 2.5, 10.0],
            ]
        ]
    )
    valid = torch.ones(1, 1, dtype=torch.bool)
    idxs, labels = match_boxes(MATCHERS["rpn"], gt_boxes, valid, boxes, max_elements=2)
    assert match_tile_sizes(1, 1, 6, 2) == (1, 1, 2)
    assert labels.tolist() == [[0, 1, 0, 0, 0, 1]]
    assert idxs.tolist() == [[0] * 6]


def test_no_gt_slots_or_no_boxes_give_well_shaped_background():
    # Matcher cannot take a max over an empty G axis; match_boxes labels everything background.
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]]]).expand(2, -1, -1)
    idxs, labels = match_boxes(MATCHERS["rpn"], torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), boxes)
    assert idxs.tolist() == [[0, 0], [0, 0]] and labels.tolist() == [[0, 0], [0, 0]]
    idxs, labels = match_boxes(
        MATCHERS["rpn"], torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 0, 4)
    )
    assert idxs.shape == labels.shape == (2, 0)


def measure(cases: list) -> list:
    """Peak memory of matchings, one after the other in a fresh process (python -m
    benchmarks.matching --measure resets the peak before each: one process saves a second torch import)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.matching", "--measure", json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
        cwd=REPO_ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~5 s of CPU, most of it importing torch and torchvision in the fresh process
def test_tiled_matching_peak_memory_is_bounded_by_the_budget():
    # RPN matching of 4 images x 100 GT boxes x 20,160 anchors (512x672: a 32x42 map, 15 anchors
    # per location): 8M IoU values, 32 MB per fp32 copy.
    case = {"stage": "rpn", "images": 4, "boxes_per_image": 100, "height": 512, "width": 672, "device": "cpu"}
    max_elements = 1 << 20
    tiled, whole = measure([dict(case, mode="chunked", max_elements=max_elements), dict(case, mode="unchunked")])
    assert tiled["result_sha1"] == whole["result_sha1"]
    assert tiled["num_boxes"] == whole["num_boxes"] == 20160
    one_copy = 4 * 100 * 20160 * 4
    # The whole matrix: the IoU and the matcher's masked copy at least, measured as such.
    assert whole["peak_bytes"] > 2 * one_copy
    # Tiled: ~3 fp32 copies of one tile at the peak (12 bytes a value, 16 allowed), the (N, M)
    # results and running maxima (~30 bytes a box), and 8 MB of allocator slack.
    bound = 16 * max_elements + 40 * 4 * 20160 + (8 << 20)
    assert tiled["peak_bytes"] < bound
    assert tiled["peak_bytes"] < one_copy * 3 / 4  # less than a single copy of the whole IoU matrix


def test_default_budget_keeps_the_batch_16_x_300_rpn_matching_under_1_gb():
    # The case (63,000 anchors at 800x1333), with the memory model the test above measures:
    # 16 bytes per IoU value of a tile + 40 bytes per (image, anchor) + 8 MB slack.
    tile = match_tile_sizes(16, 300, 63000, MATCH_MAX_ELEMENTS)
    assert tile == (1, 150, 63000)
    assert 16 * tile[0] * tile[1] * tile[2] + 40 * 16 * 63000 + (8 << 20) < 1e9 / 4


@pytest.mark.cuda  # deselected without CUDA (conftest.py); make gpu-check runs it
def test_on_cuda_tiled_matching_equals_the_whole_iou_matrix():
    for matcher in MATCHERS.values():
        for max_elements, _ in TILINGS.values():
            gt_boxes, gt_valid, boxes = (t.cuda() for t in tie_case(1))
            expected = matcher(batched_box_iou(gt_boxes, boxes), gt_valid)
            got = match_boxes(matcher, gt_boxes, gt_valid, boxes, max_elements=max_elements)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.cuda
def test_on_cuda_the_batch_16_x_300_rpn_matching_stays_under_1_gb():
    # The case at 800x1333 (63,000 anchors), torch.cuda.max_memory_allocated in a fresh process.
    case = {"stage": "rpn", "images": 16, "boxes_per_image": 300, "device": "cuda"}
    tiled, whole = measure([dict(case, mode="chunked", max_elements=MATCH_MAX_ELEMENTS), dict(case, mode="unchunked")])
    assert tiled["result_sha1"] == whole["result_sha1"]
    assert whole["peak_bytes"] > 2 * 16 * 300 * 63000 * 4  # the whole matrix: at least 2 copies of 1.2 GB
    assert tiled["peak_bytes"] < 1e9 / 4
