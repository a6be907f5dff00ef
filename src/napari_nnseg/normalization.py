"""nnU-Net's five intensity normalisation schemes, with nnU-Net's float32 arithmetic.

The operations (in-place float32 numpy on the cropped view, statistics from numpy's own reductions) are
kept exactly as nnU-Net performs them, because the normalised values decide every downstream bit.
"""

from __future__ import annotations

import numpy as np

from .errors import NnsegError

_EPS = 1e-8


def _zscore(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        values = image[mask]
        mean = values.mean()
        std = values.std()
        image[mask] = (values - mean) / max(std, _EPS)
    else:
        mean = image.mean()
        std = image.std()
        image -= mean
        image /= max(std, _EPS)
    return image


def _ct(image: np.ndarray, props: dict | None, channel: int) -> np.ndarray:
    needed = ("mean", "std", "percentile_00_5", "percentile_99_5")
    if not props or any(k not in props for k in needed):
        raise NnsegError(f"plans.json: channel {channel} uses CTNormalization but "
                         f"foreground_intensity_properties_per_channel['{channel}'] lacks {list(needed)}.")
    np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
    image -= props["mean"]
    image /= max(props["std"], _EPS)
    return image


def _rescale01(image: np.ndarray) -> np.ndarray:
    image -= image.min()
    image /= np.clip(image.max(), a_min=_EPS, a_max=None)
    return image


def _rgb01(image: np.ndarray, channel: int) -> np.ndarray:
    if image.min() < 0 or image.max() > 255:
        raise NnsegError(f"Channel {channel} uses RGBTo01Normalization, which expects values in 0..255, but "
                         f"the image spans {image.min():g}..{image.max():g}. Give the model 8-bit RGB data.")
    image /= 255.0
    return image


SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")


def normalize_channel(image: np.ndarray, scheme: str, use_mask: bool, nonzero_mask: np.ndarray,
                      props: dict | None, channel: int) -> np.ndarray:
    """Normalise one float32 channel in place (``image`` is a view into the case's array)."""
    if scheme == "ZScoreNormalization":
        return _zscore(image, nonzero_mask if use_mask else None)
    if scheme == "CTNormalization":
        return _ct(image, props, channel)
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        return _rescale01(image)
    if scheme == "RGBTo01Normalization":
        return _rgb01(image, channel)
    raise NnsegError(f"plans.json: normalization scheme {scheme!r} (channel {channel}) is not supported; "
                     f"supported: {', '.join(SCHEMES)}.")
