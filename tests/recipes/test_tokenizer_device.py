"""Random draws of tokenizer training happen on the device of the generator that makes them.

A CUDA op refuses a CPU generator ("Expected a 'cuda' device type for generator"), so
models/tokenizer/quantize.py draws where the generator lives and moves the result to the
data, and recipes/tokenizer/train.py makes its generator on the training device. This
machine has one device, so the CPU tests give quantize.py a stand-in generator that claims
another device and record where torch was asked to draw: a draw made on the data's device
(or on CPU) whatever the generator would be recorded as such and fail the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.tokenizer.artifact import build_model
from models.tokenizer.quantize import VectorQuantizer, kmeans
from recipes.tokenizer.testing import synthetic_items, tiny_config
from recipes.tokenizer.train import TrainConfig, encode_all, train_tokenizer

RANDOM_OPS = ("randn", "randint", "multinomial", "randperm")


class OtherDevice:
    """Stands in for a generator on another device than the data's."""

    device = torch.device("meta")


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    """(op, device asked to draw on) of every draw given an ``OtherDevice``; those draw on CPU instead."""
    real = {name: getattr(torch, name) for name in RANDOM_OPS}
    cpu = torch.Generator().manual_seed(0)
    seen: list[tuple[str, torch.device]] = []

    def spy(name: str):
        def draw(*args, generator=None, device=None, **kwargs):
            if not isinstance(generator, OtherDevice):
                where = {} if device is None else {"device": device}
                return real[name](*args, generator=generator, **where, **kwargs)
            if name == "multinomial":  # the probabilities were moved to the generator's device
                seen.append((name, args[0].device))
                return real["randint"](args[0].shape[0], (args[1],), generator=cpu)
            seen.append((name, torch.device(device) if device is not None else torch.device("cpu")))
            return real[name](*args, generator=cpu, **kwargs)

        return draw

    for name in RANDOM_OPS:
        monkeypatch.setattr(torch, name, spy(name))
    return seen


def test_kmeans_and_dead_code_restarts_draw_on_the_generators_device(draws) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32))
    gen = OtherDevice()
    centres = kmeans(x, 6, generator=gen)  # k-means++ seeding: randint, then multinomial
    few = kmeans(x[:2], 6, generator=gen)  # fewer points than centres: jittered copies (randn)
    vq = VectorQuantizer(6, 5)
    vq.usage.zero_()  # every code dead
    assert vq.restart_dead(x, threshold=0.5, generator=gen) == 6
    assert {name for name, _ in draws} == {"randn", "randint", "multinomial"}
    assert all(where == gen.device for _, where in draws), draws
    for c in (centres, few, vq.codebook.data):
        assert c.device == x.device and c.shape == (6, 5) and bool(torch.isfinite(c).all())


def test_kmeans_without_a_generator_draws_on_the_datas_device(draws) -> None:
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32))
    assert kmeans(x, 4).shape == (4, 4) and not draws  # the global RNG, on x's device


def test_training_hands_the_quantisers_a_generator_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    feats, present, _ = synthetic_items(60, seed=0)
    model = build_model("dst", tiny_config("dst"))
    seen: list[tuple[torch.device, torch.device]] = []
    init = model.init_codebooks

    def recording_init(x, p, generator=None):
        seen.append((generator.device, next(iter(x.values())).device))
        init(x, p, generator)

    monkeypatch.setattr(model, "init_codebooks", recording_init)
    cfg = TrainConfig(epochs=1, batch_size=32, seed=0, device="cpu", progress=False, warmup_steps=1, refit_epochs=1)
    train_tokenizer(model, feats, present, cfg)
    assert seen == [(torch.device(cfg.device), torch.device(cfg.device))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CI has no GPU")
@pytest.mark.parametrize("kind", ["dst", "rqvae"])
def test_tokenizer_trains_on_cuda(kind: str) -> None:
    feats, present, _ = synthetic_items(200, seed=0)
    model = build_model(kind, tiny_config(kind))
    cfg = TrainConfig(epochs=3, batch_size=64, seed=0, device="cuda", progress=False, warmup_steps=2, refit_epochs=2)
    history = train_tokenizer(model, feats, present, cfg)
    assert all(np.isfinite(h.get("loss", h.get("refit_recon", 0.0))) for h in history)
    codes, _ = encode_all(model, feats, present)
    assert codes.shape[0] == 200 and codes.min() >= 0 and codes.max() < 16
    x = torch.randn(50, 8, device="cuda")
    for gen in (torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)):
        assert kmeans(x, 8, generator=gen).device == x.device
