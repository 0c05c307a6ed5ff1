"""Built-in datasets: the paper's brain MRI tasks, PatchCamelyon and an offline synthetic set.

Every loader returns an in-memory ``ImageDataset`` (uint8, N x C x H x W) and fails with a
one-line ``DatasetError`` naming the offending path, so that a user with a half-copied
data folder learns what to fix rather than reading a traceback.
"""

from __future__ import annotations

from testbed import hookimpl
from testbed.builtins.dataset_brain_mri import BrainMRIParams, load_brain_mri
from testbed.builtins.dataset_pcam import PCamParams, load_pcam
from testbed.builtins.dataset_synthetic import SyntheticParams, load_synthetic
from testbed.registry import KindRegistry


@hookimpl
def testbed_register_datasets(registry: KindRegistry) -> None:
    registry.add(
        "brain_mri",
        load_brain_mri,
        params=BrainMRIParams,
        description="Kaggle brain tumour MRI (Bhuvaji 2020): meningioma or glioma vs no tumour",
    )
    registry.add(
        "pcam",
        load_pcam,
        params=PCamParams,
        description="PatchCamelyon lymph-node patches, 96x96 RGB: metastatic vs normal",
    )
    registry.add(
        "synthetic",
        load_synthetic,
        params=SyntheticParams,
        description="Generated offline: smooth tissue with or without a small lesion",
    )
