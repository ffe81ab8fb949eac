"""Training, determinism, artifacts and the frozen encode API of the three tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.tokenizer import FrozenTokenizer, TokenizerInputError, build_model, collision_rate, save_tokenizer
from recipes.tokenizer.metrics import utilisation
from recipes.tokenizer.testing import TINY_MODALITIES, synthetic_items, tiny_config, tiny_tokenizer
from recipes.tokenizer.train import TrainConfig, encode_all, to_tensors, train_tokenizer

LR = {"dst": 3e-3, "macrec": 1e-3, "rqvae": 1e-3}


def _train(kind: str, epochs: int = 8, seed: int = 0, **overrides):
    feats, present, _ = synthetic_items(300, missing_rate=0.1)
    torch.manual_seed(seed)  # model initialisation
    model = build_model(kind, tiny_config(kind) | overrides)
    cfg = TrainConfig(epochs=epochs, batch_size=100, seed=seed, progress=False, warmup_steps=3, lr=LR[kind])
    hist = train_tokenizer(model, feats, present, cfg)
    return model, hist, feats, present


@pytest.mark.parametrize("kind", ["dst", "macrec", "rqvae"])
def test_tiny_training_run_loss_falls_and_codes_have_equal_length(kind):
    model, hist, feats, present = _train(kind, epochs=20)
    main = [h for h in hist if "loss" in h]
    assert main[-1]["loss"] < 0.85 * main[0]["loss"]
    refit = [h["refit_recon"] for h in hist if "refit_recon" in h]
    assert len(refit) == TrainConfig.refit_epochs and refit[-1] < refit[0]  # decoders adapt to refitted codes
    codes, dist = encode_all(model, feats, present)
    assert min(utilisation(codes, 16)) >= 0.9  # the final k-means refit keeps every layer in use
    assert codes.shape == (300, 6)  # equal code length across tokenizers
    assert dist.shape == (300, 16)
    assert codes.min() >= 0 and codes.max() < 16


@pytest.mark.parametrize("kind", ["dst", "macrec", "rqvae"])
def test_inference_encode_equals_training_forward(kind):
    model, _, feats, present = _train(kind, epochs=2)
    x, p = to_tensors(feats, present)
    model.eval()
    with torch.no_grad():
        step = model(x, p)
        codes, dist = model.encode(x, p)
    torch.testing.assert_close(codes, step.codes, rtol=0, atol=0)
    torch.testing.assert_close(dist, step.last_distances, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic():
    a, _, feats, present = _train("dst", epochs=3, seed=7)
    b, _, _, _ = _train("dst", epochs=3, seed=7)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(ta, tb, msg=name)
    np.testing.assert_array_equal(encode_all(a, feats, present)[0], encode_all(b, feats, present)[0])


def test_dst_without_mi_term_skips_vclub():
    _, hist, _, _ = _train("dst", epochs=2, lambda_mi=0.0)
    assert all(h["mi"] == 0.0 for h in hist if "mi" in h)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> FrozenTokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), epochs=6)


def test_save_load_round_trip_keeps_codes_and_version(tmp_path):
    model, _, feats, present = _train("dst", epochs=2)
    version = save_tokenizer(model, tmp_path)
    tok = FrozenTokenizer.load(tmp_path)
    assert tok.version == version and version.startswith("dst-")
    codes, _ = encode_all(model, feats, present)
    np.testing.assert_array_equal(tok.encode_batch(feats, present), codes + tok.token_offsets)
    assert save_tokenizer(model, tmp_path / "again") == version  # same weights, same version
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["code_length"] == 6 and meta["kind"] == "dst"


def test_tampered_artifact_is_refused(tmp_path):
    model, _, _, _ = _train("rqvae", epochs=1)
    save_tokenizer(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["beta"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version"):
        FrozenTokenizer.load(tmp_path)


def test_single_and_batched_encode_agree_and_are_deterministic(frozen):
    feats, present, _ = synthetic_items(20, seed=3)
    batch = frozen.encode_batch(feats, present)
    for i in range(20):
        single = frozen.encode({m: feats[m][i] for m in feats})
        np.testing.assert_array_equal(single, batch[i])
    np.testing.assert_array_equal(frozen.encode_batch(feats, present), batch)
    # Global token ids: layer l lives in [l*K, (l+1)*K), vocabularies never overlap.
    k = frozen.codebook_size
    for l in range(frozen.n_codes):
        assert ((batch[:, l] >= l * k) & (batch[:, l] < (l + 1) * k)).all()
    assert frozen.vocab_size == 6 * k


def test_encode_batch_resolves_collisions_against_taken(frozen):
    feats, _, _ = synthetic_items(5, seed=4)
    row = {m: np.repeat(feats[m][:1], 3, axis=0) for m in feats}  # three identical items
    natural = frozen.encode_batch(row)
    assert collision_rate(natural) == 1.0
    resolved = frozen.encode_batch(row, taken=[tuple(natural[0])])
    assert collision_rate(resolved) == 0.0
    assert tuple(natural[0]) not in set(map(tuple, resolved))
    np.testing.assert_array_equal(resolved[:, :-1], natural[:, :-1])  # only the last code moves


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda f: f.update(text=np.zeros(5, np.float32)), "text", "expected width 24, got 5"),
        (lambda f: f["behaviour"].__setitem__(3, np.nan), "behaviour", "non-finite"),
        (lambda f: f["metadata"].__setitem__(0, np.inf), "metadata", "non-finite"),
        (lambda f: f.update(image=np.zeros(3, np.float32)), "image", "unknown modality"),
        (lambda f: f.update(text=np.zeros((2, 24), np.float32)), "text", "expected a vector"),
        (lambda f: f.update(text=None, behaviour=None, metadata=None), "*", "no modality"),
    ],
)
def test_bad_input_gets_a_clear_error_naming_the_field(frozen, mutate, field, message):
    feats = {m: np.ones(w, np.float32) for m, w in TINY_MODALITIES.items()}
    mutate(feats)
    with pytest.raises(TokenizerInputError, match=message) as err:
        frozen.encode(feats)
    assert err.value.field == field


def test_batch_errors_name_field_and_row(frozen):
    feats, present, _ = synthetic_items(4, seed=5)
    feats["text"][2, 7] = np.nan
    with pytest.raises(TokenizerInputError, match="row 2, index 7"):
        frozen.encode_batch(feats, present)
    feats, present, _ = synthetic_items(4, seed=5)
    feats["metadata"] = feats["metadata"][:3]
    with pytest.raises(TokenizerInputError, match="batch of 3 rows"):
        frozen.encode_batch(feats, present)


def test_missing_modality_uses_documented_fallback(frozen, tmp_path):
    feats = {m: np.ones(w, np.float32) for m, w in TINY_MODALITIES.items()}
    full = frozen.encode(feats)
    tokens = frozen.encode({"text": feats["text"], "behaviour": None, "metadata": feats["metadata"]})
    assert tokens.shape == (6,) and tokens.dtype == np.int64
    # Imputation changes the input, so codes may differ; the shared prefix uses the same text.
    assert full.shape == tokens.shape
    # NaN in a modality marked absent is not an error: absent rows are never read.
    batch, present, _ = synthetic_items(3, seed=6)
    batch["behaviour"][1] = np.nan
    present["behaviour"][1] = False
    assert frozen.encode_batch(batch, present).shape == (3, 6)
    # A tokenizer configured to refuse missing modalities says so.
    strict = build_model("dst", tiny_config("dst") | {"missing": "error"})
    f2, p2, _ = synthetic_items(50)
    train_tokenizer(strict, f2, p2, TrainConfig(epochs=1, batch_size=50, progress=False, warmup_steps=1))
    save_tokenizer(strict, tmp_path)
    with pytest.raises(TokenizerInputError, match="missing") as err:
        FrozenTokenizer.load(tmp_path).encode({"text": feats["text"], "behaviour": None, "metadata": feats["metadata"]})
    assert err.value.field == "behaviour"
