import math

import pytest
import torch

from d2dprompt.core.eval.maps import top_mean as image_score

from d2dprompt.methods.d2dprompt.loss import (
    consistency_loss,
    coverage_loss,
    dice_loss,
    focal_loss,
    image_loss,
    shard_loss,
    sharpness_loss,
    total_loss,
)


def _mask():
    m = torch.zeros(2, 8, 8)
    m[0, 2:5, 2:5] = 1
    return m


def test_focal_is_small_for_a_perfect_map_and_large_for_an_inverted_one():
    m = _mask()
    assert focal_loss(m, m, 2.0) < 1e-4
    assert focal_loss(1 - m, m, 2.0) > 1.0


def test_focal_reduces_to_cross_entropy_at_gamma_zero():
    p, m = torch.full((1, 2, 2), 0.8), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = -(math.log(0.8) + 3 * math.log(0.2)) / 4
    assert focal_loss(p, m, gamma=0.0).item() == pytest.approx(expected, rel=1e-5)


def test_dice_perfect_and_worst():
    m = _mask()
    assert dice_loss(m, m).item() == pytest.approx(0.0, abs=1e-5)
    # fully wrong: abnormal map everywhere the mask is not -> both dice terms are 1 where defined
    assert dice_loss(1 - m, m).item() > 1.5


def test_image_score_is_top_percent_mean_and_loss_orders():
    p = torch.zeros(1, 10, 10)
    p[0, 0, 0] = 1.0
    assert image_score(p, 1.0).item() == pytest.approx(1.0)  # 1 % of 100 pixels = 1 pixel
    assert image_score(p, 2.0).item() == pytest.approx(0.5)  # 2 % = 2 pixels
    hi, lo = torch.full((1, 10, 10), 0.9), torch.full((1, 10, 10), 0.1)
    assert image_loss(hi, torch.tensor([1.0]), 1.0) < image_loss(lo, torch.tensor([1.0]), 1.0)


def test_sharpness_is_one_at_half_and_zero_when_decided():
    assert sharpness_loss(torch.full((1, 4, 4), 0.5)).item() == pytest.approx(1.0, abs=1e-5)
    assert sharpness_loss(torch.tensor([[[0.0, 1.0]]])).item() < 1e-3


def test_coverage_counts_mass_outside_the_defect_of_anomalous_images_only():
    m = _mask()
    mass = m.clone()
    labels = torch.tensor([1.0, 0.0])
    assert coverage_loss(mass, m, labels).item() == pytest.approx(0.0, abs=1e-5)
    assert coverage_loss(1 - m, m, labels).item() == pytest.approx(1.0, abs=1e-5)
    assert coverage_loss(mass, m, torch.zeros(2)).item() == 0.0


def test_consistency_is_zero_for_agreeing_levels():
    same = torch.rand(2, 1, 4, 4).expand(2, 3, 4, 4)
    assert consistency_loss(same).item() == pytest.approx(0.0)
    assert consistency_loss(torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])[None]).item() == pytest.approx(0.25)


def test_total_loss_skips_zero_weights_and_rejects_unknown_terms():
    m = _mask()
    p = torch.full_like(m, 0.3, requires_grad=True)
    maps = {"anomaly": p, "abnormal_mass": p, "anomaly_levels": p[:, None]}
    labels = torch.tensor([1.0, 0.0])
    loss, values = total_loss(maps, m, labels, {"focal": 1.0, "dice": 0.0, "sharpness": 2.0}, 2.0, 1.0)
    assert set(values) == {"focal", "sharpness"}
    assert loss.item() == pytest.approx(values["focal"] + 2 * values["sharpness"], rel=1e-5)
    loss.backward()
    assert p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss terms"):
        total_loss(maps, m, labels, {"edges": 1.0}, 2.0, 1.0)


def test_a_constant_score_costs_log2_whatever_the_class_ratio():
    """Balanced: the image term cannot fall by raising every score towards the share of anomalies."""
    labels = torch.tensor([1.0, 1.0, 0.0])  # 2 synthetic anomalies per normal image, as the default
    for level in (0.3, 0.5, 2 / 3):
        p = torch.full((3, 10, 10), level)
        expected = 0.5 * (-torch.log(torch.tensor(level)) - torch.log(torch.tensor(1 - level)))
        assert image_loss(p, labels, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert image_loss(torch.full((3, 10, 10), 0.5), labels, 1.0).item() == pytest.approx(0.6931, abs=1e-4)


def test_the_image_term_alone_falls_by_separating_the_classes():
    torch.manual_seed(0)
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    logits = torch.zeros(6, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    history = []
    for _ in range(100):
        loss = image_loss(torch.sigmoid(logits), labels, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(b <= a + 1e-7 for a, b in zip(history, history[1:]))
    assert history[-1] < 0.3  # far below the prior-only optimum (log 2 balanced, 0.64 unbalanced)
    s = image_score(torch.sigmoid(logits), 1.0)
    assert s[labels == 1].min() > s[labels == 0].max()


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 1, 0], [1] * 7, [0] * 7])
@pytest.mark.parametrize("cuts", [(0, 7), (0, 4, 7), (0, 0, 7), (0, 1, 2, 3, 7)])
def test_shares_of_a_split_batch_add_up_to_the_batch_loss(labels, cuts):
    """Data-parallel training: each process's shard_loss of its rows (an empty shard too) sums to total_loss."""
    gen = torch.Generator().manual_seed(0)
    maps = {"anomaly": torch.rand(7, 8, 8, generator=gen), "abnormal_mass": torch.rand(7, 8, 8, generator=gen),
            "anomaly_levels": torch.rand(7, 2, 8, 8, generator=gen)}
    mask, labels = (torch.rand(7, 8, 8, generator=gen) > 0.7).float(), torch.tensor(labels, dtype=torch.float32)
    weights = {"focal": 1.0, "dice": 0.5, "image": 2.0, "sharpness": 0.3, "coverage": 0.7, "consistency": 1.5}
    whole, terms = total_loss(maps, mask, labels, weights, 2.0, 1.0)
    shares = [shard_loss({k: v[a:b] for k, v in maps.items()}, mask[a:b], labels[a:b], weights, 2.0, 1.0, labels) for a, b in zip(cuts, cuts[1:])]
    assert sum(float(loss) for loss, _ in shares) == pytest.approx(float(whole), rel=1e-6, abs=1e-6)
    for name, value in terms.items():
        assert sum(share[name] for _, share in shares) == pytest.approx(value, rel=1e-6, abs=1e-6), name
