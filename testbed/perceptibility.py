"""How visible adversarial perturbations are: L2 and L-inf norms, SSIM and PSNR
(scikit-image's `structural_similarity` and `peak_signal_noise_ratio`), pure functions of
clean and adversarial images with pixels in [0, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image L2 and L-inf norm of ``x_adv - x`` (N, C, H, W)."""
    d = (x_adv - x).flatten(1).double()
    return d.norm(dim=1).cpu().numpy(), d.abs().amax(dim=1).cpu().numpy()


def ssim_psnr(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image SSIM and PSNR (dB, data range 1). PSNR of an unchanged image is inf."""
    a = x.detach().cpu().double().numpy()
    b = x_adv.detach().cpu().double().numpy()
    side = min(a.shape[-2:])
    # SSIM's default 7x7 window must fit the image and be odd.
    win = min(7, side if side % 2 else side - 1)
    ssim, psnr = [], []
    for xi, ai in zip(a, b, strict=True):
        ssim.append(structural_similarity(xi, ai, data_range=1.0, channel_axis=0, win_size=win))
        mse = float(np.mean((xi - ai) ** 2))
        psnr.append(math.inf if mse == 0 else peak_signal_noise_ratio(xi, ai, data_range=1.0))
    return np.asarray(ssim), np.asarray(psnr)


def perceptibility(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float | int]:
    """Mean and extreme of each measure over the images; PSNR over the changed images only
    (an unchanged image's inf would swamp the mean), with how many were left unchanged."""
    l2, linf = perturbation_norms(x, x_adv)
    ssim, psnr = ssim_psnr(x, x_adv)
    changed = np.isfinite(psnr)
    return {
        "l2_mean": float(l2.mean()),
        "l2_max": float(l2.max()),
        "linf_mean": float(linf.mean()),
        "linf_max": float(linf.max()),
        "ssim_mean": float(ssim.mean()),
        "ssim_min": float(ssim.min()),
        "psnr_mean": float(psnr[changed].mean()) if changed.any() else math.inf,
        "psnr_min": float(psnr[changed].min()) if changed.any() else math.inf,
        "unchanged": int((~changed).sum()),
        "n": int(l2.shape[0]),
    }


def pool_perceptibility(parts: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Combine per-adversary summaries into one, weighting means by image counts."""
    n = sum(int(p["n"]) for p in parts)
    out: dict[str, float | int] = {"n": n, "unchanged": sum(int(p["unchanged"]) for p in parts)}
    for key in ("l2", "linf", "ssim"):
        out[f"{key}_mean"] = sum(float(p[f"{key}_mean"]) * int(p["n"]) for p in parts) / n
    for key in ("l2_max", "linf_max"):
        out[key] = max(float(p[key]) for p in parts)
    out["ssim_min"] = min(float(p["ssim_min"]) for p in parts)
    changed = [(float(p["psnr_mean"]), int(p["n"]) - int(p["unchanged"])) for p in parts]
    k = sum(c for _, c in changed)
    out["psnr_mean"] = sum(v * c for v, c in changed if c) / k if k else math.inf
    out["psnr_min"] = min(float(p["psnr_min"]) for p in parts)
    return out
