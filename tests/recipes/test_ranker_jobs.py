"""``hisam ranker pretrain|finetune|eval`` end to end on the toy dataset, through the real CLI parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data import Dataset
from features.profiles import ProfileVocab
from hisam import cli
from models.tokenizer import FrozenTokenizer
from recipes.ranker import load_inputs, model_config, semantic_codes


@pytest.fixture
def hisam_cli():
    """The real ``hisam`` entry point."""
    return cli.main


def test_semantic_codes_are_local_and_collision_free(toy: Dataset, toy_tokenizer: FrozenTokenizer) -> None:
    codes = semantic_codes(toy, toy_tokenizer)
    assert codes.shape == (toy.n_items, toy_tokenizer.n_codes)
    assert codes.min() >= 0 and codes.max() < toy_tokenizer.codebook_size
    assert len({tuple(r) for r in codes.tolist()}) == toy.n_items


def test_model_config_takes_vocabulary_from_the_data(toy: Dataset, toy_tokenizer_dir: Path) -> None:
    inputs = load_inputs(toy, "hmat", toy_tokenizer_dir)
    cfg = model_config("cpu", "hmat", inputs, max_items=7)
    assert (cfg.n_sid, cfg.codebook_size, cfg.max_items) == (6, 16, 7)
    assert cfg.profile_vocab_size == ProfileVocab.fit(toy.users).size and cfg.max_profile_len == 3
    assert model_config("cpu", "id", load_inputs(toy, "id", None), 7).codebook_size == toy.n_items
    with pytest.raises(ValueError, match="tokenizer"):
        load_inputs(toy, "flat", None)


def test_pretrain_finetune_eval_write_the_report(
    hisam_cli, toy_dir: Path, toy_tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    common = ["--dataset", str(toy_dir), "--tokenizer", str(toy_tokenizer_dir), "--out", str(out), "--no-progress"]
    train = [
        "--variant",
        "hmat",
        "id",
        "--seeds",
        "0",
        "1",
        "--max-items",
        "6",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--warmup-steps",
        "2",
    ]
    assert hisam_cli(["ranker", "pretrain", *common, *train]) == 0
    assert hisam_cli(["ranker", "finetune", *common, *train, "--init", "pretrain"]) == 0
    assert hisam_cli(["ranker", "eval", *common]) == 0

    saved = json.loads((out / "hmat" / "seed1" / "finetune" / "config.json").read_text())
    assert saved["stage"] == "sft" and saved["init"].endswith("pretrain") and saved["model"]["max_items"] == 6
    assert saved["tokenizer_version"] == FrozenTokenizer.load(toy_tokenizer_dir).version

    report = (out / "report" / "report.md").read_text()
    assert "| Method | Seeds | AUC | GAUC | Cold-user AUC | Cold-user GAUC | Cold-item AUC |" in report
    assert report.count("± ") >= 2 * 5  # two rows, five metrics, each a mean ± std over two seeds
    for name in ("curves_pt.png", "curves_sft.png"):
        assert (out / "report" / name).stat().st_size > 1000
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"hmat", "id"}
    for runs in metrics["results"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(0.0 <= r["auc"] <= 1.0 and r["rows"] > 0 for r in runs)

    # The one-pass scorer (one stream per row, the definition) computes the same scores as the default
    # grouped one (to 1e-5, test_hmat_train_evaluate.py), so the same metrics; the tolerance allows
    # one near-tie pair to flip order on another BLAS.
    assert hisam_cli(["ranker", "eval", *common, "--scorer", "one-pass", "--report-dir", str(out / "per-row")]) == 0
    per_row = json.loads((out / "per-row" / "metrics.json").read_text())["results"]
    for variant, runs in metrics["results"].items():
        for a, b in zip(runs, per_row[variant], strict=True):
            assert a["auc"] == pytest.approx(b["auc"], abs=0.01) and a["gauc"] == pytest.approx(b["gauc"], abs=0.01)


def test_finetune_from_a_missing_pretrain_fails_cleanly(hisam_cli, toy_dir: Path, tmp_path: Path) -> None:
    argv = [
        "ranker",
        "finetune",
        "--dataset",
        str(toy_dir),
        "--variant",
        "id",
        "--out",
        str(tmp_path),
        "--init",
        "pretrain",
        "--no-progress",
    ]
    assert hisam_cli(argv) == 1
    no_tokenizer = ["ranker", "finetune", "--dataset", str(toy_dir), "--variant", "hmat", "--out", str(tmp_path)]
    assert hisam_cli([*no_tokenizer, "--no-progress"]) == 1
    assert hisam_cli(["ranker", "eval", "--dataset", str(toy_dir), "--out", str(tmp_path), "--no-progress"]) == 1
    assert not np.any([p.name == "finetune" for p in tmp_path.rglob("*")])


def test_eval_adds_runs_trained_on_another_tokenizer(
    hisam_cli, toy_dir: Path, toy_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Table 4's 'HMAT on RQ-VAE IDs': ``--also OUT=TOKENIZER`` rows beside the main runs, by tokenizer kind."""
    from recipes.tokenizer.testing import TINY_MODALITIES, tiny_tokenizer

    rq_dir = tmp_path / "rqvae_tok"
    tiny_tokenizer(rq_dir, kind="rqvae", modalities=TINY_MODALITIES, n_items=200, epochs=4)  # one thread: autouse
    train = ["--variant", "hmat", "--seeds", "0", "--max-items", "6", "--epochs", "1", "--batch-size", "16"]
    for out, tok in ((tmp_path / "main", toy_tokenizer_dir), (tmp_path / "rq", rq_dir)):
        common = ["--dataset", str(toy_dir), "--tokenizer", str(tok), "--out", str(out), "--no-progress"]
        assert hisam_cli(["ranker", "finetune", *common, *train, "--warmup-steps", "2"]) == 0
    base = ["ranker", "eval", "--dataset", str(toy_dir), "--tokenizer", str(toy_tokenizer_dir), "--no-progress"]
    base += ["--out", str(tmp_path / "main")]
    assert hisam_cli([*base, "--also", f"{tmp_path / 'rq'}={rq_dir}"]) == 0
    metrics = json.loads((tmp_path / "main" / "report" / "metrics.json").read_text())
    assert list(metrics["results"]) == ["hmat", "hmat@rqvae"]
    assert "HMAT (H-RoPE + MA-Attn) on RQ-VAE IDs" in (tmp_path / "main" / "report" / "report.md").read_text()
    # The runs under --also were trained on RQ-VAE codes: pairing them with the DST tokenizer is refused.
    assert hisam_cli([*base, "--also", f"{tmp_path / 'rq'}={toy_tokenizer_dir}"]) == 1
    assert hisam_cli([*base, "--also", "no-equals-sign"]) == 1
