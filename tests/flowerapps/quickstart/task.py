"""quickstart: the model, the data and the training loop (no Flower, no fedsim)."""

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, ToTensor

BATCH_SIZE = 8
EXAMPLES = 16          # training images per client: two batches per epoch
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Net(nn.Module):
    """LeNet-style CNN for 32x32 RGB images (as in quickstart-pytorch)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


pytorch_transforms = Compose([ToTensor(), Normalize(MEAN, STD)])


class Photos(Dataset):
    """32x32 crops of the photographs scikit-learn ships, as PIL images, transformed on access like a Flower
    Datasets partition with `with_transform`."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, label = self.items[i]
        return {"img": self.transform(image), "label": label}


def _crops():
    crops = []
    for photo in load_sample_images().images:
        for top in range(0, 320, 40):
            for left in range(0, 600, 40):
                crops.append(Image.fromarray(np.ascontiguousarray(photo[top:top + 32, left:left + 32])))
    order = np.random.default_rng(0).permutation(len(crops))
    return [(crops[i], int(i) % 10) for i in order]


def load_data(partition_id: int, num_partitions: int):
    crops = _crops()
    train = crops[partition_id * EXAMPLES:(partition_id + 1) * EXAMPLES]
    test = crops[-32:]
    trainloader = DataLoader(Photos(train, pytorch_transforms), batch_size=BATCH_SIZE, shuffle=True)
    return trainloader, DataLoader(Photos(test, pytorch_transforms), batch_size=32)


def train(net, trainloader, epochs, lr):
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader):
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for batch in testloader:
            outputs = net(batch["img"])
            loss += criterion(outputs, batch["label"]).item()
            correct += (outputs.argmax(1) == batch["label"]).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
