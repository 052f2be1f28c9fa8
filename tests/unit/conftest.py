"""The fast unit suite (``pytest tests/unit``): no test here may start a fleet or take long."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and "tests/unit/" in str(item.fspath):
            raise pytest.UsageError(f"{item.nodeid} is marked slow; end-to-end tests belong in tests/e2e/")
