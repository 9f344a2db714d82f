"""COCO's 80 object classes with their category ids: the names a COCO-trained model's labels mean.

COCO 2017's instances json (instances_val2017.json) numbers its 80 categories 1..90 with gaps (ids
12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused). detkit, like Detectron2, maps category ids
to the contiguous labels 0..79 in sorted id order, so COCO_CLASS_NAMES[label] and
COCO_CATEGORY_IDS[label] describe label `label` of any COCO model (Detectron2's model zoo included):

    >>> COCO_CLASS_NAMES[0], COCO_CATEGORY_IDS[0], COCO_CLASS_NAMES[79], COCO_CATEGORY_IDS[79]
    ('person', 1, 'toothbrush', 90)

`detkit convert-weights --config CONFIG` stores these in the checkpoint of a model with 80 classes
when the config's test annotation file is not there (the usual case for a model-zoo download);
a test annotation file that is there always gives the names instead.
"""

from __future__ import annotations

# (category id, name) exactly as in COCO 2017's annotation files, in id order = label order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)

COCO_CATEGORY_IDS: tuple[int, ...] = tuple(cid for cid, _ in COCO_CATEGORIES)
COCO_CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)
NUM_COCO_CLASSES = len(COCO_CATEGORIES)  # 80
