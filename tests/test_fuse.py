"""fuse_for_inference folds BAM's branch BatchNorms without changing what the model computes."""
import pytest
import torch
import torch.nn as nn

import bam_zoo
from _helpers import randomise_bn
from bam_zoo.fuse import fuse_for_inference
from bam_zoo.layers import BAM


@pytest.mark.parametrize("fusion", ["sum", "product"])
@pytest.mark.parametrize("num_dilated_convs", [0, 2])
def test_fused_block_matches(fusion, num_dilated_convs):
    torch.manual_seed(0)
    bam = BAM(32, fusion=fusion, num_dilated_convs=num_dilated_convs)
    randomise_bn(bam)
    x = torch.randn(3, 32, 9, 13)
    ref = bam.eval()(x)
    fused = fuse_for_inference(bam.train())  # switches to eval itself
    assert not fused.training and fused is bam
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x_cl), ref, rtol=1e-5, atol=1e-5)


def test_fused_model_matches_and_leaves_backbone_alone():
    torch.manual_seed(0)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1)
    randomise_bn(model)
    x = torch.randn(4, 1, 28, 28)
    ref = model.eval()(x)
    backbone_bns = [name for name, m in model.named_modules()
                    if isinstance(m, nn.BatchNorm2d) and ".bam." not in f".{name}."]
    fuse_for_inference(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert all(isinstance(model.get_submodule(name), nn.BatchNorm2d) for name in backbone_bns)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for _, b in bam_zoo.bam_modules(model)
                   for m in b.modules())
    # still scriptable and attention capture still works
    torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-4, atol=1e-5)
    with bam_zoo.capture_attention(model) as maps:
        model(x)
    assert maps["layer1.bam"].shape == (4, 16, 28, 28)


def test_model_without_bam_is_rejected():
    with pytest.raises(ValueError, match="contains no BAM"):
        fuse_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
