"""``iiotfl gateway``: one plant gateway joining a (remote) SuperLink.

This is the gateway container's entrypoint (``docker/gateway.Dockerfile``) and what
the local fleet starts in each gateway's network namespace, so both run the same code.

Contract:

1. **Check before joining**, each problem one line (exit code 2) naming the file or
   address and the fix: the CA certificate (readable PEM, not expired), the node key
   (an OpenSSH EC private key from ``iiotfl certs``), the data: ``--source gateway.yaml``, the
   gateway's own description of its data (``clients/sources``: a CSV export, an OPC UA server or
   an MQTT broker, mapped to the task's columns), or ``--data DIR`` for a CSV export with
   ``--task``, ``--sep`` and ``--column``.
2. **Link profile** (``--link nb_iot``; root, iproute2): a token bucket at the profile's
   uplink rate on the egress of ``--interface``, random loss with nftables, and with
   ``--shape-downlink`` an ingress policer at the downlink rate (the local fleet shapes
   the downlink on the host side of the veth instead). ``links.shaping.apply_link`` is also
   what the local fleet calls, so a container and a namespace get the same qdiscs.
3. **Reach the SuperLink**: a TCP connect, then a TLS handshake against the CA. An
   unreachable server is retried with exponential backoff (1 s doubling to 60 s, for
   ``--max-wait`` seconds, default forever): a plant's uplink goes down and comes back.
   A certificate that does not verify is a configuration error and ends the gateway.
4. **Run** ``flower-supernode`` with the CA, the node key and the node config
   (``partition-id``, ``data-spec``, ...). Its output is passed through; lines that mean
   a refused node key end the gateway with the fix; any other exit is restarted with
   the same backoff. A live source feeds the gateway's local store in the background
   meanwhile (``sources.collect``); the ClientApp reads the store, or re-reads the CSV
   export, every round.

``iiotfl gateway`` is :func:`add_arguments` + :func:`run`; :func:`main` parses and runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from iiotfl.clients import sources
from iiotfl.clients.processes import bin_env, leader_exited, spawn, stop_group
from iiotfl.compat.flower import LOG, ExitCode
from iiotfl.compat.supernode import CERT_ENV, KEY_ENV, POLL_MAX_ENV, POLL_MAX_S, POLL_MIN_S, RUNTIME_ENV
from iiotfl.links.profiles import LinkProfile, ProfileError
from iiotfl.links.profiles import link_profile as load_link_profile
from iiotfl.links.shaping import apply_link
from iiotfl.security.certs import CertsError, load_cert, load_node_key
from iiotfl.tasks import TASKS

BACKOFF_MAX_S = 60.0
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL for the SuperNode's process group


class GatewayError(RuntimeError):
    """Configuration the gateway cannot run with: one line with the fix."""


# -- checks -----------------------------------------------------------------------------
def check_ca(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise GatewayError(f"CA certificate {path} not found; copy ca.crt from the server's `iiotfl certs` directory")
    try:
        cert = load_cert(path)
    except CertsError as err:
        raise GatewayError(f"CA certificate {err}") from None
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise GatewayError(f"CA certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; create new "
                           "certificates with `iiotfl certs --force` and copy the new ca.crt")
    if cert.not_valid_before_utc > now:
        raise GatewayError(f"CA certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                           "UTC; check this gateway's clock")


def check_node_key(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise GatewayError(f"node key {path} not found; copy this gateway's key from `iiotfl certs DIR` "
                           "(DIR/gateways/gateway-<i>.key)")
    try:
        load_node_key(path)
    except CertsError as err:
        raise GatewayError(str(err)) from None


def check_client_cert(cert: str | Path, key: str | Path, ca: str | Path | None) -> None:
    """The TLS client certificate for the front: readable, a pair with its key, issued by ``ca``, valid now."""
    cert, key = Path(cert), Path(key)
    for path, what in ((cert, "client certificate"), (key, "client key")):
        if not path.is_file():
            raise GatewayError(f"{what} {path} not found; copy gateways/gateway-<i>.crt and gateway-<i>.tls.key "
                               "from the server's `iiotfl certs` directory")
    try:
        ssl.create_default_context(cafile=str(ca) if ca else None).load_cert_chain(str(cert), str(key))
        crt = load_cert(cert)
    except (ssl.SSLError, CertsError) as err:
        raise GatewayError(f"client certificate {cert} and key {key} cannot be used together ({err}); copy the "
                           "pair of one gateway from `iiotfl certs`") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not crt.not_valid_before_utc <= now <= crt.not_valid_after_utc:
        raise GatewayError(f"client certificate {cert} is not valid now (valid {crt.not_valid_before_utc:%Y-%m-%d} "
                           f"to {crt.not_valid_after_utc:%Y-%m-%d}); re-issue it with `iiotfl certs`")
    if ca:
        try:
            crt.verify_directly_issued_by(load_cert(ca))
        except (ValueError, TypeError, InvalidSignature, CertsError):
            raise GatewayError(f"client certificate {cert} is not issued by {ca}; copy the gateway's certificate "
                               "from the same `iiotfl certs` directory as ca.crt") from None


def data_spec(args: argparse.Namespace) -> sources.DataSpec | None:
    """This gateway's data description: ``--source FILE``, or ``--data DIR`` with ``--task``, ``--sep``
    and ``--column`` (written as JSON under ``--state-dir`` or ``~/.iiotfl/gateway`` for the ClientApp);
    None when it has neither (the ClientApp then uses the run config's data or ``--node-config``).
    Made once per gateway (the checks, each SuperNode start and the collector use it)."""
    if not hasattr(args, "data_spec"):
        args.data_spec = _data_spec(args)
    return args.data_spec


def _data_spec(args: argparse.Namespace) -> sources.DataSpec | None:
    if getattr(args, "source", None):
        if args.data:
            raise GatewayError("--source and --data both describe the data; give one (a CSV export goes into the "
                               "description as source: {kind: csv, path: ...})")
        spec = sources.load(args.source)
        if args.task and args.task != spec.task:
            raise GatewayError(f"--task {args.task} but {args.source} describes {spec.task} data; drop --task or fix "
                               "task: in the description")
        return spec
    if not args.data:
        if args.sep != "," or args.column:
            raise GatewayError("--sep and --column describe a CSV export: give it with --data DIR")
        return None
    path = Path(args.data)
    if not path.exists():
        raise GatewayError(f"data {path} not found; point --data at the plant's CSV file or export directory")
    home = Path(args.state_dir) if args.state_dir else Path.home() / ".iiotfl" / "gateway"
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return sources.spec.from_flags(args.task or "predictive_maintenance", str(path), args.sep, args.column,
                                   keep=home / f"data-{digest}.json")


def check_data(spec: sources.DataSpec, say=print) -> None:
    """The description against its task's default columns, its source's files and store, a CSV export's
    records; each problem one line (SpecError, DataMismatch, DataFormatError)."""
    for line in sources.check(spec, sources.spec.default_task(spec.task)):
        say(f"iiotfl gateway: data: {line}")


def link_profile(name: str) -> LinkProfile:
    try:
        return load_link_profile(name)
    except ProfileError as err:
        raise GatewayError(str(err).removeprefix("config: ")) from None


# -- reaching the SuperLink --------------------------------------------------------------------
def probe(superlink: str, ca: str | None, timeout: float = 5.0) -> None:
    """TCP connect and (with ``ca``) a verified TLS handshake; OSError if unreachable,
    GatewayError if the server is reachable but its certificate is wrong for us."""
    host, _, port = superlink.rpartition(":")
    host = host.strip("[]")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        if ca is None:
            return
        ctx = ssl.create_default_context(cafile=ca)
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as err:
            # something accepted the connection and closed it mid-handshake: a SuperLink
            # restarting behind a relay or load balancer, not a certificate problem
            raise ConnectionError(f"the connection was closed during the TLS handshake ({err})") from None
        except ssl.SSLCertVerificationError as err:
            why = err.verify_message or str(err)
            if "hostname" in why.lower() or "ip address mismatch" in why.lower():
                raise GatewayError(f"the SuperLink's certificate is not valid for {host} ({why}); re-run "
                                   f"`iiotfl certs --san {host}` on the server") from None
            raise GatewayError(f"the SuperLink at {superlink} has a certificate that does not verify against CA "
                               f"{ca} ({why}); copy the ca.crt of this SuperLink's `iiotfl certs`") from None
        except ssl.SSLError as err:
            raise GatewayError(f"TLS handshake with {superlink} failed ({err.reason or err}); is it a TLS "
                               "SuperLink? (a SuperLink started with --insecure needs --insecure here)") from None


def wait_for_superlink(superlink: str, ca: str | None, max_wait: float | None, say=print) -> None:
    started, delay = time.monotonic(), 1.0
    while True:
        try:
            probe(superlink, ca)
            return
        except OSError as err:
            waited = time.monotonic() - started
            if max_wait is not None and waited + delay > max_wait:
                raise GatewayError(f"cannot reach the SuperLink at {superlink} ({err.strerror or err}) for "
                                   f"{waited:.0f} s; check the address, the port and the plant's uplink") from None
            say(f"iiotfl gateway: cannot reach the SuperLink at {superlink} ({err.strerror or err}); "
                f"retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)


def supernode_failure(log: str) -> str | None:
    """What a ``flower-supernode`` log says went wrong with TLS or node authentication, in one
    line with the fix; None for anything else. The texts are in compat/flower.py's LOG table (flwr 1.42 exits with
    SUPERNODE_CONNECTION_ERROR, 305, for all of them)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in log.splitlines()]
    detail = next((lines[j + 1] for j, x in enumerate(lines[:-1])
                   if x.startswith(LOG["connect_failed"])), "")
    if LOG["cert_verify"] in log and ("mismatch" in detail or "not valid for" in detail):
        return (f"the SuperLink's certificate does not name the address this SuperNode dials ({detail}); "
                "re-create it with `iiotfl certs DIR --force --san ADDRESS`")
    if LOG["cert_verify"] in log or LOG["handshake"] in log:
        return (f"the SuperLink's certificate does not verify against this SuperNode's CA "
                f"({detail or 'TLS handshake'}); give it the ca.crt of the `iiotfl certs` directory that issued "
                "superlink.crt")
    if LOG["not_registered"] in log or LOG["activate_failed"] in log:
        return ("the SuperLink refused this node key: it is not registered ([code: 2004] Failed to activate "
                "SuperNode); register gateway-<i>.pub with `iiotfl certs DIR --register HOST:PORT`")
    if LOG["auth_required"] in log:
        return ("the SuperLink requires registered node keys (--enable-supernode-auth) and this SuperNode has none; "
                "start it with --auth-supernode-private-key gateway-<i>.key")
    if LOG["bad_key"] in log:
        return "its node key is not an OpenSSH EC private key; use gateway-<i>.key from `iiotfl certs`"
    if LOG["insecure"] in log and re.search(r"disconnected|reset by peer", detail):
        # a TLS SuperLink drops plaintext: "Server disconnected without sending a response." (or a reset)
        return (f"it ran without TLS (--insecure) and the SuperLink hung up ({detail}); a TLS SuperLink drops "
                "plaintext connections: start it with --root-certificates ca.crt")
    return None


