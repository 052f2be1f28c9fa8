"""compat/flower.py reaches Flower's internal and moving names from one place; this test fails,
naming the name and the module, when the pinned flwr moves one of them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import flwr
import pytest

COMPAT = Path(__file__).resolve().parents[2] / "compat" / "flower.py"


def _reaches() -> list[tuple[str, str]]:
    """(module, name) of every ``from flwr... import name`` in compat/flower.py, nested ones included."""
    tree = ast.parse(COMPAT.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flwr")
            for alias in node.names]


@pytest.mark.parametrize("module, name", _reaches())
def test_every_flower_name_the_project_reaches_is_where_compat_expects_it(module, name):
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"flwr {flwr.__version__} moved or removed {module}.{name} ({err}); compat/flower.py pins "
                    f"where iiotfl reaches it: find its new place and update that module")
    assert found is not None


def test_the_parsers_accept_what_the_fleet_passes():
    from iiotfl.compat.flower import superlink_parser, supernode_parser

    sl = superlink_parser().parse_args(["--insecure", "--fleet-api-address", "127.0.0.1:1"])
    sn = supernode_parser().parse_args(["--insecure", "--superlink", "127.0.0.1:1"])
    assert sl.insecure and sn.superlink == "127.0.0.1:1"


def test_no_other_module_of_the_project_reaches_flower_internals():
    """Outside compat/, project code imports only Flower's public Message-API and legacy packages."""
    root = COMPAT.parents[1]
    private = ("flwr.supercore", "flwr.compat", "flwr.common.secure_aggregation", "flwr.superlink", "flwr.supernode",
               "flwr.cli", "flwr.client.mod")
    offenders = []
    for folder in ("configs", "tasks", "strategies", "links", "security", "privacy", "clients", "server"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and any(
                        node.module == p or node.module.startswith(p + ".") for p in private):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} imports {node.module}")
    assert not offenders, "reach these through iiotfl.compat.flower:\n" + "\n".join(offenders)


# Log texts that come from outside flwr's own source: OpenSSL's verify error, and Flower's error
# codes, which its SuperNode prints as "[code: N]" from its error catalogue.
NOT_IN_FLWR_SOURCE = {"cert_verify", "not_registered", "auth_required"}


def test_every_log_text_the_project_matches_is_still_printed_by_flwr():
    import flwr

    from iiotfl.compat.flower import LOG

    source = "\n".join(p.read_text(errors="replace") for p in Path(flwr.__file__).parent.rglob("*.py"))
    moved = [f"{key}: {text!r}" for key, text in LOG.items() if key not in NOT_IN_FLWR_SOURCE
             and (text.split("(")[0].strip() if key == "run_started" else text) not in source]
    assert not moved, (f"flwr {flwr.__version__} no longer prints these texts that compat/flower.py's LOG matches; "
                       "find what it prints now and update the table:\n" + "\n".join(moved))


def test_the_error_codes_the_gateway_names_are_flowers():
    import flwr.supercore.error.base as errors

    from iiotfl.compat.flower import LOG

    codes = {int(LOG[key].strip("[]").split(":")[1]) for key in ("not_registered", "auth_required")}
    source = Path(errors.__file__).read_text()
    assert all(f"= {code}" in source for code in codes), f"flwr's error codes no longer include {codes}"
