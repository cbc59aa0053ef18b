"""Reading Flower ArrayRecords into numpy and torch, with each .npy header parsed once.

Flower stores every array as .npy bytes, and `Array.numpy()` parses the header (an `ast.literal_eval`) on every
call. For the small models of a simulated federation that costs more than the data: 0.25 ms against 0.02 ms for a
four-array MLP, paid for every reply by the client, the curious hook and the aggregation, hundreds of times per
round. The header is the same for every reply with the same dtype and shape, so it is parsed once and cached; the
data is read as numpy would read it. The values are numpy's, bit for bit.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)

_MAGIC = b"\x93NUMPY"


def to_numpy(array: Array, *, copy: bool = True) -> np.ndarray:
    """The array's values as a writable numpy array (what `array.numpy()` returns); `copy=False`: a read-only
    view of the record's bytes (no copy), for code that only reads them."""
    data = array.data
    if array.stype != "numpy.ndarray" or not data.startswith(_MAGIC) or data[6] not in (1, 2, 3):
        return array.numpy()
    size = 2 if data[6] == 1 else 4
    end = 8 + size + int.from_bytes(data[8:8 + size], "little")
    shape, fortran, dtype = _header(data[:end])
    if dtype.hasobject:
        return array.numpy()  # numpy refuses these without pickle; keep its error
    flat = np.frombuffer(data, dtype=dtype, offset=end, count=_size(shape))
    values = flat.reshape(shape, order="F" if fortran else "C")
    return values.copy() if copy else values


def to_array(values: np.ndarray) -> Array:
    """`Array(values)`, faster: the same .npy bytes (the header numpy writes for this dtype and shape, made once
    and cached, then the raw values), without `np.save`'s file object and header formatting per array."""
    if not values.flags.c_contiguous or values.dtype.hasobject or values.ndim == 0:
        return Array(values)
    data = _npy_header(values.dtype, values.shape) + values.tobytes()
    return Array(dtype=_dtype_name(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(state_dict)`, the same bytes, faster: `to_array`, and each Array stored as it is
    (`ArrayRecord({name: Array})` builds every Array a second time)."""
    record = ArrayRecord()
    for name, tensor in state.items():
        record[name] = to_array(tensor.detach().cpu().numpy())
    return record


@lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    """`str(dtype)`, which numpy rebuilds on every call (8 us; a reply of six arrays paid 0.05 ms for it)."""
    return str(dtype)


@lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header `np.save` writes for a C-ordered array of `dtype` and `shape` (what precedes its values)."""
    probe = np.zeros(shape, dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, probe, allow_pickle=False)
    return buffer.getvalue()[:-probe.nbytes] if probe.nbytes else buffer.getvalue()


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """`record.to_torch_state_dict()`, faster."""
    return {name: torch.from_numpy(to_numpy(array)) for name, array in record.items()}


@lru_cache(maxsize=1024)
def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


@lru_cache(maxsize=1024)
def _header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    fh = io.BytesIO(header)
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)


def records(content: RecordDict, kind: type[R]) -> dict[str, R]:
    """The records of one kind in `content`, read only: what `content.array_records` (`metric_records`,
    `config_records`) holds, without its cost. Those build a synced view on every access, storing every record
    back into the RecordDict with type checks (0.1-0.3 ms a reply for the three); the server reads them for
    every reply of every round."""
    return {key: record for key, record in content.items() if isinstance(record, kind)}

