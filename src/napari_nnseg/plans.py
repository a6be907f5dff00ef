"""Reading nnU-Net plans: configuration inheritance and the legacy (pre-2.3) architecture keys.

Only data is read here; class and function names found in the plans are resolved elsewhere against fixed
allow-lists, never imported.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import NnsegError

_LEGACY_KEYS = ("UNet_class_name", "UNet_base_num_features", "n_conv_per_stage_encoder",
                "n_conv_per_stage_decoder", "pool_op_kernel_sizes", "conv_kernel_sizes",
                "unet_max_num_features")


def resolve_configuration(plans: dict, name: str, plans_file: str = "plans.json") -> dict[str, Any]:
    """The configuration dict after ``inherits_from`` (parent deep-copied, then updated by the child)."""
    configs = plans.get("configurations") or {}
    seen: list[str] = []

    def resolve(n: str) -> dict:
        if n not in configs:
            raise NnsegError(f"{plans_file} has no configuration {n!r}; it has: {', '.join(configs) or 'none'}.")
        if n in seen:
            raise NnsegError(f"{plans_file}: circular 'inherits_from' through {' -> '.join([*seen, n])}.")
        seen.append(n)
        conf = copy.deepcopy(configs[n])
        parent = conf.get("inherits_from")
        if parent is not None:
            base = resolve(parent)
            base.update(conf)
            conf = base
        return conf

    conf = resolve(name)
    if "architecture" not in conf:
        conf["architecture"] = legacy_architecture(conf, plans_file, name)
    return conf


def legacy_architecture(conf: dict, plans_file: str, name: str) -> dict[str, Any]:
    """Rebuild the ``architecture`` block from nnU-Net <= 2.2 plans, the way nnU-Net converts them."""
    missing = [k for k in _LEGACY_KEYS if k not in conf]
    if missing:
        raise NnsegError(f"{plans_file}, configuration {name!r}: no 'architecture' block and the legacy keys "
                         f"{missing} are missing too; re-plan the dataset with a current nnU-Net.")
    cls = conf["UNet_class_name"]
    if cls == "PlainConvUNet":
        class_name, blocks_key = "dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"
    elif cls == "ResidualEncoderUNet":
        class_name = "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
        blocks_key = "n_blocks_per_stage"
    else:
        raise NnsegError(f"{plans_file}, configuration {name!r}: UNet_class_name {cls!r} is not supported; "
                         "legacy plans may name PlainConvUNet or ResidualEncoderUNet.")
    dim = len(conf["patch_size"])
    n_stages = len(conf["n_conv_per_stage_encoder"])
    base, cap = conf["UNet_base_num_features"], conf["unet_max_num_features"]
    return {
        "network_class_name": class_name,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(base * 2**i, cap) for i in range(n_stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": copy.deepcopy(conf["conv_kernel_sizes"]),
            "strides": copy.deepcopy(conf["pool_op_kernel_sizes"]),
            blocks_key: copy.deepcopy(conf["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": copy.deepcopy(conf["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def intensity_properties(plans: dict, n_channels: int, plans_file: str = "plans.json") -> list[dict | None]:
    """Per-channel foreground statistics (CT normalisation needs them), keyed by channel index strings."""
    props = plans.get("foreground_intensity_properties_per_channel")
    if props is None:
        props = plans.get("foreground_intensity_properties_by_modality", {})
    return [props.get(str(c)) for c in range(n_channels)]
