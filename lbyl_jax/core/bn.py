"""The one BatchNorm epsilon of the project (PyTorch's default, which every preset was trained with)."""

BN_EPS = 1e-5
