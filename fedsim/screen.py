"""Reply screening: every client reply is checked completely before anything (attack, scorer, aggregation) uses it.

A reply can come from a hostile client, so nothing in it is trusted: its arrays must decode, have the dtype and
shape of the model the server sent and be finite; their size must be within `max_ratio` of the other replies of
the round and far from the float limit; its example count must be a finite, positive, plausible integer; its
metric and audit records must be well formed. `screen` returns, per reply, the first problem found (a
`Rejection` whose `kind` is recorded as the fault's kind) or None. Pure functions of the reply records: the
server's strategy and the curious hook both use them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedsim.arrays import records, to_numpy

MAX_RATIO = 1e6   # default: a reply this many times larger than the round's median reply is rejected as huge


@dataclass(frozen=True)
class Rejection:
    """Why a reply was left out. kind: decode, dtype, shape, nan, huge, examples, metrics, audit, client."""

    kind: str
    detail: str


def decode(record: ArrayRecord) -> dict[str, np.ndarray] | Rejection:
    """The record's arrays as numpy, or why they cannot be read (object arrays, unknown serialisation, ...)."""
    out = {}
    for name, array in record.items():
        try:
            nd = to_numpy(array, copy=False)  # read only: a view of the reply's bytes
        except Exception as err:  # anything the client sent that numpy refuses
            return Rejection("decode", f"'{name}' cannot be decoded ({type(err).__name__}: {str(err)[:120]})")
        if not isinstance(nd, np.ndarray) or nd.dtype.hasobject or nd.dtype.kind not in "biufc":
            return Rejection("decode", f"'{name}' is not a numeric array ({getattr(nd, 'dtype', type(nd))})")
        out[name] = nd
    return out


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, Tensor] | None,
                 optional: frozenset[str] = frozenset(), sums: dict[str, float] | None = None) -> Rejection | None:
    """Names, shapes and dtypes as the model the server sent (`reference`), then finiteness and the float limit.
    Names in `optional` (buffers a client may keep to itself, `fl.send_buffers=false`) may be missing. `sums`, when
    given, receives the sums of squares computed on the way (for `norm`)."""
    if reference is not None:
        extra = sorted(set(arrays) - set(reference))
        if extra:
            return Rejection("shape", f"unexpected array '{extra[0]}'")
        missing = sorted(set(reference) - set(arrays) - optional)
        if missing:
            return Rejection("shape", f"missing arrays {missing[:3]}")
    for name, nd in arrays.items():
        if reference is not None:
            expected = reference[name]
            if tuple(nd.shape) != tuple(expected.shape):
                return Rejection("shape", f"'{name}' has shape {tuple(nd.shape)}, expected {tuple(expected.shape)}")
            dtype = _numpy_dtype(expected.dtype)
            if nd.dtype != dtype:
                return Rejection("dtype", f"'{name}' is {nd.dtype}, the model's is {dtype}")
        elif nd.dtype.kind not in "fc":
            return Rejection("dtype", f"'{name}' is {nd.dtype}, not a floating-point array")
        total = _sum_of_squares(nd) if nd.dtype.kind in "fc" else None
        if total is not None:  # finite, and far below the limit
            if sums is not None:
                sums[name] = total
            continue
        if nd.dtype.kind in "fc":
            finite = np.isfinite(nd)
            if not finite.all():
                return Rejection("nan", f"'{name}' holds {int((~finite).sum())} non-finite values")
            limit = _overflow_limit(nd.dtype)
            peak = float(np.abs(nd).max(initial=0.0))
            if peak > limit:
                return Rejection("huge", f"'{name}' holds values up to {peak:.3g}: beyond {limit:.3g}, where "
                                         f"squares overflow {nd.dtype}")
    return None


@lru_cache(maxsize=64)
def _numpy_dtype(dtype) -> np.dtype:
    """numpy's dtype for a torch dtype (torch.float32 -> float32), once per dtype, not per array of every reply."""
    return np.dtype(str(dtype).replace("torch.", ""))


@lru_cache(maxsize=64)
def _overflow_limit(dtype: np.dtype) -> float:
    """sqrt of the largest finite value: larger values overflow in any norm, distance or loss."""
    real = np.empty(0, dtype=dtype).real.dtype
    return math.sqrt(float(np.finfo(real).max))


def _sum_of_squares(nd: np.ndarray) -> float | None:
    """The sum of squares of a float32/float64 array in one pass without copies (BLAS dot), when it shows every value
    finite and far below the float limit (a NaN or Inf, or a square near the limit, makes it non-finite or
    large); None otherwise, and for other dtypes: the caller then checks value by value."""
    if nd.dtype.kind != "f" or nd.dtype.itemsize < 4 or nd.size == 0:
        return None
    flat = nd.ravel(order="K")  # a view of a C- or Fortran-ordered array
    total = float(np.dot(flat, flat))
    return total if math.isfinite(total) and total < 0.25 * _overflow_limit(nd.dtype) ** 2 else None


def norm(arrays: Mapping[str, np.ndarray], sums: Mapping[str, float] | None = None) -> float:
    """L2 norm over all floating arrays (float64 where the one-pass sum could overflow); `sums`: sums of squares
    already known (from `check_arrays`)."""
    total = 0.0
    for name, nd in arrays.items():
        if nd.dtype.kind in "fc":
            fast = sums[name] if sums is not None and name in sums else _sum_of_squares(nd)
            total += fast if fast is not None else float(
                np.sum(np.abs(nd.astype(np.complex128 if nd.dtype.kind == "c" else np.float64)) ** 2))
    return math.sqrt(total)


