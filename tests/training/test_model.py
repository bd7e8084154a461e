"""ReIDModel: timm backbone + BNNeck + classifier, train/eval outputs, clear errors."""

from __future__ import annotations

import pytest
import torch

from training.model import ReIDModel, UnknownBackboneError, create_reid_model

VIT_TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def test_vit_train_and_eval_outputs():
    torch.manual_seed(0)
    model = ReIDModel("vit_small_patch16_224", num_classes=7, img_size=(64, 32), backbone_kwargs=VIT_TINY)
    assert model.embed_dim == 64
    assert model.backbone_kwargs["img_size"] == [64, 32]
    x = torch.randn(4, 3, 64, 32)
    model.train()
    logits, feat, bn_feat = model(x)
    assert logits.shape == (4, 7) and feat.shape == (4, 64) and bn_feat.shape == (4, 64)
    model.eval()
    emb = model(x)
    assert emb.shape == (4, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    # Eval embedding is the post-BN feature (running statistics), normalised.
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.bnneck(model.backbone(x)), dim=1)
    torch.testing.assert_close(emb, expected)


def test_pre_bn_embedding_and_no_classifier():
    torch.manual_seed(0)
    model = ReIDModel("resnet18", num_classes=0, img_size=(64, 32), embedding="pre_bn").eval()
    assert model.classifier is None
    assert "img_size" not in model.backbone_kwargs  # CNNs do not take it
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.backbone(x), dim=1)
    torch.testing.assert_close(model(x), expected)
    model.train()
    logits, _, _ = model(x)
    assert logits is None


def test_bnneck_bias_frozen_at_zero_and_classifier_bias_free():
    model = ReIDModel("resnet18", num_classes=5, img_size=None)
    assert not model.bnneck.bias.requires_grad
    assert torch.count_nonzero(model.bnneck.bias) == 0
    assert model.classifier.bias is None
    assert model.is_cnn


def test_head_hidden_size_models_report_the_real_output_dim():
    model = ReIDModel("mobilenetv3_small_100", img_size=(64, 32)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 32))
    assert out.shape == (1, model.embed_dim) == (1, 1024)


def test_unknown_backbone_suggests_names():
    with pytest.raises(UnknownBackboneError, match=r"resnet50.*list_models"):
        create_reid_model("resnet5O")


def test_reserved_backbone_kwargs_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        ReIDModel("resnet18", backbone_kwargs={"num_classes": 3})


def test_invalid_embedding_rejected():
    with pytest.raises(ValueError, match="embedding"):
        ReIDModel("resnet18", embedding="logits")  # type: ignore[arg-type]
