"""Shared fixtures: a tiny offline world generated once per session, an isolated cache."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Text-embedding caches go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("MMTARD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmtard-cache"))
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and oversubscribed OpenMP threads on a busy 2-core
    machine make each step ten times slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from mmtard.world import generate_world

    root = tmp_path_factory.mktemp("world") / "world"
    generate_world(root, seed=0, size="test")
    return root