def examples(content: RecordDict, weight_key: str) -> float | Rejection:
    """The reply's example count (its aggregation weight): exactly one MetricRecord holding a finite, positive,
    integral scalar under `weight_key`, every other metric a finite number or list of them."""
    found = list(records(content, MetricRecord).values())
    if len(found) != 1:
        return Rejection("metrics", f"{len(found)} MetricRecords, expected exactly one")
    metrics = found[0]
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            kind = "examples" if key == weight_key else "metrics"
            return Rejection(kind, f"metric '{key}' is {value!r}, not a finite number")
    if weight_key not in metrics:
        return Rejection("examples", f"no '{weight_key}' in the MetricRecord")
    count = metrics[weight_key]
    if isinstance(count, list) or count <= 0 or count != int(count):
        return Rejection("examples", f"'{weight_key}' is {count!r}, expected a positive integer")
    return float(count)


def check_audit(record: ConfigRecord) -> Rejection | None:
    """An audit record (fedsim.hook.audit_record) must hold float32 bytes of its shape and one label per sample."""
    try:
        shape = [int(s) for s in record["x_shape"]]
        if not shape or any(s <= 0 for s in shape) or any(s != v for s, v in zip(shape, record["x_shape"])):
            return Rejection("audit", f"audit x_shape {record['x_shape']!r} is not a list of positive integers")
        data, labels = record["x"], record["y"]
        if not isinstance(data, bytes) or len(data) != 4 * math.prod(shape):
            return Rejection("audit", f"audit x holds {len(data) if isinstance(data, bytes) else type(data).__name__}"
                                      f" bytes, expected {4 * math.prod(shape)} for shape {shape}")
        labels = labels if isinstance(labels, list) else [labels]
        if len(labels) != shape[0] or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            return Rejection("audit", f"audit y holds {len(labels)} values, expected {shape[0]} integer labels")
        if not np.isfinite(np.frombuffer(data, dtype=np.float32)).all():
            return Rejection("audit", "audit x holds non-finite values")
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        return Rejection("audit", f"malformed audit record ({type(err).__name__}: {str(err)[:120]})")
    return None


def check_client(record: ConfigRecord, arrays: Mapping[str, np.ndarray]) -> Rejection | None:
    """The client record's list of buffers names arrays of the reply (the partition id is the hook's business)."""
    buffers = record.get("buffers", [])
    if not isinstance(buffers, list) or not all(isinstance(b, str) and b in arrays for b in buffers):
        return Rejection("client", f"client record lists buffers {str(buffers)[:120]} that are not arrays of the reply")
    return None


def screen(contents: Sequence[RecordDict], reference: Mapping[str, Tensor] | None, *, arrayrecord_key: str,
           weight_key: str = "num-examples", audit_key: str | None = None, client_key: str | None = None,
           max_ratio: float = MAX_RATIO, scale: float = 0.0,
           optional: frozenset[str] = frozenset()) -> list[Rejection | None]:
    """The first problem of each reply's content (None: healthy). Sizes are compared across the replies that pass
    the other checks: a reply whose norm exceeds `max_ratio` times max(the round's lower median norm, `scale`)
    (the norm of the model sent) is huge, as is an example count over `max_ratio` times the median count. The
    lower median keeps a minority of hostile replies from moving the bar; `scale` keeps honest replies large next
    to many tiny ones (late FedSGD gradients of well-fit samples) from looking huge."""
    problems: list[Rejection | None] = []
    norms: dict[int, float] = {}
    counts: dict[int, float] = {}
    keysets: dict[int, frozenset] = {}
    for i, content in enumerate(contents):
        problems.append(None)
        array_records, configs = records(content, ArrayRecord), records(content, ConfigRecord)
        if len(array_records) != 1 or arrayrecord_key not in array_records:
            problems[i] = Rejection("shape", f"expected exactly one ArrayRecord '{arrayrecord_key}', got "
                                             f"{sorted(array_records)}")
            continue
        arrays = decode(array_records[arrayrecord_key])
        if isinstance(arrays, Rejection):
            problems[i] = arrays
            continue
        sums: dict[str, float] = {}
        problem = check_arrays(arrays, reference, optional, sums)
        if problem is None:
            count = examples(content, weight_key)
            problem = count if isinstance(count, Rejection) else None
        if problem is None and audit_key is not None and audit_key in configs:
            problem = check_audit(configs[audit_key])
        if problem is None and client_key is not None and client_key in configs:
            problem = check_client(configs[client_key], arrays)
        if problem is not None:
            problems[i] = problem
            continue
        norms[i], counts[i] = norm(arrays, sums), count
        keysets[i] = frozenset(next(iter(records(content, MetricRecord).values())).keys())
    if keysets:  # one set of metric keys for the round (FedAvg averages them key by key): the most common one wins
        usual = Counter(keysets.values()).most_common(1)[0][0]
        for i, keys in keysets.items():
            if keys != usual:
                problems[i] = Rejection("metrics", f"metric keys {sorted(keys)} differ from the round's {sorted(usual)}")
    healthy = [i for i in norms if problems[i] is None]
    for values, kind, what, floor in ((norms, "huge", "norm", scale), (counts, "examples", weight_key, 0.0)):
        bar = _lower_median([values[i] for i in healthy])
        if bar is None or max(bar, floor) <= 0:
            continue
        bar = max(bar, floor)
        for i in healthy:
            if problems[i] is None and values[i] > max_ratio * bar:
                problems[i] = Rejection(kind, f"{what} {values[i]:.3g} is over {max_ratio:g} x {bar:.3g} (the round's "
                                              f"median{', or the model' if what == 'norm' else ''})")
    return problems


def _lower_median(values: list[float]) -> float | None:
    return sorted(values)[(len(values) - 1) // 2] if values else None
