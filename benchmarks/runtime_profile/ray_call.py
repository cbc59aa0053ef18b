"""One Ray actor call carrying 340 KB each way (the benchmark's model) against an empty one, with Ray's default
inline limit (0.1 MiB: larger arguments and results go through the object store) or the one given (bytes).

    python benchmarks/runtime_profile/ray_call.py            # Ray's default
    python benchmarks/runtime_profile/ray_call.py 1048576    # what runtime.inline_mb sets
"""
import os, sys, time
if len(sys.argv) > 1: os.environ["RAY_max_direct_call_object_size"] = sys.argv[1]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray, pickle
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, object_store_memory=256 * 2**20)
@ray.remote(num_cpus=1)
class A:
    def run(self, payload): return payload
actors = [A.remote() for _ in range(2)]
ray.get([a.run.remote(b"") for a in actors])
payload = [os.urandom(262144), os.urandom(65536), os.urandom(10240)]
for label, p in (("empty", b""), ("340KB", payload)):
    for _ in range(20): ray.get(actors[0].run.remote(p))
    s = time.perf_counter(); c = time.process_time()
    for _ in range(200): ray.get(actors[0].run.remote(p))
    print(sys.argv[1:] or "default", label, "sequential ms/call wall %.2f driver cpu %.2f" % ((time.perf_counter() - s) * 5, (time.process_time() - c) * 5))
ray.shutdown()
