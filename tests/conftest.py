"""Shared pytest configuration."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (registered in pyproject.toml) are skipped where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
