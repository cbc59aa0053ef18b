"""CPU time of each driver thread during a Ray run (100 clients x R rounds), sampled from /proc every
0.2 s, by thread; with a per-second line of the CPU share of Flower's message extractor and of the ServerApp thread.

    PYTHONPATH=. python benchmarks/runtime_profile/ray_threads.py [rounds] [overrides...] [switch=SECONDS]
"""
import sys, os, time, threading, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/benchmarks")
import torch; torch.set_num_threads(1)
from runtime_bench import overrides
from fedsim.api import run
from fedsim.runtime import quiet_flower
quiet_flower(False)
R = int(sys.argv[1]) if len(sys.argv) > 1 else 3
extra = [a for a in sys.argv[2:] if not a.startswith("switch=")]
for a in sys.argv[2:]:
    if a.startswith("switch="): sys.setswitchinterval(float(a[7:]))
tick = os.sysconf("SC_CLK_TCK")
def cpu(tid):
    try:
        f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick
    except OSError:
        return None
seen = {}
series = []
done = threading.Event()
def sample():
    while not done.is_set():
        ext = [t for t in threading.enumerate() if "add_messages_to_queue" in t.name]
        srv = [t for t in threading.enumerate() if "server_th" in t.name]
        series.append((time.perf_counter(), cpu(ext[0].native_id) if ext else None, cpu(srv[0].native_id) if srv else None))
        for t in threading.enumerate():
            if t.native_id:
                c = cpu(t.native_id)
                if c is not None:
                    seen[t.native_id] = (t.name, c)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True, name="sampler").start()
out = {}
def go():
    with tempfile.TemporaryDirectory() as d:
        out["res"] = run([*overrides(100, R), "runtime=ray", "runtime.cpus=2", "runtime.client_cpus=1", *extra], Path(d) / "r")
c0 = time.process_time()
go(); done.set()
res = out["res"]
print("driver CPU s %.1f; rounds %s; load %.1f" % (time.process_time() - c0, [round(r["seconds"], 3) for r in res.rounds], os.getloadavg()[0]))
agg = {}
for tid, (name, c) in seen.items():
    key = name.split(" ", 1)[-1] if "(" in name else name
    agg[key] = agg.get(key, 0) + c
t0 = series[0][0]
last = None
for t, e, v in series:
    if e is None: continue
    if last is None or t - last[0] >= 1.0:
        if last is not None:
            print(f"  t={t - t0:5.1f}s extractor {100 * (e - last[1]) / (t - last[0]):4.0f}% server thread {100 * ((v or 0) - (last[2] or 0)) / (t - last[0]):4.0f}%")
        last = (t, e, v)
for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:12]:
    print(f"  {v:7.2f} s  {k}")
