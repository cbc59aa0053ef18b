"""Client side of an inline round, one thread: 100 clients x R rounds through InlineGrid._deliver (no timeout
thread), CPU time per client. Then cProfile of the same. The bare work (loading the weights and `local_update`) is
timed the same way; "overhead" is the difference, per client message.

    PYTHONPATH=. python benchmarks/runtime_profile/client_message.py [rounds] [cProfile lines]
"""
import cProfile, pstats, sys, os, time, copy
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/benchmarks")
import torch, yaml
torch.set_num_threads(1)
from omegaconf import OmegaConf
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from runtime_bench import overrides
from fedsim.api import compose
from fedsim.config import validate
from fedsim.client_app import app
from fedsim.server_app import _shippable
from fedsim.runtime import InlineGrid
from fedsim.protocol import CONFIG_KEY, AUDIT_FLAG
from fedsim.models import build_model
from fedsim.data import load_dataset
from fedsim.training import local_update, seed_for, single_thread
from fedsim.data.partition import partition

R = int(sys.argv[1]) if len(sys.argv) > 1 else 3
raw = OmegaConf.to_container(compose(overrides(100, R)), resolve=True)
run = validate(raw)
cfg = yaml.safe_dump(_shippable(raw), sort_keys=False)
grid = InlineGrid(app, 100, {})
TaskIdentity.task_id = 1; TaskIdentity.run_id = grid.run_id; TaskIdentity.node_id = 0
bundle = load_dataset(run.data)
model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
arrays = ArrayRecord(model.state_dict())
nodes = list(grid.contexts)
def instructions(r):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({CONFIG_KEY: cfg, AUDIT_FLAG: False, "server-round": r})})
    out = []
    for n in nodes:
        m = Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
        m.metadata.__dict__["_message_id"] = "x"
        out.append(m)
    return out
# warm: query + one round
for m in instructions(1): grid._deliver(m)
def one_round(r):
    t = time.thread_time()
    for m in instructions(r): grid._deliver(m)
    return (time.thread_time() - t) / len(nodes) * 1e3
per = [one_round(r) for r in range(2, 2 + R)]
# the bare work: local_update only
parts = [torch.as_tensor(p) for p in partition(bundle.train_y, 100, run.partition, run.seed)]
sd = {k: v.clone() for k, v in model.state_dict().items()}
t = time.thread_time()
for r in range(2, 2 + R):
    with single_thread():
        for pid, p in enumerate(parts):
            model.load_state_dict(sd)
            gen = torch.Generator().manual_seed(seed_for(run.seed, r, pid))
            local_update(model, bundle.train_x[p], bundle.train_y[p], mode="fedavg", batch_size=8, local_steps=4, lr=0.1, gen=gen)
bare = (time.thread_time() - t) / R / 100 * 1e3
print(f"client message CPU ms/client: {[round(x, 3) for x in per]}; bare load+local_update {bare:.3f}; overhead {min(per) - bare:.3f}; load {os.getloadavg()[0]:.1f}")
if len(sys.argv) > 2:
    pr = cProfile.Profile(time.thread_time); pr.enable(); one_round(9); pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(int(sys.argv[2]))
    pstats.Stats(pr).sort_stats("cumulative").print_stats("flwr|fedsim|copy|numpy", 45)
