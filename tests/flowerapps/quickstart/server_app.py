"""quickstart: the ServerApp. With run config `audit-output` set, one statement wraps FedAvg in fedsim's hook."""

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from tests.flowerapps.quickstart.task import BATCH_SIZE, MEAN, STD, Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    if cfg.get("audit-output"):
        from fedsim import CuriousStrategy, Normalization, ThreatModel  # the wrapping statement:
        strategy = CuriousStrategy(strategy, yaml.safe_load(str(cfg["attacks"])), Net, ThreatModel(
            local_epochs=int(cfg["local-epochs"]), batch_size=BATCH_SIZE, lr=float(cfg["lr"]), momentum=0.9,
            normalization=Normalization(MEAN, STD)), output=str(cfg["audit-output"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": float(cfg["lr"])}),
                            num_rounds=int(cfg["num-server-rounds"]))
    torch.save(result.arrays.to_torch_state_dict(), str(cfg["final-path"]))
