"""advanced: the ServerApp. With run config `audit-output` set, one statement wraps the custom strategy."""

from pathlib import Path

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from tests.flowerapps.advanced.strategy import CustomFedAvg
from tests.flowerapps.advanced.task import BATCH_SIZE, MEAN, STD, Net, load_centralized_testset, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_centralized_testset())
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = CustomFedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    if cfg.get("audit-output"):
        from fedsim import CuriousStrategy, Normalization, ThreatModel  # the wrapping statement:
        strategy = CuriousStrategy(strategy, yaml.safe_load(str(cfg["attacks"])), Net, ThreatModel(
            local_epochs=int(cfg["local-epochs"]), batch_size=BATCH_SIZE, lr_key="lr", momentum=0.9,
            normalization=Normalization((MEAN,), (STD,)), personal_layers=("head.*",)),
            output=str(cfg["audit-output"]))
    strategy.set_save_path(Path(str(cfg["save-path"])))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": float(cfg["lr"])}),
                            num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=central_evaluate)
    torch.save(result.arrays.to_torch_state_dict(), str(cfg["final-path"]))
