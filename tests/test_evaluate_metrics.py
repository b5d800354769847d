"""Known answers of the per-metric helpers not covered in tests/test_score_report.py."""

from __future__ import annotations

import numpy as np

from charaforge.evaluate import memorisation
from charaforge.evaluate.tags import defining_tags, prompt_tags


def test_a_tag_repeated_in_one_image_counts_once() -> None:
    lists = [["1girl", "1girl", "red hair"], ["smile"], ["1girl"]]
    assert defining_tags(lists, 2 / 3) == ["1girl"]
    assert defining_tags([["red hair", "red hair"], ["smile"]], 1.0) == []


def test_prompt_tags_are_trimmed_and_lower_cased() -> None:
    assert prompt_tags("aoi_cf, 1Girl ,, Red Hair ") == {"aoi_cf", "1girl", "red hair"}


def test_nearest_hamming_known_answer() -> None:
    training = np.zeros((2, 64), dtype=bool)
    training[1, :10] = True
    generated = np.zeros((2, 64), dtype=bool)
    generated[0, :3] = True  # 3 from the first, 7 from the second
    generated[1, :12] = True  # 12 from the first, 2 from the second
    np.testing.assert_array_equal(memorisation.nearest_hamming(generated, training), [3, 2])
