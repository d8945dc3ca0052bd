import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from d2dprompt.core.eval.maps import gaussian_blur, image_scores, to_image_size


def test_blur_matches_scipy():
    x = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    # scipy's default 'reflect' repeats the edge sample (torch's own 'reflect' padding is scipy's 'mirror')
    ref = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in x])
    assert np.abs(ours - ref).max() < 1e-5
    for sigma in (0.3, 1.0, 2.5, 12.0):  # the radius rule int(4 sigma + 0.5), and a kernel wider than the map
        ref = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in x[:, :8, :8]])
        assert np.abs(gaussian_blur(torch.from_numpy(x[:, :8, :8].copy()), sigma).numpy() - ref).max() < 1e-5, sigma


def test_zero_sigma_is_identity_and_upsampling_keeps_constants():
    x = torch.rand(1, 8, 8)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    up = to_image_size(torch.full((1, 8, 8), 0.25), 32, 2.0)
    assert up.shape == (1, 32, 32) and torch.allclose(up, torch.full_like(up, 0.25))


def test_image_score_is_the_max():
    x = torch.zeros(2, 4, 4)
    x[1, 2, 3] = 0.7
    assert image_scores(x, "max", 5.0).tolist() == [0.0, 0.699999988079071]
