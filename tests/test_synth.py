"""Tests for d2dprompt.core.data.synth: Perlin noise and masks, textures, DRAEM blending."""

from __future__ import annotations

import numpy as np
import pytest

from d2dprompt.core.data import synth


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _striped_image(h: int = 96, w: int = 80) -> np.ndarray:
    image = np.full((h, w, 3), 140, np.uint8)
    image[::6] = 60
    image[:, ::9, 1] = 220
    return image


@pytest.mark.parametrize(
    "shape, res", [((64, 64), (4, 4)), ((97, 131), (5, 7)), ((10, 33), (32, 1)), ((1, 17), (1, 2))]
)
def test_perlin_noise_is_finite_bounded_and_varies(shape, res):
    noise = synth.perlin_noise(shape, res, _rng(3))
    assert noise.shape == shape and noise.dtype == np.float32
    assert np.isfinite(noise).all()
    assert np.abs(noise).max() <= 1.0 + 1e-5
    assert noise.std() > 1e-3


def test_perlin_noise_spans_most_of_its_range_over_seeds():
    values = np.concatenate([synth.perlin_noise((48, 48), (3, 3), _rng(s)).ravel() for s in range(50)])
    assert values.min() < -0.6 and values.max() > 0.6


def test_perlin_noise_is_smooth_at_lattice_scale():
    # neighbouring pixels inside a 32-pixel cell differ far less than the value range
    noise = synth.perlin_noise((128, 128), (4, 4), _rng(0))
    assert np.abs(np.diff(noise, axis=0)).max() < 0.15
    assert np.abs(np.diff(noise, axis=1)).max() < 0.15


def test_perlin_noise_rejects_bad_shape():
    with pytest.raises(ValueError, match="^res_hw"):
        synth.perlin_noise((8, 8), (0, 2), _rng(0))


@pytest.mark.parametrize("shape", [(64, 64), (37, 91), (5, 7)])
def test_perlin_mask_is_bool_nonempty_and_shaped(shape):
    for seed in range(30):
        mask = synth.perlin_mask(shape, _rng(seed))
        assert mask.dtype == bool and mask.shape == shape
        assert mask.any()


def test_perlin_mask_falls_back_to_ellipse_when_threshold_unreachable():
    mask = synth.perlin_mask((40, 50), _rng(0), threshold=2.0)
    assert mask.any() and mask.dtype == bool and mask.shape == (40, 50)


def test_perlin_mask_deterministic_per_seed():
    assert np.array_equal(synth.perlin_mask((64, 64), _rng(5)), synth.perlin_mask((64, 64), _rng(5)))
    reference = synth.perlin_mask((64, 64), _rng(5))
    assert all(not np.array_equal(reference, synth.perlin_mask((64, 64), _rng(s))) for s in range(6, 10))


def test_procedural_textures_are_rgb_and_vary_across_seeds():
    textures = [synth.procedural_texture((48, 56), _rng(s)) for s in range(12)]
    for texture in textures:
        assert texture.dtype == np.uint8 and texture.shape == (48, 56, 3)
        assert texture.std() > 1.0
    means = np.array([t.reshape(-1, 3).mean(axis=0) for t in textures])
    assert np.ptp(means, axis=0).min() > 20  # different colours, not one palette
    assert np.array_equal(synth.procedural_texture((48, 56), _rng(4)), textures[4])


def test_augment_texture_keeps_shape_and_changes_pixels():
    texture = synth.procedural_texture((40, 40), _rng(1))
    outputs = [synth.augment_texture(texture, _rng(s)) for s in range(10)]
    for out in outputs:
        assert out.dtype == np.uint8 and out.shape == texture.shape
    assert sum(not np.array_equal(out, texture) for out in outputs) >= 9
    assert np.array_equal(synth.augment_texture(texture, _rng(3)), outputs[3])


def test_augment_texture_rejects_float_input():
    with pytest.raises(ValueError, match="^texture"):
        synth.augment_texture(np.zeros((8, 8, 3), np.float32), _rng(0))


