"""The paper's CNN: six 3x3 convolutions, five fully connected layers, ReLU, dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from testbed import hookimpl
from testbed.registry import KindRegistry, Params


class PaperCNNParams(Params):
    conv_channels: tuple[int, int, int, int, int, int] = Field(
        (32, 32, 64, 64, 128, 128),
        description="Widths of the six 3x3 convolutions (paper: not given).",
    )
    fc_units: tuple[int, int, int, int] = Field(
        (512, 256, 128, 64),
        description="Widths of the four hidden fully connected layers; the fifth is the output.",
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout before each hidden FC layer.")
    norm: str = Field(
        "none",
        pattern="^(none|group)$",
        description="Normalisation after each convolution: none (paper) or group (Opacus-safe).",
    )
    init: Literal["kaiming", "torch_default"] = Field(
        "kaiming",
        description="He init for the ReLU layers (paper: not given); torch's default leaves "
        "this 11-layer net without normalisation stuck at chance.",
    )


class Normalize(nn.Module):
    """First layer, so that attacks work on [0, 1] pixels and eps is in pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PaperCNN(nn.Module):
    def __init__(
        self,
        p: PaperCNNParams,
        in_channels: int,
        image_size: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize(mean, std)]
        c_in, size = in_channels, image_size
        for i, c_out in enumerate(p.conv_channels):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if p.norm == "group":
                layers.append(nn.GroupNorm(min(8, c_out), c_out))
            layers.append(nn.ReLU(inplace=True))
            if i % 2 == 1:  # pool after every second convolution
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for three 2x2 poolings")
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten()]
        width = c_in * size * size
        for units in p.fc_units:
            fc += [nn.Dropout(p.dropout), nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        fc.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*fc)
        if p.init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_paper_cnn(
    params: PaperCNNParams,
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    return PaperCNN(params, in_channels, image_size, num_classes, mean, std)


@hookimpl
def testbed_register_models(registry: KindRegistry) -> None:
    registry.add(
        "paper_cnn",
        build_paper_cnn,
        params=PaperCNNParams,
        description="Darzi et al.: 6 conv 3x3 (pool every 2nd) + 5 FC, ReLU, dropout 0.25",
    )
