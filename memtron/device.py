"""The one device policy: where a process computes, and the collective backend that follows it.

``train.device`` (and the ``--device`` flag of the inference commands) names ``auto``, ``cpu``
or an accelerator type such as ``cuda`` (optionally with an index). ``auto`` takes this
machine's accelerator as ``torch.accelerator`` reports it, else the CPU. An accelerator that is
asked for but absent fails at once, naming the key, instead of deep inside a launched job.
This module sits at the bottom of the stack, just above ``config``, whose error it raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from memtron.config import ConfigError


def accelerator() -> torch.device | None:
    """This machine's accelerator type (``cuda``, ``xpu``, ``mps``...), or None."""
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return None


def resolve_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """``name`` as a concrete device: ``auto`` is the accelerator if present, else the CPU; an
    accelerator without an index is its current device (the local rank's, once
    ``init_distributed`` has set it). Raises :class:`ConfigError` naming ``key`` when the
    device does not exist here."""
    present = accelerator()
    if name == "auto":
        name = present.type if present is not None else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{key}: {name!r} is not a device ({e})") from e
    if device.type == "cpu":
        return device
    if present is None or present.type != device.type:
        have = f"only {present.type}" if present is not None else "no accelerator"
        raise ConfigError(f"{key}: {name} requested, but this machine has {have}; use auto "
                          "or cpu")
    count = torch.accelerator.device_count()
    if device.index is None:
        return torch.device(device.type, torch.accelerator.current_device_index())
    if device.index >= count:
        raise ConfigError(f"{key}: {name} requested, but this machine has {count} "
                          f"{device.type} device(s)")
    return device


def default_backend(device: torch.device) -> str:
    """The collective backend of ``device``'s type (nccl for CUDA, gloo for the CPU)."""
    return dist.get_default_backend_for_device(device)
