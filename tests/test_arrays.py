"""fedsim.arrays reads Flower's arrays to the same values as Flower, and FedAvg's mean keeps Flower's bits."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.arrays import to_array, to_numpy, to_record, to_state_dict
from fedsim.strategy import weighted_mean


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.random.default_rng(0).normal(size=(5, 3))),
    np.array(7, dtype=np.int64),
    np.zeros((0, 4), dtype=np.float16),
    np.array([True, False]),
    np.arange(6, dtype=">i4").reshape(2, 3),
])
def test_arrays_read_to_numpys_values_and_are_writable(value):
    array = Array(value)
    ours, flowers = to_numpy(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape and np.array_equal(ours, flowers)
    if ours.size:
        ours.flat[0] = 1 - ours.flat[0]      # writable, and a copy: the message's bytes are untouched
    assert np.array_equal(array.numpy(), value)


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.random.default_rng(0).normal(size=(5, 3))),
    np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],     # neither C- nor Fortran-ordered
    np.array(7, dtype=np.int64),
    np.zeros((0, 4), dtype=np.float16),
    np.array([True, False]),
    np.arange(6, dtype=">i4").reshape(2, 3),
    np.ones((1, 2, 3, 4), dtype=np.complex64),
])
def test_arrays_written_are_flowers_byte_for_byte(value):
    ours, flowers = to_array(value), Array(value)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                              flowers.data)
    assert np.array_equal(ours.numpy(), value)


def test_records_written_are_flowers_byte_for_byte():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen), "n": torch.tensor(3),
             "t": torch.randn(3, 5, generator=gen).t(), "e": torch.zeros(0, 2, dtype=torch.float16),
             "g": torch.randn(2, 2, generator=gen, requires_grad=True)}
    ours, flowers = to_record(state), ArrayRecord(state)
    assert list(ours) == list(flowers)
    for name in flowers:
        assert (ours[name].dtype, ours[name].shape, ours[name].stype, ours[name].data) == (
            flowers[name].dtype, flowers[name].shape, flowers[name].stype, flowers[name].data), name
    state["w"].add_(1.0)   # the record holds its own bytes
    assert torch.equal(to_state_dict(ours)["w"] + 1.0, state["w"])


def test_state_dicts_match_flowers():
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "n": torch.tensor(3)}
    record = ArrayRecord(state)
    ours, flowers = to_state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers) and all(torch.equal(ours[k], flowers[k]) for k in ours)


def test_fedavg_weighted_mean_is_flowers_to_the_bit():
    gen = torch.Generator().manual_seed(0)
    contents = [RecordDict({"arrays": ArrayRecord({"w": torch.randn(8, 5, generator=gen),
                                                   "b": torch.randn(8, generator=gen)}),
                            "metrics": MetricRecord({"num-examples": n})}) for n in (3, 7, 32, 1)]
    ours, flowers = weighted_mean(contents, "num-examples"), aggregate_arrayrecords(contents, "num-examples")
    assert all(ours[k].data == flowers[k].data for k in ("w", "b"))


def test_fedavg_metric_mean_is_flowers_to_the_bit():
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from fedsim.strategy import weighted_metrics

    contents = [RecordDict({"metrics": MetricRecord({"num-examples": n, "train_loss": 1 / (n + 0.3),
                                                    "acc": [0.1 * n, 3.0]})})
                for n in (3, 7, 32, 1)]
    ours, flowers = weighted_metrics(contents, "num-examples"), aggregate_metricrecords(contents, "num-examples")
    assert dict(ours) == dict(flowers) and "num-examples" not in ours


def test_records_reads_what_flowers_views_hold_and_changes_nothing():
    from flwr.app import ConfigRecord

    from fedsim.arrays import records

    content = RecordDict({"a": ArrayRecord({"w": torch.ones(2)}), "m": MetricRecord({"x": 1.0}),
                          "c": ConfigRecord({"k": "v"}), "c2": ConfigRecord({})})
    assert records(content, ArrayRecord) == dict(content.array_records)
    assert records(content, MetricRecord) == dict(content.metric_records)
    assert list(records(content, ConfigRecord)) == ["c", "c2"]
    assert list(content) == ["a", "m", "c", "c2"]


def test_a_read_only_view_shares_the_records_bytes():
    array = Array(np.arange(6, dtype=np.float32))
    view = to_numpy(array, copy=False)
    assert np.array_equal(view, array.numpy()) and not view.flags.writeable