# -- running the SuperNode -------------------------------------------------------------------
def supernode_argv(args: argparse.Namespace) -> list[str]:
    node_config = [f"partition-id={args.partition_id}", f"num-partitions={args.num_partitions}"]
    spec = data_spec(args)
    if spec is not None:
        node_config.append(f'data-spec="{spec.path}"')
    if getattr(args, "client_cert", None) and args.client_key and args.ca:
        # its certificate from the fleet's CA vouches for its run keys under strategy=mask (masking.Identity)
        node_config += [f'identity-cert="{Path(args.client_cert).resolve()}"',
                        f'identity-key="{Path(args.client_key).resolve()}"', f'identity-ca="{Path(args.ca).resolve()}"']
    node_config += args.node_config or []
    # Flower's SuperNode through compat/supernode.py: prompt exchange, the warm runtime, the client certificate
    argv = [sys.executable, "-m", "iiotfl.compat.supernode", "--superlink", args.superlink,
            "--node-config", " ".join(node_config), "--host", "127.0.0.1", "--port", str(args.clientappio_port)]
    if args.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(args.ca)]
    if args.key:
        argv += ["--auth-supernode-private-key", str(args.key)]
    return argv


def idle_poll(args: argparse.Namespace) -> float:
    """The longest wait between pulls of an idle gateway: ``--idle-poll``, else its link profile's."""
    if getattr(args, "idle_poll", None) is not None:
        return float(args.idle_poll)
    return link_profile(args.link).idle_poll_s if getattr(args, "link", None) else POLL_MAX_S


