"""Flower apps written as Flower's own examples are (quickstart-pytorch, advanced-pytorch), with their data loading
replaced by data shipped inside installed packages. No fedsim inside but the lines that audit them."""
