"""Known answers of the per-metric helpers not covered in tests/test_score_report.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from charaforge.config import ClipConfig
from charaforge.evaluate import memorisation
from charaforge.evaluate.context import context_tags, score_context
from charaforge.evaluate.tags import defining_tags, prompt_tags
from charaforge.models.clip import load_clip


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


def test_context_tags_leave_out_the_trigger_and_the_character() -> None:
    defining = {"1girl", "pink hair", "hat"}
    prompt = "momo_cf, 1girl, Pink Hair, beach background, sitting"
    assert context_tags(prompt, "momo_cf", defining) == ["beach background", "sitting"]
    assert context_tags("momo_cf, 1girl, hat", "momo_cf", defining) == []


def test_context_alignment_is_the_mean_zero_shot_probability_of_the_context_tags() -> None:
    """Expected values from the CLIP embeddings by hand (sigmoid of the logit-scaled cosine
    margin over "a picture"), not from the zero-shot tagger the scorer uses."""
    embedder = load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    image_embeddings = embedder.embed_images(images)
    index = pd.DataFrame(
        {
            "prompt": [
                "t, 1girl, beach background",
                "t, 1girl, snow background, sitting",
                "t, 1girl",
            ]
        }
    )
    train = pd.DataFrame({"tags": [["1girl", "beach background"], ["1girl", "snow background"]]})
    scores = score_context(index, train, 0.8, embedder, image_embeddings, "t", batch_size=4)
    values = scores.columns["context_alignment"]

    texts = embedder.embed_texts(
        ["a picture of beach background", "a picture of snow background", "a picture of sitting"]
        + ["a picture"]
    )
    scale = float(embedder.model.logit_scale.exp())

    def probability(row: int, tag: int) -> float:
        margin = image_embeddings[row] @ texts[tag] - image_embeddings[row] @ texts[3]
        return float(1 / (1 + np.exp(-scale * margin)))

    assert values[0] == pytest.approx(probability(0, 0), abs=1e-6)
    assert values[1] == pytest.approx((probability(1, 1) + probability(1, 2)) / 2, abs=1e-6)
    assert np.isnan(values[2])  # nothing asked beside the character
    assert scores.records["context_alignment"]["context_tags"] == [
        "beach background",
        "sitting",
        "snow background",
    ]
