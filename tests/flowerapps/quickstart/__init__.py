"""Shaped like Flower's quickstart-pytorch: a LeNet-style CNN on 32x32 RGB images with torchvision transforms."""
