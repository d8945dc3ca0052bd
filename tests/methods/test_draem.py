"""DRAEM's torch model: loss terms against hand values, map and score on toy outputs, the schedule, and learning."""

from __future__ import annotations

import math

import pytest
import torch

from d2dprompt.core.losses import focal_loss
from d2dprompt.methods.draem.model import Draem, anomaly_map, draem_loss, image_score, step_schedule


def test_focal_loss_matches_a_hand_computation():
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).reshape(1, 2, 1, 2)  # two pixels: (normal, anomalous) probabilities
    mask = torch.tensor([[[0.0, 1.0]]])
    smooth = 1e-5
    pt = [0.9 * (1 - smooth) + 0.1 * smooth + smooth, 0.2 * smooth + 0.8 * (1 - smooth) + smooth]
    expected = sum(-((1 - p) ** 2) * math.log(p) for p in pt) / 2
    assert focal_loss(probs, mask).item() == pytest.approx(expected, rel=1e-6)


def test_loss_terms_vanish_for_a_perfect_output_and_l2_is_the_mean_square():
    clean = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 32, 32)
    mask[:, 4:8, 4:8] = 1
    logits = torch.stack([(1 - mask) * 20, mask * 20], dim=1)  # softmax ~ the mask itself
    _, perfect = draem_loss({"reconstruction": clean, "mask_logits": logits}, clean, mask)
    assert perfect["l2"] == 0 and perfect["ssim"] == pytest.approx(0, abs=1e-6) and perfect["focal"] < 1e-6
    shifted = clean + 0.1
    _, off = draem_loss({"reconstruction": shifted, "mask_logits": logits}, clean, mask)
    assert off["l2"] == pytest.approx(0.01, rel=1e-4) and off["ssim"] > 0


def test_map_is_the_anomalous_probability_and_the_score_prefers_a_blob_to_a_hot_pixel():
    logits = torch.zeros(2, 2, 64, 64)
    logits[0, 1, 30, 30] = 50.0  # one hot pixel
    logits[1, 1, 20:41, 20:41] = 1.0  # a 21x21 blob of probability sigmoid(1)
    maps = anomaly_map({"mask_logits": logits})
    assert maps[0, 30, 30].item() == pytest.approx(1.0) and maps[0, 0, 0].item() == pytest.approx(0.5)
    scores = image_score(maps)
    assert scores[0].item() == pytest.approx((1.0 + 440 * 0.5) / 441, rel=1e-5)  # the 21x21 window around the pixel
    assert scores[1].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), rel=1e-5)
    assert scores[1] > scores[0]


@pytest.mark.parametrize("epochs, milestones", [(10, [8, 9]), (700, [560, 630])])
def test_the_learning_rate_drops_at_80_and_90_percent(epochs, milestones):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = step_schedule(optimizer, epochs)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [e for e in range(1, epochs) if rates[e] < rates[e - 1]] == milestones
    assert rates[-1] == pytest.approx(1e-4 * 0.04)


def test_gradients_reach_both_subnetworks_and_odd_sizes_are_refused():
    torch.manual_seed(0)
    model = Draem(4, 4)
    images = torch.rand(2, 3, 32, 32)
    loss, _ = draem_loss(model(images), images, torch.zeros(2, 32, 32))
    loss.backward()
    for part in (model.reconstructive, model.discriminative):
        assert all(p.grad is not None for p in part.parameters())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 48, 40))


def test_a_tiny_draem_learns_to_segment_square_anomalies():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    clean = 0.5 + 0.05 * torch.randn(6, 3, 32, 32, generator=gen)
    masks = torch.zeros(6, 32, 32)
    for i in range(6):
        y, x = torch.randint(0, 24, (2,), generator=gen).tolist()
        masks[i, y : y + 8, x : x + 8] = 1
    augmented = torch.where(masks[:, None] > 0, torch.rand(6, 3, 32, 32, generator=gen), clean)
    model = Draem(4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss, _ = draem_loss(model(augmented), clean, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        maps = anomaly_map(model(augmented))
    assert roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy()) > 0.9