DRAEM = {"beta_range": (0.0, 0.8), "scale_max": 6, "threshold": 0.5}  # DRAEM's defaults


def test_synthesize_is_deterministic_per_seed_and_differs_across_seeds():
    image, texture = _striped_image(), synth.procedural_texture((50, 70), _rng(9))
    out_a, mask_a = synth.synthesize_anomaly(image, texture, _rng(11), **DRAEM)
    out_b, mask_b = synth.synthesize_anomaly(image, texture, _rng(11), **DRAEM)
    out_c, mask_c = synth.synthesize_anomaly(image, texture, _rng(12), **DRAEM)
    assert np.array_equal(out_a, out_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)
    assert not np.array_equal(out_a, out_c)


@pytest.mark.parametrize("seed", range(8))
def test_synthesize_changes_only_inside_mask(seed):
    image = _striped_image(61, 83)  # sizes no power of two divides
    texture = synth.procedural_texture((33, 150), _rng(100 + seed))
    out, mask = synth.synthesize_anomaly(image, texture, _rng(seed), **{**DRAEM, "beta_range": (0.1, 0.3)})
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mask.dtype == bool and mask.shape == image.shape[:2] and mask.any()
    assert np.array_equal(out[~mask], image[~mask])
    changed = (out != image).any(axis=-1)
    assert changed[mask].mean() > 0.5


def test_synthesize_matches_draem_blend_without_augmentation():
    image = _striped_image(32, 32)
    texture = np.zeros((32, 32, 3), np.uint8)
    texture[..., 0] = 255
    out, mask = synth.synthesize_anomaly(image, texture, _rng(2), **{**DRAEM, "beta_range": (0.25, 0.25)}, augment=False)
    expected = np.rint(0.75 * texture.astype(np.float32) + 0.25 * image.astype(np.float32)).astype(np.uint8)
    assert np.array_equal(out[mask], expected[mask])


@pytest.mark.parametrize("seed", range(6))
def test_texture_keeps_at_least_its_draem_share(seed):
    """beta weighs the image; with beta <= 0.8 every masked pixel moves >= 20 % of the way to the texture."""
    image = _striped_image(48, 48)
    texture = synth.procedural_texture((48, 48), _rng(50 + seed))
    out, mask = synth.synthesize_anomaly(image, texture, _rng(seed), **DRAEM, augment=False)
    moved = np.abs(out.astype(np.float32) - image.astype(np.float32))[mask]
    needed = 0.2 * np.abs(texture.astype(np.float32) - image.astype(np.float32))[mask]
    assert (moved >= needed - 0.5).all()  # 0.5: rounding to uint8


@pytest.mark.parametrize("beta_range", [(1.0, 1.0), (0.5, 1.0), (0.5, 1.5), (0.6, 0.4)])
def test_a_blend_that_can_hide_the_texture_is_refused(beta_range):
    image = _striped_image()
    with pytest.raises(ValueError, match="^beta_range"):
        synth.synthesize_anomaly(image, image, _rng(0), **{**DRAEM, "beta_range": beta_range})


@pytest.mark.parametrize("seed", range(12))
def test_every_synthetic_defect_is_visible_inside_its_mask(seed):
    image = _striped_image(64, 64)
    out, mask = synth.synthesize_visible(image, lambda rng: synth.procedural_texture((64, 64), rng), (seed, 7), **DRAEM, min_change=8.0)
    assert mask.any()
    assert synth.visible_change(image, out, mask) >= 8.0


def test_an_invisible_draw_becomes_a_normal_row():
    image = np.full((32, 32, 3), 128, np.uint8)
    texture = lambda rng: synth.procedural_texture((32, 32), rng)  # noqa: E731
    out, mask = synth.synthesize_visible(image, texture, (0,), **DRAEM, min_change=256.0)  # beyond any uint8 change
    assert not mask.any() and np.array_equal(out, image)


def test_synthesize_rejects_bad_inputs():
    image = _striped_image()
    with pytest.raises(ValueError, match="^image"):
        synth.synthesize_anomaly(image[..., 0], image, _rng(0), **DRAEM)
