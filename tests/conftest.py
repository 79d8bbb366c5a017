"""Fixtures shared by test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread, as in the tests' subprocesses (OMP_NUM_THREADS=1): bitwise comparable
    runs, and on a loaded 2-core machine much faster for tiny tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def base_cache(tmp_path_factory, monkeypatch):
    """Study bases are cached in a fresh folder per test, never in ~/.cache."""
    folder = tmp_path_factory.mktemp("stablemdm-cache")
    monkeypatch.setenv("STABLEMDM_CACHE", str(folder))
    return folder / "bases"
