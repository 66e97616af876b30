"""Data: built-in 2D sets, ``.npy`` arrays and Gaussian-mixture spec files."""

from flowmaps.data.sources import BUILTIN, ArrayData, DataSource, GeneratedData, MixtureData, data_fingerprint, get_data

__all__ = ["BUILTIN", "ArrayData", "DataSource", "GeneratedData", "MixtureData", "data_fingerprint", "get_data"]