def supernode_env(args: argparse.Namespace) -> dict[str, str]:
    """What compat/supernode.py reads: the ClientApp runtime, the idle pull pace, and the client
    certificate and key (``--client-cert``, ``--client-key``) for mutual TLS."""
    env = {RUNTIME_ENV: getattr(args, "clientapp_runtime", "warm"), POLL_MAX_ENV: str(idle_poll(args))}
    if getattr(args, "client_cert", None):
        env.update({CERT_ENV: str(Path(args.client_cert).resolve()), KEY_ENV: str(Path(args.client_key).resolve())})
    return env


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _watch(proc: subprocess.Popen, lines: queue.Queue, tail: list[str], on_join) -> tuple[str | None, bool]:
    """Pass the SuperNode's output through until it exits, names a TLS / node-key failure, or gives up
    on a handshake; returns (that failure or None, whether it gave up). ``tail`` keeps its last lines;
    ``on_join()`` is called when the SuperNode says it joined."""
    while not leader_exited(proc):
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)
        del tail[:-200]
        if LOG["joined"] in line:
            on_join()
        elif LOG["error_block_end"] in line:
            why = supernode_failure("".join(tail))
            if why is not None:
                return why, False
        elif LOG["handshake_gave_up"] in line:
            # Flower gives up for good when a handshake fails, also when the SuperLink was
            # only down (EOF from a restarting server); the SuperNode then idles. End it:
            # supervise() probes the SuperLink (a real certificate problem is named there)
            # and starts it again.
            return None, True
    return None, False


