"""The feature store: one self-describing Zarr v3 store that many experiments share.

``FeatureSpec`` says what a feature set is; ``FeatureStore`` writes (through ``StoreWriter``), reads,
verifies, removes and compacts; ``FeatureDataset`` serves it to torch. ``store.interop`` imports
and exports npy folders and HDF5 files. (``store.datasets`` holds the dataset adapters.)
"""

from .spec import FeatureSpec
from .store import FeatureStore, StorageError, StoreFullError, StoreWriter, VerifyReport

__all__ = ["FeatureSpec", "FeatureStore", "StoreWriter", "VerifyReport", "StorageError", "StoreFullError",
           "FeatureDataset"]


def __getattr__(name: str):  # torch is imported only when the Dataset is asked for
    if name == "FeatureDataset":
        from .dataset import FeatureDataset

        return FeatureDataset
    raise AttributeError(f"module 'store' has no attribute {name!r}")
