"""Data: built-in 2D sets, array files, image folders, Fashion-MNIST and Gaussian-mixture spec files
(``sources``: the ``DataSource`` contract and ``get_data``)."""

from flowmaps.data.sources import (
    BUILTIN,
    ArrayData,
    DataSource,
    GeneratedData,
    MixtureData,
    data_fingerprint,
    get_data,
)

__all__ = ["BUILTIN", "ArrayData", "DataSource", "GeneratedData", "MixtureData", "data_fingerprint", "get_data"]