def _run_supernode(argv: list[str], on_join, env: dict[str, str] | None = None) -> tuple[int, str | None]:
    """Run flower-supernode (and the SuperExec it starts) to its end; pass its output through.

    Returns (exit code, the one-line TLS / node-key failure or None); ``on_join()`` is called when it
    joins. flwr reports such a failure as a block ending in "For more information, visit ..." while
    its SuperExec keeps the output open and retries; the whole process group is ended there."""
    proc = spawn(argv, {**bin_env(), **(env or {})})  # it starts flower-superexec by name
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: list[str] = []
    try:
        why, lost = _watch(proc, lines, tail, on_join)
    finally:
        code = stop_group(proc, STOP_GRACE_S)  # its SuperExec too, before the leader is reaped
    while not lines.empty():
        tail.append(lines.get())
        sys.stdout.write(tail[-1])
    sys.stdout.flush()
    if lost:  # supervise() probes the SuperLink: a real certificate problem is named there
        return code or ExitCode.SUPERNODE_CONNECTION_ERROR, None
    if why is not None:
        return ExitCode.SUPERNODE_CONNECTION_ERROR, why
    return code, supernode_failure("".join(tail)) if code else None


def joined_marker(args: argparse.Namespace) -> Path | None:
    """The file that says this node key has joined this SuperLink before (``--state-dir``), so a
    gateway restarted while the SuperLink still holds its old session waits for it instead of
    taking the refusal for an unregistered key; None without ``--state-dir``."""
    if not args.state_dir:
        return None
    key = Path(args.key).read_bytes() if args.key else b"no-key"
    digest = hashlib.sha256(key + b"\0" + args.superlink.encode()).hexdigest()[:16]
    return Path(args.state_dir) / f"joined-{digest}"


