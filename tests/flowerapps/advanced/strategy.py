"""advanced: a FedAvg subclass with extra methods and its own start(), which writes the strategy's own outputs."""

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result



class CustomFedAvg(FedAvg):
    """FedAvg that halves the learning rate from round 2, keeps a results file and the best model's checkpoints."""

    def set_save_path(self, path: Path) -> None:
        self.save_path = Path(path)
        self.save_path.mkdir(parents=True, exist_ok=True)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if server_round >= 2:
            config["lr"] = config["lr"] * 0.5
        return super().configure_train(server_round, arrays, config, grid)

    def update_best(self, server_round: int, accuracy: float, arrays: ArrayRecord) -> None:
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            torch.save(arrays.to_torch_state_dict(), self.save_path / f"best_round{server_round}.pt")

    def save_results(self, server_round: int, result: Result) -> None:
        rows = json.loads((self.save_path / "results.json").read_text()) if server_round > 1 else []
        rows.append({"round": server_round,
                     "train": dict(result.train_metrics_clientapp.get(server_round, {})),
                     "evaluate_serverapp": dict(result.evaluate_metrics_serverapp.get(server_round, {}))})
        (self.save_path / "results.json").write_text(json.dumps(rows))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        self.best_accuracy = 0.0
        train_config = ConfigRecord() if train_config is None else train_config
        result, arrays = Result(), initial_arrays
        for server_round in range(1, num_rounds + 1):
            replies = grid.send_and_receive(self.configure_train(server_round, arrays, train_config, grid),
                                            timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if evaluate_fn is not None:
                metrics = evaluate_fn(server_round, arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = metrics
                    self.update_best(server_round, metrics["accuracy"], arrays)
            self.save_results(server_round, result)
        return result
