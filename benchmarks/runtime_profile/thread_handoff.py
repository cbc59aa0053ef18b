"""Handing a client to a new thread per message (the inline grid before) against a waiting worker thread (now):
wall and CPU microseconds per hand-off of a call that does nothing.

    python benchmarks/runtime_profile/thread_handoff.py
"""
import threading, time, queue
def t(f, n=2000):
    s = time.perf_counter(); c = time.process_time()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6, (time.process_time() - c) / n * 1e6
def spawn():
    box = []; w = threading.Thread(target=lambda: box.append(1), daemon=True); w.start(); w.join(5.0)
print("thread per call (wall us, cpu us)", t(spawn))
q_in, q_out = queue.Queue(), queue.Queue()
def loop():
    while True:
        f = q_in.get(); q_out.put(f())
threading.Thread(target=loop, daemon=True).start()
def pooled():
    q_in.put(lambda: 1); q_out.get(timeout=5.0)
print("persistent worker (wall us, cpu us)", t(pooled))
