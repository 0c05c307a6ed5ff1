"""The paper's own suggestion (Sec. VI): every hospital keeps its own input pipeline.

Each client's model sees images through that client's pipeline (intensity window, gamma,
resampling to another resolution and back), in training and when deployed. An adversary
crafts through its own pipeline (it is part of its model, so it knows it; ART
differentiates through it in PyTorch); its raw adversarial images then reach every
target through the target's pipeline, which the adversary does not know.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
from pydantic import Field, model_validator

from testbed import hookimpl
from testbed.registry import KindRegistry, Params
from testbed.state import InferenceBatch


class Pipeline(Params):
    window: tuple[float, float] = Field(
        (0.0, 1.0), description="Intensity window: [low, high] maps to [0, 1], clipped."
    )
    gamma: float = Field(1.0, gt=0, description="Power applied after windowing.")
    resample: Literal["none", "nearest", "bilinear", "area"] = Field(
        "none", description="Resample to `scale` x the size and back (another scanner)."
    )
    scale: float = Field(0.5, gt=0.1, lt=1, description="Intermediate size factor.")

    @model_validator(mode="after")
    def _window_order(self) -> Pipeline:
        if not 0 <= self.window[0] < self.window[1] <= 1:
            raise ValueError(f"window must satisfy 0 <= low < high <= 1, got {self.window}")
        return self


class HeterogeneousParams(Params):
    pipelines: list[Pipeline] = Field(
        min_length=1, description="Pipeline of client i is pipelines[i % len(pipelines)]."
    )


def apply_pipeline(p: Pipeline, x: torch.Tensor) -> torch.Tensor:
    low, high = p.window
    x = ((x - low) / (high - low)).clamp(0, 1)
    if p.gamma != 1.0:
        x = x.clamp_min(1e-6).pow(p.gamma)
    if p.resample != "none":
        size = x.shape[-2:]
        small = [max(1, round(s * p.scale)) for s in size]
        align = {"align_corners": False} if p.resample == "bilinear" else {}
        x = F.interpolate(x, size=small, mode=p.resample, **align)
        x = F.interpolate(x, size=size, mode=p.resample, **align)
    return x.clamp(0, 1)


class PipelinePreprocessor(PreprocessorPyTorch):
    """One client's pipeline as an ART preprocessor, differentiable in PyTorch."""

    def __init__(self, pipeline: Pipeline, device_type: str) -> None:
        super().__init__(device_type=device_type, apply_fit=False, apply_predict=True)
        self.pipeline = pipeline

    def forward(self, x: torch.Tensor, y: Any = None) -> tuple[torch.Tensor, Any]:
        return apply_pipeline(self.pipeline, x), y


class HeterogeneousPreprocessing:
    stateless = True  # only its params: safe to copy into every Flower ClientApp

    def __init__(self, p: HeterogeneousParams) -> None:
        self.p = p

    def pipeline(self, client_id: int) -> Pipeline:
        return self.p.pipelines[client_id % len(self.p.pipelines)]

    @hookimpl
    def testbed_training_inputs(self, batch: InferenceBatch) -> None:
        batch.x = apply_pipeline(self.pipeline(batch.client_id), batch.x)

    @hookimpl
    def testbed_inference_input(self, batch: InferenceBatch) -> None:
        batch.x = apply_pipeline(self.pipeline(batch.client_id), batch.x)

    @hookimpl
    def testbed_attack_preprocessing(self, client_id: int) -> list[Any]:
        device = "gpu" if torch.cuda.is_available() else "cpu"
        return [PipelinePreprocessor(self.pipeline(client_id), device)]


@hookimpl
def testbed_register_defences(registry: KindRegistry) -> None:
    registry.add(
        "heterogeneous_preprocessing",
        HeterogeneousPreprocessing,
        params=HeterogeneousParams,
        description="Each client its own input pipeline: window, gamma, resampling",
    )
