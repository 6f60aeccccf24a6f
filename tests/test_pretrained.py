"""Shipped tags as timm users load them: headless, with a new head, and strict everywhere else."""
import huggingface_hub.constants
import pytest
import torch

import bam_zoo
from bam_zoo.models.pretrained import FASHION_MNIST_TAGS, strict_keys


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """The repository's mirror serves the weights; no Hub request is tried."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", list(FASHION_MNIST_TAGS))
def test_headless_tag_gives_the_pooled_features_of_its_weights(name):
    full = bam_zoo.create_model(name, pretrained=True).eval()
    headless = bam_zoo.create_model(name, pretrained=True, num_classes=0).eval()
    backbone = headless.state_dict()
    assert "fc.weight" not in backbone and backbone.keys() == {k for k in full.state_dict() if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(value, full.state_dict()[key]), key
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = headless(x)
        assert features.shape == (3, full.num_features)
        torch.testing.assert_close(features, full.forward_head(full.forward_features(x), pre_logits=True))


def test_new_head_is_initialised_and_the_backbone_loaded():
    full = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True)
    five = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True, num_classes=5)
    assert five.fc.weight.shape == (5, full.num_features)
    assert not torch.equal(five.fc.weight, full.fc.weight[:5])
    for key, value in five.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, full.state_dict()[key]), key


@pytest.mark.parametrize("num_classes", [0, 5, 10])
def test_keys_outside_the_head_stay_strict(num_classes):
    """Dropping the head must not let a stray or missing backbone key through."""
    weights = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True).state_dict()
    model = bam_zoo.create_model("bam_resnet20.fmnist", num_classes=num_classes)
    with pytest.raises(Exception, match="bogus"):
        strict_keys({**weights, "bogus.weight": torch.zeros(1)}, model)
    missing = dict(weights)
    del missing["layer1.bam.channel_attn.fc1.weight"]
    with pytest.raises(Exception, match="layer1.bam.channel_attn.fc1.weight"):
        strict_keys(missing, model)
    kept = strict_keys(dict(weights), model)
    assert ("fc.weight" in kept) == (num_classes == 10)
