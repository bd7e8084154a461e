"""Test-time transform (shared with the exported model) and the reID training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from training.data.transforms import (
    IMAGENET_MEAN,
    Augmentation,
    Preprocess,
    build_test_transform,
    build_train_transform,
    preprocess_for_backbone,
)


def _constant(colour, size=(40, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, (size[1], size[0]), colour)


def test_test_transform_resizes_and_normalises():
    prep = Preprocess(size=(64, 32), interpolation="bilinear", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    out = build_test_transform(prep)(_constant((255, 0, 51)))
    assert out.shape == (3, 64, 32) and out.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, 0.2])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,colour", [("L", 128), ("RGBA", (10, 20, 30, 0)), ("P", 3)])
def test_any_mode_becomes_three_channels(mode, colour):
    out = build_test_transform(Preprocess(size=(16, 8)))(_constant(colour, mode=mode))
    assert out.shape == (3, 16, 8)


def test_train_transform_shape_and_determinism_under_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    transform = build_train_transform(Preprocess(size=(32, 16)))
    torch.manual_seed(1)
    a = transform(image)
    torch.manual_seed(1)
    b = transform(image)
    assert a.shape == (3, 32, 16)
    torch.testing.assert_close(a, b)
    outs = [transform(image) for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # it is random


def test_flip_and_erasing_at_probability_one():
    left_white = np.zeros((32, 16, 3), dtype=np.uint8)
    left_white[:, :8] = 255
    image = Image.fromarray(left_white)
    prep = Preprocess(size=(32, 16), mean=(0, 0, 0), std=(1, 1, 1))
    flipped = build_train_transform(prep, Augmentation(flip_prob=1.0, pad=0, erasing_prob=0.0))(image)
    assert flipped[:, :, 8:].mean() > 0.99 and flipped[:, :, :8].mean() < 0.01
    erased = build_train_transform(
        prep, Augmentation(flip_prob=0.0, pad=0, erasing_prob=1.0, erasing_scale=(0.3, 0.3))
    )(Image.fromarray(np.full((32, 16, 3), 255, dtype=np.uint8)))
    # Erased pixels are 0 after normalisation (the mean pixel); about 30% of the area.
    assert (erased == 0).all(dim=0).float().mean().item() == pytest.approx(0.3, abs=0.08)


def test_pad_and_random_crop_shift_content():
    image = Image.fromarray(np.full((32, 16, 3), 255, dtype=np.uint8))
    prep = Preprocess(size=(32, 16), mean=(0, 0, 0), std=(1, 1, 1))
    transform = build_train_transform(prep, Augmentation(flip_prob=0.0, pad=4, erasing_prob=0.0))
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(10)]
    assert all(o.shape == (3, 32, 16) for o in outs)
    assert any((o == 0).any() for o in outs)  # some crops include the zero padding


def test_preprocess_validation_and_round_trip():
    prep = Preprocess(size=[256, 128], interpolation="bicubic", mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    assert prep.size == (256, 128) and prep.mean == (0.1, 0.2, 0.3)
    assert Preprocess.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="cubic")
    with pytest.raises(ValueError, match="two positive"):
        Preprocess(size=(0, 10))
    with pytest.raises(ValueError, match="three values"):
        Preprocess(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="flip_prob"):
        Augmentation(flip_prob=2.0)


def test_normalisation_comes_from_the_backbone_config():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1)
    prep = preprocess_for_backbone(vit.pretrained_cfg, (256, 128))
    assert prep.mean == (0.5, 0.5, 0.5) and prep.size == (256, 128)
    assert preprocess_for_backbone(None, (8, 4)).mean == IMAGENET_MEAN
    assert preprocess_for_backbone(None, (8, 4), "bilinear").interpolation == "bilinear"
