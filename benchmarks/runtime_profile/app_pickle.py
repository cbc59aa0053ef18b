"""Size and cost of pickling what Flower's Simulation Engine sends to a Ray actor with every message: a closure
holding the ClientApp (`flwr.server.superlink.fleet.vce.vce_api.start_vce`), with Ray's cloudpickle.

    PYTHONPATH=. python benchmarks/runtime_profile/app_pickle.py LABEL
"""
import time, sys, ray.cloudpickle as cp
from fedsim.client_app import app
def mk(client_app):
    def _load():
        if client_app: return client_app
    return _load
f = mk(app)   # Flower's run_simulation sends this closure with every message
b = cp.dumps(f)
def t(fn, n=300):
    fn(); s = time.thread_time()
    for _ in range(n): fn()
    return (time.thread_time() - s) / n * 1e3
print(sys.argv[1], "bytes", len(b), "dumps ms %.3f loads ms %.3f" % (t(lambda: cp.dumps(f)), t(lambda: cp.loads(b))))
