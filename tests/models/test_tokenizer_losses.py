"""Each tokenizer loss against a hand-computed small case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.tokenizer.losses import gram_alignment_loss, gram_volume, info_nce, pairwise_anchor_volumes, small_det
from models.tokenizer.quantize import ResidualQuantizer, VectorQuantizer, kmeans
from recipes.tokenizer.metrics import estimate_mi


def test_gram_volume_of_known_vectors():
    e = torch.eye(3)
    assert gram_volume(e).item() == pytest.approx(1.0, abs=1e-4)  # unit cube
    same = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    assert gram_volume(same).item() == pytest.approx(0.0, abs=1e-3)  # degenerate
    theta = 0.3
    two = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    assert gram_volume(two).item() == pytest.approx(math.sin(theta), abs=1e-4)  # parallelogram area


def test_small_det_matches_lu():
    g = torch.randn(50, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(small_det(g), torch.linalg.det(g))
    g4 = torch.randn(5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(small_det(g4), torch.linalg.det(g4))


def test_pairwise_volumes_match_direct_volumes():
    b, d = 5, 8
    anchor = F.normalize(torch.randn(b, d), dim=-1)
    data = F.normalize(torch.randn(b, 2, d), dim=-1)
    v = pairwise_anchor_volumes(anchor, data)
    for i in range(b):
        for j in range(b):
            direct = gram_volume(torch.cat([anchor[i : i + 1], data[j]], 0))
            assert v[i, j].item() == pytest.approx(direct.item(), abs=1e-5)


def test_gram_alignment_prefers_aligned_items():
    b, d = 16, 32
    base = F.normalize(torch.randn(b, d), dim=-1)
    aligned = F.normalize(base.unsqueeze(1) + 0.05 * torch.randn(b, 2, d), dim=-1)
    shuffled = aligned[torch.randperm(b)]
    assert gram_alignment_loss(base, aligned, 0.1) < gram_alignment_loss(base, shuffled, 0.1)


def test_info_nce_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.eye(2, dtype=torch.bool)
    # cos sims: diag 1, off 0; loss = -log(e^{1/t} / (e^{1/t} + 1)) per row.
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
    assert info_nce(q, q, pos, t).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(q, q, torch.zeros(2, 2, dtype=torch.bool), t).item() == 0.0


def test_vclub_separates_independent_from_dependent_gaussians():
    n = 1000
    x = torch.randn(n, 4)
    independent = estimate_mi(x, torch.randn(n, 4), steps=200, lr=3e-3)
    dependent = estimate_mi(x, x + 0.1 * torch.randn(n, 4), steps=200, lr=3e-3)
    assert abs(independent) < 0.2
    # True MI of y = x + N(0, 0.01) per dim is 0.5*log(1 + 100) ~ 2.3 nats; 4 dims ~ 9.2.
    assert dependent > 4.0


def test_rq_residual_identity():
    torch.manual_seed(0)
    rq = ResidualQuantizer(3, 8, 4)
    z = torch.randn(32, 4)
    rq.init_from(z)
    out = rq(z)
    codes, total, residual, _ = rq.assign(z)
    recon = sum(vq.codebook[codes[:, l]] for l, vq in enumerate(rq.layers))
    torch.testing.assert_close(recon + residual, z)  # z = sum_l C_l[c_l] + r_L exactly
    torch.testing.assert_close(out.residual, residual)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.quantized, total)  # straight-through forward value


def test_vq_commitment_loss_hand_case():
    vq = VectorQuantizer(2, 1, beta=0.25)
    vq.codebook.data = torch.tensor([[0.0], [10.0]])
    out = vq(torch.tensor([[1.0], [9.0]]))
    assert out.codes.tolist() == [0, 1]
    assert out.loss.item() == pytest.approx(1.0 + 0.25 * 1.0)  # ||sg r - e||^2 + beta ||r - sg e||^2


def test_straight_through_gradient():
    vq = VectorQuantizer(4, 3)
    x = torch.randn(5, 3, requires_grad=True)
    vq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found = kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(centres, found).min(1).values
    assert (dist < 0.2).all()


def test_dead_code_restart_moves_unused_codes_onto_data():
    vq = VectorQuantizer(4, 2)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [-100.0, 100.0]])
    x = torch.randn(64, 2) * 0.5
    vq.train()
    for _ in range(500):
        vq(x)
    assert vq.restart_dead(x, threshold=0.05) == 2
    codes, _ = vq.assign(x)
    assert len(np.unique(codes.numpy())) >= 3
