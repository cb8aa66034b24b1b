"""Encodings of result values, chosen by the value's type and named on the `DataRef`.

Every codec is data-only: JSON, netCDF (HDF5 through h5netcdf), Parquet and
``.npy`` without pickles. New formats plug in with :func:`register_codec`.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from dfm_prefect.core.errors import FederationError


@dataclass(frozen=True)
class Codec:
    """How one format turns values into bytes and back."""

    format: str
    accepts: Callable[[Any], bool]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    write_file: Callable[[Any, str], None] | None = None
    """Write straight to a local file, streaming lazy (Dask) values chunk by chunk."""


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> None:
    """Make a format available; later registrations are tried first."""
    _CODECS[codec.format] = codec


def codec_for(value: Any) -> Codec:
    """Pick the codec that encodes ``value``."""
    for codec in reversed(list(_CODECS.values())):
        if codec.accepts(value):
            return codec
    raise FederationError(
        f"results of type {type(value).__name__} cannot be encoded; "
        f"return one of the types handled by the formats {sorted(_CODECS)}"
    )


def encode(value: Any) -> tuple[str, bytes]:
    """Encode a value; return its format name and bytes."""
    codec = codec_for(value)
    return codec.format, codec.encode(value)


def decode(format: str, data: bytes) -> Any:
    """Decode bytes written by :func:`encode`."""
    try:
        codec = _CODECS[format]
    except KeyError:
        raise FederationError(f"unknown result format {format!r}; known: {sorted(_CODECS)}") from None
    return codec.decode(data)


# ----------------------------------------------------------------------- formats


def _is_json(value: Any) -> bool:
    return isinstance(value, (dict, list, str, int, float, bool)) or value is None


def _json_encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()


def loaded_classes(module: str, *names: str) -> tuple[type, ...]:
    """The named classes of an imported module; none if it is not imported, or another thread is still importing it.

    For type checks that must not import a heavy module: a value cannot be an
    instance of a class that does not exist yet, while reading the attributes of
    a half-imported module (a site's catalog imports xarray in the background
    when the site starts) would raise.
    """
    loaded = sys.modules.get(module)
    classes = tuple(getattr(loaded, name, None) for name in names)
    return classes if all(isinstance(cls, type) for cls in classes) else ()  # type: ignore[return-value]


def _is_xarray(value: Any) -> bool:
    return isinstance(value, loaded_classes("xarray", "Dataset", "DataArray"))


def _as_dataset(value: Any) -> Any:
    import xarray as xr

    return value.to_dataset(name=value.name or "value") if isinstance(value, xr.DataArray) else value


def _netcdf_encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    _as_dataset(value).to_netcdf(buffer, engine="h5netcdf")
    return buffer.getvalue()


def _netcdf_write(value: Any, path: str) -> None:
    _as_dataset(value).to_netcdf(path, engine="h5netcdf")


def _netcdf_decode(data: bytes) -> Any:
    import xarray as xr

    with xr.open_dataset(io.BytesIO(data), engine="h5netcdf") as ds:
        return ds.load()


def _is_frame(value: Any) -> bool:
    return isinstance(value, loaded_classes("pandas", "DataFrame"))


def _parquet_encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    value.to_parquet(buffer)
    return buffer.getvalue()


def _parquet_decode(data: bytes) -> Any:
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def _is_ndarray(value: Any) -> bool:
    if not isinstance(value, loaded_classes("numpy", "ndarray")):
        return False
    array: Any = value  # loaded_classes() narrows it to `object`
    return str(array.dtype.kind) in "biufcmM"


def _npy_encode(value: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _npy_decode(data: bytes) -> Any:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


register_codec(Codec("json", _is_json, _json_encode, lambda data: json.loads(data)))
register_codec(Codec("npy", _is_ndarray, _npy_encode, _npy_decode))
register_codec(Codec("parquet", _is_frame, _parquet_encode, _parquet_decode))
register_codec(Codec("netcdf", _is_xarray, _netcdf_encode, _netcdf_decode, _netcdf_write))
