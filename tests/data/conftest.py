"""Fixtures of the data tests (helpers in data_helpers.py)."""

import pytest
from data_helpers import images_table, write_coco


@pytest.fixture
def tiny_coco(tmp_path):
    """6 images (4 landscape, 2 portrait), 2 categories with ids 5 and 9, image 6 without boxes."""
    sizes = [(40, 60), (40, 60), (60, 40), (48, 64), (64, 48), (40, 60)]
    images = images_table(sizes)
    annotations = [
        {"image_id": 1, "category_id": 5, "bbox": [5, 5, 20, 10]},
        {"image_id": 2, "category_id": 9, "bbox": [10, 10, 30, 20]},
        {"image_id": 3, "category_id": 5, "bbox": [1, 2, 10, 30]},
        {"image_id": 4, "category_id": 9, "bbox": [0, 0, 64, 48]},
        {"image_id": 5, "category_id": 5, "bbox": [4, 4, 8, 8]},
    ]
    categories = [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}]
    ann_file, image_root = write_coco(tmp_path, images, annotations, categories)
    return ann_file, image_root
