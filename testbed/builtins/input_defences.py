"""Inference-time input transformations from ART, on every deployed client model.

Each defence transforms the inputs of every client's model (clean evaluation and the
scoring of adversarial examples). With ``adaptive = true`` the adversary knows it and
crafts on its own defended model: the same ART preprocessor goes in front of its
PyTorchClassifier, and ART passes gradients through it (identity for the
non-differentiable ones: BPDA, Athalye et al. 2018). Each attack in the report lists the
defences it was adaptive to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from art.defences.preprocessor import FeatureSqueezing, JpegCompression, SpatialSmoothing
from art.defences.preprocessor.preprocessor import Preprocessor
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, Params
from testbed.state import InferenceBatch


def _float32(cls: type[Preprocessor]) -> type[Preprocessor]:
    """The same ART preprocessor, returning float32: some return float64, which ART then
    feeds to a float32 PyTorch model inside the adaptive attack's gradient."""

    class Float32(cls):  # type: ignore[misc, valid-type]
        def __call__(self, x: np.ndarray, y: Any = None) -> tuple[np.ndarray, Any]:
            out, y = super().__call__(x, y)
            return out.astype(np.float32, copy=False), y

    Float32.__name__ = Float32.__qualname__ = cls.__name__
    return Float32


Jpeg, Smoothing, Squeezing = map(_float32, (JpegCompression, SpatialSmoothing, FeatureSqueezing))


class InputDefenceParams(Params):
    adaptive: bool = Field(
        False, description="The adversary crafts through this defence (BPDA) if true."
    )


class JpegParams(InputDefenceParams):
    quality: int = Field(75, ge=1, le=95, description="JPEG quality (lower: stronger).")


class SmoothingParams(InputDefenceParams):
    window_size: int = Field(3, ge=2, le=9, description="Median filter window in pixels.")


class SqueezingParams(InputDefenceParams):
    bit_depth: int = Field(4, ge=1, le=8, description="Bits kept per pixel value.")


class InputTransform:
    """Applies one ART preprocessor to every deployed model's input."""

    stateless = True  # a fixed, deterministic transform: safe to copy into every process

    def __init__(self, preprocessor: Any, adaptive: bool) -> None:
        self.pre = preprocessor
        self.adaptive = adaptive

    @hookimpl
    def testbed_inference_input(self, batch: InferenceBatch) -> None:
        x = batch.x
        out, _ = self.pre(x.detach().cpu().numpy())
        batch.x = torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    @hookimpl
    def testbed_attack_preprocessing(self, client_id: int) -> list[Any] | None:
        return [self.pre] if self.adaptive else None


def build_jpeg(p: JpegParams) -> InputTransform:
    pre = Jpeg(clip_values=(0.0, 1.0), quality=p.quality, channels_first=True)
    return InputTransform(pre, p.adaptive)


def build_smoothing(p: SmoothingParams) -> InputTransform:
    pre = Smoothing(window_size=p.window_size, channels_first=True, clip_values=(0.0, 1.0))
    return InputTransform(pre, p.adaptive)


def build_squeezing(p: SqueezingParams) -> InputTransform:
    return InputTransform(Squeezing(clip_values=(0.0, 1.0), bit_depth=p.bit_depth), p.adaptive)


@hookimpl
def testbed_register_defences(registry: KindRegistry) -> None:
    registry.add(
        "jpeg_compression", build_jpeg, params=JpegParams, stage="inference",
        description="ART JPEG compression of every model input (Dziugaite et al. 2016)",
    )  # fmt: skip
    registry.add(
        "spatial_smoothing", build_smoothing, params=SmoothingParams, stage="inference",
        description="ART median-filter smoothing of every model input (Xu et al. 2018)",
    )  # fmt: skip
    registry.add(
        "feature_squeezing", build_squeezing, params=SqueezingParams, stage="inference",
        description="ART bit-depth reduction of every model input (Xu et al. 2018)",
    )  # fmt: skip
