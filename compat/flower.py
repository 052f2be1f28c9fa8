"""Flower (flwr 1.42) names that are internal, legacy or moving, reached from one place.

Public Message-API names (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``) are imported
where they are used. What Flower keeps in ``flwr.supercore``, ``flwr.compat``,
``flwr.common.secure_aggregation`` or the SuperLink/SuperNode command-line modules may move
between releases; it is imported here only, and ``tests/unit/test_compat.py`` fails with
the name that moved when the pinned version changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flwr.app import Message, Metadata, RecordDict

# The legacy client mod that runs the SecAgg+ protocol on a gateway, and its record key.
from flwr.client.mod import secaggplus_mod

# Parsing a node-config string as the SuperNode does.
from flwr.common.config import parse_config_args
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

# Legacy FitIns/FitRes <-> RecordDict conversion (the SecAgg+ ClientApp handler).
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

# Client-level DP: the clipping-norm key Flower's client-side clipping mod reads.
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

# Flower's exit codes (flwr/supercore/exit/exit_code.py): decisions about Flower processes use them.
from flwr.supercore.exit.exit_code import ExitCode
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

# Privacy accounting (Flower's accountant, used by its DP wrappers and ours).
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

# What Flower 1.42 says only in its logs (no exit code tells these apart), in one table. The gateway
# (clients/gateway.py) and the launchers (server/launch/) match these and nothing else.
LOG = {
    "connect_failed": "Failed to initialize the connection to the SuperLink",  # next line: the reason
    "cert_verify": "CERTIFICATE_VERIFY_FAILED",                # the SuperLink's certificate did not verify
    "handshake": "SSL/TLS handshake error",                    # a TLS handshake failed ...
    "handshake_gave_up": "SSL/TLS handshake error detected",   # ... and the SuperNode stopped retrying
    "not_registered": "[code: 2004]",                          # the node key is not registered
    "activate_failed": "Failed to activate SuperNode",         # the same, in words
    "auth_required": "[code: 2001]",                           # the SuperLink wants a node key, none given
    "bad_key": "Unable to parse the private key file",         # the node key file is no OpenSSH EC key
    "insecure": "Option `--insecure` was set",                 # the SuperNode runs without TLS
    "error_block_end": "For more information, visit",          # the last line of an error block
    "joined": "SuperNode ID:",                                 # the SuperNode registered with the SuperLink
    "superlink_gone": "Connection to the SuperLink is unavailable",  # `flwr run` lost the SuperLink
    "run_started": r"Successfully started run (\d+)",          # `flwr run`: the run id (a regex)
}

__all__ = [
    "LOG", "ExitCode", "GaussianPrivacyEvent", "KEY_CLIPPING_NORM", "NeighboringRelation", "PrivacyConfig",
    "RECORD_KEY_CONFIGS",
    "RdpAccountant", "SamplingMethod", "arrayrecord_to_parameters", "fitres_to_recorddict", "public_key_to_bytes",
    "load_node_key_pair", "load_node_public_key", "message_with_metadata", "parse_config_args",
    "prompt_object_pulls", "secaggplus_mod", "task_pull_times", "TASK_PULL_ENV",
    "superlink_parser", "supernode_parser", "task_identity",
]


# Set by the warm runtime in each task's process (compat/warm_clientapp.py): "<began>,<ended>", the wall
# times of Flower's pull of the task's message, Context and FAB from the SuperNode.
TASK_PULL_ENV = "IIOTFL_TASK_PULL"


def task_pull_times() -> tuple[float, float] | None:
    """(began, ended) of this task's message pull when the warm runtime ran it; None otherwise."""
    import os

    try:
        began, ended = (float(x) for x in os.environ[TASK_PULL_ENV].split(","))
    except (KeyError, ValueError):
        return None
    return began, ended


def prompt_object_pulls(initial_s: float, cap_s: float) -> None:
    """Retry an object that is not there yet after ``initial_s``, doubling to ``cap_s`` (flwr 1.42: 1 s to 10 s).

    A message's metadata arrives before its objects: the SuperNode takes a message while the ServerApp
    is still pushing its arrays, and a ClientApp asks the SuperNode for them while the SuperNode is
    still pulling them over the link. Each "not yet" then costs 1 + 2 + 4 ... s of Flower's backoff,
    most of a round on a fast link. The keyword defaults of Flower's object pullers are set here for this
    process; every other argument stays Flower's."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if defaults is None or not {"initial_backoff", "backoff_cap"} <= defaults.keys():
            raise RuntimeError(f"flwr {fn.__module__}.{fn.__name__} no longer takes initial_backoff and backoff_cap")
        defaults.update(initial_backoff=initial_s, backoff_cap=cap_s)


def message_with_metadata(metadata: Metadata, content: RecordDict) -> Message:
    """A Message carrying ``content`` under an existing message's metadata: what a strategy hands the
    next Flower strategy in place of a reply. ``Message.__init__`` takes ``metadata=`` (for Flower's
    internal use), but its typed overloads leave it out."""
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]  # see the docstring


# The SuperLink's and SuperNode's own argument parsers (what a compose file or the fleet passes them)
# are imported when asked for: their modules load the whole SuperLink.

def superlink_parser() -> argparse.ArgumentParser:
    """``flower-superlink``'s own argument parser."""
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    return _parse_args_run_superlink()


def supernode_parser() -> argparse.ArgumentParser:
    """``flower-supernode``'s own argument parser."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return _parse_args_run_supernode()


def load_node_public_key(path: str | Path) -> bytes:
    """A node public key file as ``flwr supernode register`` loads it."""
    from flwr.cli.supernode.register import try_load_public_key

    return try_load_public_key(Path(path))


def load_node_key_pair(path: str | Path) -> tuple[Any, Any]:
    """(private, public) key of a node key file as ``flower-supernode --auth-supernode-private-key`` loads it."""
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pair = _try_setup_client_authentication(argparse.Namespace(auth_supernode_private_key=str(path),
                                                               auth_supernode_public_key=None))
    if pair is None:
        raise ValueError(f"{path}: flower-supernode loads no key pair from it")
    return pair


def task_identity():
    """Flower's per-process task identity (the run and node ids Messages take); tests set it."""
    from flwr.supercore.task_identity import TaskIdentity

    return TaskIdentity
