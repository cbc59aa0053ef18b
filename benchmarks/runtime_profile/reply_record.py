"""Building a reply's ArrayRecord from the benchmark's model (MLP 64-256-256-10): Flower's `ArrayRecord(state_dict)`
against `fedsim.arrays.to_record` (checked byte for byte first), thread CPU time per record.

    PYTHONPATH=. python benchmarks/runtime_profile/reply_record.py
"""
import time, numpy as np, torch
from flwr.app import ArrayRecord, Array
from fedsim.arrays import to_record, to_array
m = torch.nn.Sequential(torch.nn.Linear(64,256), torch.nn.ReLU(), torch.nn.Linear(256,256), torch.nn.ReLU(), torch.nn.Linear(256,10))
sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
a, b = ArrayRecord(sd), to_record(sd)
assert list(a) == list(b) and all(a[k].data == b[k].data and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].stype == b[k].stype for k in a)
for x in [np.zeros((3,), np.int64), np.ones((2, 3), np.float64), np.zeros((0, 4), np.float32), np.arange(6, dtype=np.uint8).reshape(2, 3)]:
    assert to_array(x).data == Array(x).data
def t(f, n=1000):
    f(); s = time.thread_time()
    for _ in range(n): f()
    return (time.thread_time() - s) / n * 1e6
for _ in range(2):
    print("ArrayRecord(sd) %.0f us, to_record %.0f us" % (t(lambda: ArrayRecord(sd)), t(lambda: to_record(sd))))
