"""A user's own small Flower app (no fedsim inside): digits classification with an FC net or a CNN."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

MEAN, STD = 0.305, 0.376   # the user's own input normalisation
BATCH = 8                  # each client holds one batch: one local epoch is one SGD step
LR = 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


MODELS = {"fc": Net, "cnn": ConvNet}


def load_partition(partition_id: int):
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    idx = order[partition_id * BATCH:(partition_id + 1) * BATCH]
    x = torch.tensor(digits.images[idx] / 16.0, dtype=torch.float32)[:, None]
    return (x - MEAN) / STD, torch.tensor(digits.target[idx])


def train(net, x, y, lr, epochs=1):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(net(xb), yb).backward()
            optimizer.step()
