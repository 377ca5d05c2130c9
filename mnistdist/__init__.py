"""mnistdist: the classic MNIST MLP lesson as distributed training software."""

__version__ = "0.1.0"
