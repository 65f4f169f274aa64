"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import pytest

from lib.config import SAMPLE_CSV
from tests.support.kaggle_server import SECRET, FakeKaggle


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with FakeKaggle(csv_bytes=SAMPLE_CSV.read_bytes(), username="alice", key=SECRET) as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        # The client's `localhost:7777` goes through the fake (a proxy); Prefect's own API on
        # 127.0.0.1 must not.
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("KAGGLE_USERNAME", "alice")
        monkeypatch.setenv("KAGGLE_KEY", SECRET)
        yield fake
