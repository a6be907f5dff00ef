"""Building networks from plans through a fixed table of known classes.

nnU-Net resolves ``network_class_name`` and the ``conv_op``/``norm_op``/``nonlin``/``dropout_op`` strings
with ``pydoc.locate`` and calls them with kwargs from the same JSON, so a plans file alone can run code
(NNUNET_FACTS.md §2.3). Here every name is looked up in the tables below; anything else is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from .errors import NnsegError

NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "PlainConvUNet": PlainConvUNet,
    "ResidualEncoderUNet": ResidualEncoderUNet,
}
_NETWORK_MODULES = {
    "PlainConvUNet": ("dynamic_network_architectures.architectures.unet",),
    # nnU-Net's legacy-plans conversion names a residual_unet module that current releases no longer have
    "ResidualEncoderUNet": ("dynamic_network_architectures.architectures.residual_unet",
                            "dynamic_network_architectures.architectures.unet"),
}

_OPS: dict[str, type[nn.Module]] = {}
_OP_MODULES = {
    "conv": ["Conv1d", "Conv2d", "Conv3d"],
    "instancenorm": ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"],
    "batchnorm": ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"],
    "activation": ["LeakyReLU", "ReLU", "PReLU", "GELU", "ELU"],
    "dropout": ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"],
}
for _module, _names in _OP_MODULES.items():
    for _name in _names:
        _cls = getattr(nn, _name)
        _OPS[f"torch.nn.modules.{_module}.{_name}"] = _cls
        _OPS[f"torch.nn.{_name}"] = _cls

_OP_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")
_BATCHNORM_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def network_class(name: str, where: str) -> type[nn.Module]:
    short = name.rsplit(".", 1)[-1]
    allowed = NETWORK_CLASSES.get(short)
    module = name.rsplit(".", 1)[0] if "." in name else None
    if allowed is None or (module is not None and module not in _NETWORK_MODULES[short]):
        raise NnsegError(f"{where}: network_class_name {name!r} is not a supported network. Supported: "
                         f"{', '.join(NETWORK_CLASSES)} from dynamic_network_architectures.")
    return allowed


def resolve_op(key: str, value: str | None, where: str) -> type[nn.Module] | None:
    if value is None:
        return None
    op = _OPS.get(value) if isinstance(value, str) else None
    if op is None:
        raise NnsegError(f"{where}: {key} = {value!r} is not an allowed operation. Allowed for {key}: "
                         f"{', '.join(sorted(k for k in _OPS if k.startswith('torch.nn.modules')))}.")
    return op


def build_network(architecture: dict[str, Any], n_input_channels: int, n_outputs: int, *,
                  use_batchnorm: bool = False, where: str = "plans.json") -> nn.Module:
    """Instantiate the plans' network with deep supervision off, as nnU-Net does at inference.

    ``use_batchnorm`` swaps the norm for the matching BatchNorm (eps 1e-5, affine), which is what the
    ``nnUNetTrainerBN`` trainer does to the plans' architecture.
    """
    cls = network_class(architecture.get("network_class_name", ""), where)
    kwargs = copy.deepcopy(architecture.get("arch_kwargs") or {})
    for key in _OP_KEYS:
        if key in kwargs:
            kwargs[key] = resolve_op(key, kwargs[key], where)
    for key in ("input_channels", "num_classes", "deep_supervision"):
        kwargs.pop(key, None)
    if use_batchnorm:
        conv = kwargs.get("conv_op")
        if conv not in _BATCHNORM_FOR_CONV:
            raise NnsegError(f"{where}: the BatchNorm trainer needs a Conv1d/2d/3d conv_op, got {conv!r}.")
        kwargs["norm_op"] = _BATCHNORM_FOR_CONV[conv]
        kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True}
    try:
        net = cls(input_channels=n_input_channels, num_classes=n_outputs, deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise NnsegError(f"{where}: could not build {cls.__name__} from arch_kwargs ({exc}).") from exc
    return net
