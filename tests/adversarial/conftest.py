"""The adversarial suite: one test per attack in docs/security.md, each asserting the refusal and
that nothing already written was lost. `pytest -m adversarial` runs it alone."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    for item in items:
        if "tests/adversarial/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)
