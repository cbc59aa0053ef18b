"""The user's ServerApp: plain FedAvg. With run config `curious-attack` set, one line wraps the strategy."""

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from tests.userapp.task import BATCH, LR, MEAN, MODELS, STD

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    model, clients = str(cfg["model"]), int(cfg["clients"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=clients,
                      min_train_nodes=clients)
    if cfg.get("curious-attack"):
        from fedsim import CuriousStrategy, Normalization, ThreatModel  # the wrapping line:
        attacks = yaml.safe_load(str(cfg["curious-attack"]))  # a name, or a name and knobs as in the CLI's YAML
        strategy = CuriousStrategy(strategy, attacks, MODELS[model], ThreatModel(
            batch_size=BATCH, local_steps=1, lr=LR, input_shape=(1, 8, 8), normalization=Normalization((MEAN,), (STD,))),
            output=str(cfg["curious-output"]))
    torch.manual_seed(0)
    result = strategy.start(grid, ArrayRecord(MODELS[model]().state_dict()), num_rounds=int(cfg["rounds"]),
                            train_config=ConfigRecord({"model": model, "lr": LR}))
    torch.save(result.arrays.to_torch_state_dict(), str(cfg["final-path"]))
