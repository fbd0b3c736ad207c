"""End-to-end tests: whole simulated federations (Ray) and loopback deployments, seconds to minutes each. Every test
here is marked ``slow`` (``make test-fast`` leaves them out); shared fixtures stay in tests/conftest.py, shared code
in tests/support/ (``from support.helpers import ...``: pytest puts tests/ on the import path)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
