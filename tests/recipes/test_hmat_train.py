"""The HMAT training loop (recipes/ranker/train.py): schedule, learning, checkpoints, resumption."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

from models.hmat.checkpoint import load_checkpoint, load_history, save_checkpoint
from models.hmat.inference import rank_candidates
from models.hmat.losses import pt_loss, sft_loss
from models.hmat.model import HMAT, HMATConfig
from models.hmat.sequence import UserSequence, build_stream
from models.hmat.testing import tiny_config
from recipes.ranker.train import (
    PretokenizedExamples,
    TrainConfig,
    TrainResult,
    epoch_order,
    lr_factor,
    train,
    train_progressive,
)


def synthetic_users(cfg: HMATConfig, n_users: int, seed: int = 0) -> list[UserSequence]:
    """Positive iff the item's first code is in the lower half of codebook 0: learnable at the anchor."""
    g = torch.Generator().manual_seed(seed)
    users = []
    for b in range(n_users):
        n_items = 3 + b % 6
        sids = torch.randint(cfg.codebook_size, (n_items, cfg.n_sid), generator=g)
        actions = (sids[:, 0] < cfg.codebook_size // 2).long()
        users.append(UserSequence(profile=[b % cfg.profile_vocab_size], sids=sids, actions=actions))
    return users


def fast(**changes: object) -> TrainConfig:
    base = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_steps=2, progress=False)
    return dataclasses.replace(base, **changes)


# --- Schedule ---------------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    warmup, total, floor = 4, 20, 0.1
    f = [lr_factor(s, warmup, total, floor) for s in range(total + 3)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(floor + (1 - floor) * 0.5)  # cos(pi / 2) = 0
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert f[total] == pytest.approx(floor) and f[-1] == pytest.approx(floor)  # stays at the floor


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


def test_pretokenized_batches_equal_build_stream() -> None:
    cfg = tiny_config()
    users = synthetic_users(cfg, 9) + [UserSequence(profile=[1, 2])]  # one without history
    data = PretokenizedExamples(users, cfg.layout)
    for index in ([0], [3, 9, 1], [9], list(range(10))):
        got, want = data.batch(index), build_stream([users[i] for i in index], cfg.layout)
        for f in dataclasses.fields(want):
            assert torch.equal(getattr(got, f.name), getattr(want, f.name)), (index, f.name)


def test_train_config_rejects_unknown_stage_and_precision() -> None:
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="rl")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")


# --- Learning ---------------------------------------------------------------------------------


@torch.no_grad()
def _loss_on(model: HMAT, users: list[UserSequence], fn) -> float:
    model.eval()
    return fn(model, build_stream(users, model.config.layout)).item()


@pytest.fixture(scope="module")
def sft_run() -> tuple[float, TrainResult, HMATConfig]:
    """One SFT run shared by the tests below (CPU time is scarce): (held-out loss before, result, config)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = HMAT(cfg)
    before = _loss_on(model, synthetic_users(cfg, 16, seed=2), sft_loss)
    return before, train(model, synthetic_users(cfg, 48, seed=1), fast(epochs=5), device="cpu"), cfg


def test_sft_reduces_held_out_loss(sft_run) -> None:
    before, result, cfg = sft_run
    after = _loss_on(result.model, synthetic_users(cfg, 16, seed=2), sft_loss)
    assert len(result.history) == result.steps == 5 * 3
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert before == pytest.approx(math.log(2.0), abs=0.05) and after < before - 0.15


def test_sft_ranks_by_the_learned_rule(sft_run) -> None:
    _, result, cfg = sft_run
    low, high = torch.tensor([[1, 5, 5]]), torch.tensor([[14, 5, 5]])  # rule: positive iff code 0 < 8
    user = synthetic_users(cfg, 1, seed=3)[0]
    stream = build_stream([dataclasses.replace(user, candidates=torch.cat([low, high]))], cfg.layout)
    p_low, p_high = rank_candidates(result.model, stream)[0].tolist()
    assert p_low > p_high


def test_pt_reduces_held_out_loss() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = HMAT(cfg)
    held_out = synthetic_users(cfg, 16, seed=2)
    before = _loss_on(model, held_out, pt_loss)
    result = train(model, synthetic_users(cfg, 32, seed=1), fast(stage="pt", epochs=8, lr=1e-2), device="cpu")
    # From ln V (4.1); anchors, actions and the code layout are predictable, the codes are not.
    assert _loss_on(result.model, held_out, pt_loss) < before - 0.8


# --- Checkpoints and resumption ---------------------------------------------------------------


def test_resumed_run_continues_bit_for_bit(tmp_path) -> None:
    cfg = tiny_config(dropout=0.1)  # dropout: the RNG state must be restored too
    data = synthetic_users(cfg, 24, seed=1)
    config = fast(epochs=3, batch_size=8, checkpoint_every=2)  # 3 steps per epoch, 9 in all

    torch.manual_seed(0)
    straight = train(HMAT(cfg), data, config, checkpoint_dir=tmp_path / "a", device="cpu")

    torch.manual_seed(0)
    first = train(HMAT(cfg), data, config, checkpoint_dir=tmp_path / "b", device="cpu", stop_at_step=5)
    assert first.steps == 5
    torch.manual_seed(99)  # a different initialisation: everything must come from the checkpoint
    resumed = train(HMAT(cfg), data, config, checkpoint_dir=tmp_path / "b", resume=True, device="cpu")

    assert resumed.steps == straight.steps == 9
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load_history(tmp_path / "b") == resumed.history


def test_resume_refuses_another_stage_or_schedule(tmp_path) -> None:
    cfg = tiny_config()
    data = synthetic_users(cfg, 16)
    train(HMAT(cfg), data, fast(epochs=1), checkpoint_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="sft run"):
        train(HMAT(cfg), data, fast(stage="pt", epochs=1), checkpoint_dir=tmp_path, resume=True, device="cpu")
    with pytest.raises(ValueError, match="epochs"):
        train(HMAT(cfg), data, fast(epochs=2), checkpoint_dir=tmp_path, resume=True, device="cpu")


def test_checkpoint_round_trip_keeps_scores_config_and_tied_head(tmp_path) -> None:
    cfg = tiny_config(rope="rope1d")
    torch.manual_seed(0)
    model = HMAT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_checkpoint(tmp_path, model, tokenizer_version="dst-abc", meta={"variant": "hmat-rope1d"})
    loaded, saved = load_checkpoint(tmp_path)
    assert saved["tokenizer_version"] == "dst-abc" and saved["variant"] == "hmat-rope1d"
    assert loaded.config == cfg
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    stream = build_stream(
        [dataclasses.replace(u, candidates=torch.randint(16, (3, 3))) for u in synthetic_users(cfg, 3)], cfg.layout
    )
    assert torch.equal(rank_candidates(model, stream), rank_candidates(loaded, stream))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model"]["rope"] == "rope1d"


def test_progressive_pt_then_sft_writes_both_stages(tmp_path) -> None:
    cfg = tiny_config()
    data = synthetic_users(cfg, 16)
    pt, sft = train_progressive(
        HMAT(cfg), data, fast(stage="pt", epochs=1), fast(epochs=1), out_dir=tmp_path, device="cpu"
    )
    assert {r["stage"] for r in pt.history} == {"pt"} and {r["stage"] for r in sft.history} == {"sft"}
    for sub, stage in (("pretrain", "pt"), ("finetune", "sft")):
        assert json.loads((tmp_path / sub / "config.json").read_text())["stage"] == stage
    # SFT started from the PT weights: its first step's loss is that of the PT model.
    assert sft.model is pt.model