def _remember(marker: Path | None) -> None:
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def supervise(args: argparse.Namespace, say=print) -> int:
    """Run flower-supernode until it ends on its own terms; restart it after failures."""
    marker = joined_marker(args)
    delay, joined_before = 1.0, marker is not None and marker.exists()

    def joined() -> None:
        nonlocal joined_before
        joined_before = True
        _remember(marker)

    while True:
        wait_for_superlink(args.superlink, None if args.insecure else str(args.ca), args.max_wait, say)
        started = time.monotonic()
        code, why = _run_supernode(supernode_argv(args), joined, supernode_env(args))
        if why and LOG["not_registered"] in why and joined_before:
            # this key joined before: the SuperLink still holds the session of the SuperNode
            # that died until its heartbeat expires (about a minute), then it takes the key again
            why = None
            say("iiotfl gateway: the SuperLink still holds this node's previous session; waiting for it to expire")
        if why:  # a refused key or certificate: no retry fixes it
            raise GatewayError(why)
        if code == 0:
            return 0
        if time.monotonic() - started > 300:
            delay = 1.0  # it ran a good while: a fresh outage, start the backoff again
        say(f"iiotfl gateway: flower-supernode exited with code {code}; restarting in {delay:.0f} s")
        time.sleep(delay)
        delay = min(2 * delay, BACKOFF_MAX_S)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``iiotfl gateway``, added to ``p``."""
    p.add_argument("--superlink", required=True, help="SuperLink Fleet API as host:port")
    p.add_argument("--ca", help="CA certificate (ca.crt from `iiotfl certs`)")
    p.add_argument("--key", help="this gateway's node key (gateways/gateway-<i>.key from `iiotfl certs`)")
    p.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink run with --insecure)")
    p.add_argument("--client-cert", help="this gateway's TLS client certificate (gateways/gateway-<i>.crt from "
                   "`iiotfl certs`), for a front that asks for one (mutual TLS)")
    p.add_argument("--client-key", help="its key (gateways/gateway-<i>.tls.key)")
    p.add_argument("--source", help="this gateway's data description (YAML: task, source csv | opcua | mqtt, "
                   "signals, store; docs/deployment.md)")
    p.add_argument("--data", help="the plant's CSV file or a directory of CSV files (re-read every round); the "
                   "simple case of --source")
    p.add_argument("--task", choices=sorted(TASKS), help="the schema of --data (default predictive_maintenance)")
    p.add_argument("--sep", default=",", help="the separator of --data's CSV files (default ,)")
    p.add_argument("--column", action="append", metavar="TASK_COLUMN=PLANT_COLUMN",
                   help="a column of --data named otherwise than the task's, e.g. --column unit=Maschine "
                   "(repeatable)")
    p.add_argument("--partition-id", type=int, default=0, help="this plant's index in the fleet")
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--link", help="link profile to apply with tc (configs/link/*.yaml), e.g. nb_iot")
    p.add_argument("--interface", default="eth0", help="interface the link profile shapes")
    p.add_argument("--shape-downlink", action="store_true", help="also police the downlink on --interface")
    p.add_argument("--node-config", action="append", help="extra key=value for the ClientApp (repeatable)")
    p.add_argument("--clientappio-port", type=int, default=9094)
    p.add_argument("--clientapp-runtime", choices=("warm", "cold"), default="warm",
                   help="warm (default): each message's ClientApp process is forked from one that has torch and "
                   "the app loaded; cold: Flower's own, a new flwr-clientapp process per message")
    p.add_argument("--idle-poll", type=float, default=None,
                   help="longest wait, in seconds, between an idle gateway's pulls (default: the --link profile's "
                   "idle_poll_s, else 3, Flower's own); after a message it polls every 0.5 s, slowing down")
    p.add_argument("--max-wait", type=float, default=None, help="give up after this many seconds unreachable")
    p.add_argument("--check", action="store_true", help="only check the inputs and apply the link, then exit")
    p.add_argument("--state-dir", help="where the gateway remembers that its key joined this SuperLink, so "
                   "after a restart it waits for the SuperLink to drop its old session (a container's own disk)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iiotfl gateway", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def _check_inputs(args: argparse.Namespace) -> None:
    if not args.insecure:
        if not args.ca:
            raise GatewayError("no --ca given; pass ca.crt from `iiotfl certs` (or --insecure for a SuperLink "
                               "started without TLS)")
        check_ca(args.ca)
    if args.key:
        check_node_key(args.key)
    if bool(args.client_cert) != bool(args.client_key):
        raise GatewayError("--client-cert and --client-key go together; pass both (gateways/gateway-<i>.crt and "
                           "gateway-<i>.tls.key from `iiotfl certs`)")
    if args.client_cert:
        if args.insecure:
            raise GatewayError("--client-cert needs TLS; drop --insecure")
        check_client_cert(args.client_cert, args.client_key, args.ca)
    spec = data_spec(args)
    if spec is not None:
        check_data(spec, _say)
    if not POLL_MIN_S <= idle_poll(args) <= 600:
        raise GatewayError(f"--idle-poll {idle_poll(args):g}: give seconds from {POLL_MIN_S:g} (the pace right after a "
                           "message) to 600")


def _shape_link(args: argparse.Namespace, say) -> None:
    link = link_profile(args.link)
    if os.geteuid() != 0 or shutil.which("tc") is None:
        raise GatewayError(f"--link {args.link} needs root and iproute2's tc (in a container: cap_add "
                           "NET_ADMIN)")
    try:
        applied = apply_link(link, args.interface, downlink=args.shape_downlink)
    except OSError as err:  # e.g. a kernel without the ingress policer (cls_matchall, act_police)
        raise GatewayError(f"cannot shape {args.interface} for --link {args.link}: {err}; load the missing "
                           "tc module on the host or leave out --shape-downlink / --link") from None
    for what in applied:
        say(f"iiotfl gateway: {what}")


def _stop(*_) -> None:  # `docker stop` / the fleet's teardown: end the SuperNode's process group too
    raise KeyboardInterrupt


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """``iiotfl gateway`` with parsed ``args``: check, shape, join and supervise; the exit code."""
    signal.signal(signal.SIGTERM, _stop)
    stop = threading.Event()
    try:
        _check_inputs(args)
        if args.link:
            _shape_link(args, _say)
        if args.check:
            return 0
        spec = data_spec(args)
        if spec is not None and spec.kind in sources.LIVE:  # the store fills while the SuperNode runs
            sources.collect(spec, stop, _say)
        return supervise(args, _say)
    except (GatewayError, sources.StoreError) as err:
        _say(f"error: {err}")
        return 2
    except ValueError as err:  # DataFormatError and friends already name the file and the fix
        _say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        stop.set()  # a live source's collector flushes what it holds into the store


def main(argv: list[str]) -> int:
    return run(parser().parse_args(argv))
