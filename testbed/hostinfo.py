"""The host a run computes on, as far as it decides the numbers.

A seed repeats a run bitwise only on the same float path: device, torch, thread count and
CPU (oneDNN picks kernels by the CPU's features, and each sums in its own order; SGD
amplifies the difference). Run folders (a resume) and cache entries record it, so that a
report can say where numbers come from another host.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_flags_digest() -> str | None:
    """A short digest of the CPU's feature flags, where Linux lists them: enough to tell two
    hosts apart (a glioma federation ended 1.6 ACC points apart on two, docs/RESULTS.md)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:12] if flags else None


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": str(torch.__version__),  # a plain str: cache entries load weights_only
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags_digest(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


FLOAT_PATH_KEYS = ("device", "gpu", "torch", "threads", "cpu_capability", "cpu_flags")


def float_path(device: torch.device) -> dict[str, Any]:
    hw = hardware(device)
    return {k: hw[k] for k in FLOAT_PATH_KEYS if k in hw}


def differences(hosts: list[dict[str, Any]]) -> list[str]:
    """The float-path keys on which some of ``hosts`` differ."""
    keys = sorted({k for h in hosts for k in h})
    return [k for k in keys if len({str(h.get(k)) for h in hosts}) > 1]
