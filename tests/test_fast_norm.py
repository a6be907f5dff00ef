"""The batch-1 instance-norm shortcut gives the same bits as torch's InstanceNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_nnseg.fast_norm import use_fast_instance_norm


@pytest.mark.parametrize(("cls", "shape"), [(nn.InstanceNorm3d, (1, 6, 5, 9, 7)), (nn.InstanceNorm2d, (1, 4, 33, 17)),
                                            (nn.InstanceNorm3d, (2, 3, 4, 4, 4))])
@pytest.mark.parametrize("affine", [True, False])
def test_fast_instance_norm_is_bit_identical(cls, shape, affine):
    torch.manual_seed(0)
    norm = cls(shape[1], eps=1e-5, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(shape) * 3 + 1
    with torch.inference_mode():
        expected = norm(x)
        net = use_fast_instance_norm(nn.Sequential(norm))
        assert type(net[0]).__name__.startswith("Fast")
        assert torch.equal(net(x), expected)
    assert list(net.state_dict()) == (["0.weight", "0.bias"] if affine else [])
