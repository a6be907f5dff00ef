"""Which torch devices exist here, so front ends offer only those (``auto`` first)."""

from __future__ import annotations

import torch

from .errors import NnsegError


def available_devices() -> list[str]:
    """``["auto", "cpu", "cuda:0", ..., "mps"]``, listing only devices this machine has."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise NnsegError(f"device {device!r} is not a torch device; use one of "
                         f"{', '.join(available_devices())}.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NnsegError(f"device {device!r} was requested but this machine has no usable CUDA GPU; "
                             "use 'cpu' or 'auto'.")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise NnsegError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
        return torch.device("cuda", index)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise NnsegError("device 'mps' was requested but Apple's Metal backend is not available here.")
        return dev
    if dev.type == "cpu":
        return dev
    raise NnsegError(f"device {device!r} is not supported; use one of {', '.join(available_devices())}.")
