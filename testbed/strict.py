"""The base of every schema a user writes into: scenarios, search spaces, component params.

Unknown keys are errors, and so is any number training could not hold: TOML's ``nan`` and
``inf``, and finite values beyond float32 (``lr = 1e308`` made torch's SGD raise mid-run,
an infinite noise multiplier passed ``ge=0`` and failed in round 1 as a plugin error).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

FLOAT32_MAX = 3.4028234663852886e38
"""torch.finfo(torch.float32).max, written out so that the schema does not import torch."""


def _too_large(v: Any) -> bool:
    # raw component params (dict values) are checked by the component's own Params later,
    # with their full path; nested models were checked when they were built
    if isinstance(v, list | tuple):
        return any(_too_large(x) for x in v)
    return isinstance(v, int | float) and not isinstance(v, bool) and abs(v) > FLOAT32_MAX


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_float32(cls, v: Any) -> Any:
        if _too_large(v):
            raise ValueError(
                f"{v!r} is too large: at most {FLOAT32_MAX:.4g} in magnitude "
                "(the largest float32; training and attacks run in float32)"
            )
        return v


NOISE_STD_MAX = FLOAT32_MAX / 10
"""Gaussian noise is drawn in float32: with a larger std a 10-sigma draw overflows."""


def check_noise_std(std: float, what: str) -> None:
    """For a params model's validator: ``std`` (a product such as z x C) must be drawable.
    Each factor fits float32 on its own; their product need not."""
    if std > NOISE_STD_MAX:
        raise ValueError(
            f"{what} = {std:.4g} is too large for a noise std: Gaussian noise is drawn in "
            f"float32, so at most {NOISE_STD_MAX:.4g}"
        )
