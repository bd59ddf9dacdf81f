"""Fixtures shared by the store's unit tests (test_shards.py, test_checkpoint.py)."""

import pytest

from indexer.store.backends import TorchCudaBackend


@pytest.fixture
def torch_backend() -> TorchCudaBackend:
    """The torch-cuda backend's code, on CUDA where torch sees a GPU and on torch's CPU otherwise."""
    import torch

    return TorchCudaBackend(device="cuda" if torch.cuda.is_available() else "cpu")
