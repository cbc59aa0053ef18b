"""advanced: the model, the data and the training loop (no Flower, no fedsim)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 8
EXAMPLES = 32          # training samples per client: 4 batches per epoch
MEAN, STD = 0.305, 0.376


class Net(nn.Module):
    """An MLP on 8x8 digits; `head` is personalised (each client keeps its own)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _digits():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    x = (torch.tensor(digits.images[order] / 16.0, dtype=torch.float32)[:, None] - MEAN) / STD
    return x, torch.tensor(digits.target[order])


def load_data(partition_id: int):
    x, y = _digits()
    part = slice(partition_id * EXAMPLES, (partition_id + 1) * EXAMPLES)
    return DataLoader(TensorDataset(x[part], y[part]), batch_size=BATCH_SIZE, shuffle=True)


def load_centralized_testset():
    x, y = _digits()
    return DataLoader(TensorDataset(x[-200:], y[-200:]), batch_size=100)


def train(net, trainloader, epochs, lr):
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item()
    return total / (epochs * len(trainloader))


def test(net, testloader):
    criterion = nn.CrossEntropyLoss()
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
