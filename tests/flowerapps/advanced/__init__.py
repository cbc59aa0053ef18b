"""Shaped like Flower's advanced-pytorch: a FedAvg subclass with its own start() (results file, best-model
checkpoints, a learning-rate schedule), clients that keep a personalised head in their context, central evaluation."""
