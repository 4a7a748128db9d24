"""The feature store: one self-describing Zarr v3 store that many experiments share.

``FeatureSpec`` says what a feature set is; ``FeatureStore`` is the facade that writes (through
``StoreWriter``), reads, verifies, removes and compacts, and opens a whole set as one lazy xarray array
(``to_xarray``); ``FeatureDataset`` serves it to torch. Inside, one module per concern: ``marks`` (the
commit log and its replay), ``segments`` (array layout and row I/O), ``maintenance`` (verify, repair,
compact, gc), ``writer`` and ``xview``. ``store.interop`` imports and exports npy folders and HDF5
files. (The dataset adapters live in ``corpora``.)
"""

from .spec import FeatureSpec
from .errors import UnknownSetError
from .store import (IMPORTED, TINY_NOTE, FeatureStore, NotAStoreError, StorageError, StoreFullError, StoreWriter,
                    VerifyReport, profile_summary)

__all__ = ["FeatureSpec", "FeatureStore", "StoreWriter", "VerifyReport", "StorageError", "StoreFullError",
           "NotAStoreError", "UnknownSetError", "FeatureDataset", "IMPORTED", "TINY_NOTE", "profile_summary"]


def __getattr__(name: str):  # torch is imported only when the Dataset is asked for
    if name == "FeatureDataset":
        from .dataset import FeatureDataset

        return FeatureDataset
    raise AttributeError(f"module 'store' has no attribute {name!r}")
