"""End-to-end tests (``pytest tests/e2e``): real Flower processes, real links, real keys. Every test
here is marked ``slow`` so that ``-m "not slow"`` is the fast unit suite."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
