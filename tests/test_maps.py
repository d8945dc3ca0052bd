import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from d2dprompt.maps import gaussian_blur, image_scores, to_image_size


def test_blur_matches_scipy():
    x = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    # torch's 'reflect' padding is scipy's 'mirror'; both truncate at 4 sigma
    ref = np.stack([gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in x])
    assert np.abs(ours - ref).max() < 1e-5


def test_zero_sigma_is_identity_and_upsampling_keeps_constants():
    x = torch.rand(1, 8, 8)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    up = to_image_size(torch.full((1, 8, 8), 0.25), 32, 2.0)
    assert up.shape == (1, 32, 32) and torch.allclose(up, torch.full_like(up, 0.25))


def test_image_score_is_the_max():
    x = torch.zeros(2, 4, 4)
    x[1, 2, 3] = 0.7
    assert image_scores(x, "max", 5.0).tolist() == [0.0, 0.699999988079071]
