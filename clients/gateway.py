"""``iiotfl gateway``: one plant gateway joining a (remote) SuperLink.

This is the gateway container's entrypoint (``docker/gateway.Dockerfile``) and what
the local fleet starts in each gateway's network namespace, so both run the same code.

Contract:

1. **Check before joining**, each problem one line (exit code 2) naming the file or
   address and the fix: the CA certificate (readable PEM, not expired), the node key
   (an OpenSSH EC private key from ``iiotfl certs``), the data (``--data``: a CSV file or
   a directory of them, in the schema of ``tasks/predictive_maintenance/loader.py``).
2. **Link profile** (``--link nb_iot``; root, iproute2): a token bucket at the profile's
   uplink rate on the egress of ``--interface``, random loss with nftables, and with
   ``--shape-downlink`` an ingress policer at the downlink rate (the local fleet shapes
   the downlink on the host side of the veth instead). :func:`apply_link` is also what
   the local fleet calls, so a container and a namespace get the same qdiscs.
3. **Reach the SuperLink**: a TCP connect, then a TLS handshake against the CA. An
   unreachable server is retried with exponential backoff (1 s doubling to 60 s, for
   ``--max-wait`` seconds, default forever): a plant's uplink goes down and comes back.
   A certificate that does not verify is a configuration error and ends the gateway.
4. **Run** ``flower-supernode`` with the CA, the node key and the node config
   (``partition-id``, ``data-path``, ...). Its output is passed through; lines that mean
   a refused node key end the gateway with the fix; any other exit is restarted with
   the same backoff. The data directory is re-read by the ClientApp every round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from iiotfl.links.profiles import LinkProfile, ProfileError, _link, _load

BIN = Path(sys.executable).parent
BACKOFF_MAX_S = 60.0


class GatewayError(RuntimeError):
    """Configuration the gateway cannot run with: one line with the fix."""


# -- checks -----------------------------------------------------------------------------
def check_ca(path: str | Path) -> None:
    from iiotfl.security.certs import CertsError, load_cert

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
    from iiotfl.security.certs import CertsError, load_node_key

    path = Path(path)
    if not path.is_file():
        raise GatewayError(f"node key {path} not found; copy this gateway's key from `iiotfl certs DIR` "
                           "(DIR/gateways/gateway-<i>.key)")
    try:
        load_node_key(path)
    except CertsError as err:
        raise GatewayError(str(err)) from None


def check_data(path: str | Path) -> None:
    from iiotfl.tasks.predictive_maintenance.loader import load_csv

    path = Path(path)
    if not path.exists():
        raise GatewayError(f"data {path} not found; point --data at the plant's CSV file or export directory")
    load_csv(path)  # DataFormatError: one line with file, row, column and fix


def link_profile(name: str) -> LinkProfile:
    try:
        return _link(_load("link", name))
    except ProfileError as err:
        raise GatewayError(str(err).removeprefix("config: ")) from None


# -- the link ------------------------------------------------------------------------------
def apply_link(link: LinkProfile, interface: str, netns: str | None = None, downlink: bool = False) -> list[str]:
    """Shape ``interface`` (in ``netns``, or here) for ``link``; returns what was applied."""
    from iiotfl.links import shaping

    if not link.shaped:
        return []
    done = [f"uplink tbf {link.up_kbit:g} kbit/s on {interface}"]
    shaping.shape(interface, link.up_kbit, netns=netns)
    if downlink:
        pre = ["-n", netns] if netns else []
        rate = f"{link.down_kbit:.3f}kbit"
        burst = str(max(1600, int(link.down_kbit * 1000 / 8 / 100)))
        shaping._tc(*pre, "qdisc", "replace", "dev", interface, "handle", "ffff:", "ingress")
        shaping._tc(*pre, "filter", "replace", "dev", interface, "parent", "ffff:", "matchall", "action", "police",
                  "rate", rate, "burst", burst, "drop")
        done.append(f"downlink police {link.down_kbit:g} kbit/s on {interface}")
    if link.loss_pct > 0:
        if shaping.drop_randomly(netns, interface, link.loss_pct):
            done.append(f"loss {link.loss_pct:g}% (nftables)")
    return done


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
    line with the fix; None for anything else. The texts are flwr 1.42's (exit code 305)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in log.splitlines()]
    detail = next((lines[j + 1] for j, x in enumerate(lines[:-1])
                   if x.startswith("Failed to initialize the connection to the SuperLink")), "")
    if "CERTIFICATE_VERIFY_FAILED" in log and ("mismatch" in detail or "not valid for" in detail):
        return (f"the SuperLink's certificate does not name the address this SuperNode dials ({detail}); "
                "re-create it with `iiotfl certs DIR --force --san ADDRESS`")
    if "CERTIFICATE_VERIFY_FAILED" in log or "SSL/TLS handshake error" in log:
        return (f"the SuperLink's certificate does not verify against this SuperNode's CA ({detail or 'TLS handshake'}); "
                "give it the ca.crt of the `iiotfl certs` directory that issued superlink.crt")
    if "[code: 2004]" in log or "Failed to activate SuperNode" in log:
        return ("the SuperLink refused this node key: it is not registered ([code: 2004] Failed to activate SuperNode); "
                "register gateway-<i>.pub with `iiotfl certs DIR --register HOST:PORT`")
    if "[code: 2001]" in log:
        return ("the SuperLink requires registered node keys (--enable-supernode-auth) and this SuperNode has none; "
                "start it with --auth-supernode-private-key gateway-<i>.key")
    if "Unable to parse the private key file" in log:
        return "its node key is not an OpenSSH EC private key; use gateway-<i>.key from `iiotfl certs`"
    if "Option `--insecure` was set" in log and re.search(r"disconnected|reset by peer", detail):
        # a TLS SuperLink drops plaintext: "Server disconnected without sending a response." (or a reset)
        return (f"it ran without TLS (--insecure) and the SuperLink hung up ({detail}); a TLS SuperLink drops "
                "plaintext connections: start it with --root-certificates ca.crt")
    return None


# -- running the SuperNode -------------------------------------------------------------------
def supernode_argv(args: argparse.Namespace) -> list[str]:
    node_config = [f"partition-id={args.partition_id}", f"num-partitions={args.num_partitions}"]
    if args.data:
        node_config.append(f'data-path="{Path(args.data).resolve()}"')
    node_config += args.node_config or []
    argv = [str(BIN / "flower-supernode"), "--superlink", args.superlink, "--node-config", " ".join(node_config),
            "--host", "127.0.0.1", "--port", str(args.clientappio_port)]
    if args.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(args.ca)]
    if args.key:
        argv += ["--auth-supernode-private-key", str(args.key)]
    return argv


def _run_supernode(argv: list[str]) -> tuple[int, str | None, bool]:
    """Run flower-supernode (and the SuperExec it starts) to its end; pass its output through.

    Returns (exit code, the one-line TLS / node-key failure or None, whether it joined). flwr reports such a
    failure as a block ending in "For more information, visit ..." while its SuperExec keeps
    the output open and retries; the whole process group is ended there."""
    import queue
    import signal
    import threading

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it starts flower-superexec by name
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] and None, daemon=True).start()
    tail: list[str] = []
    why, lost = None, False

    def exited() -> bool:  # without reaping: while the leader is a zombie its pid (the group id) is not reused
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    try:
        while not exited() and why is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            tail = (tail + [line])[-200:]
            if "For more information, visit" in line:
                why = supernode_failure("".join(tail))
            elif "SSL/TLS handshake error detected" in line:
                # Flower gives up for good when a handshake fails, also when the SuperLink was
                # only down (EOF from a restarting server); the SuperNode then idles. End it:
                # supervise() probes the SuperLink (a real certificate problem is named there)
                # and starts it again.
                lost = True
                break
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # its SuperExec too, before the leader is reaped
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.1)
            if not _group_alive(proc.pid):
                break
        code = proc.wait()
    while not lines.empty():
        tail.append(lines.get())
        sys.stdout.write(tail[-1])
    sys.stdout.flush()
    joined = any("SuperNode ID:" in x for x in tail)
    if lost:  # supervise() probes the SuperLink: a real certificate problem is named there
        return code or 305, None, joined
    if why is not None:
        return 305, why, joined
    return code, supernode_failure("".join(tail)) if code else None, joined


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than its (zombie) leader still runs."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def supervise(args: argparse.Namespace, say=print) -> int:
    """Run flower-supernode until it ends on its own terms; restart it after failures."""
    delay, joined_before = 1.0, False
    while True:
        wait_for_superlink(args.superlink, None if args.insecure else str(args.ca), args.max_wait, say)
        started = time.monotonic()
        code, why, joined = _run_supernode(supernode_argv(args))
        joined_before = joined_before or joined
        if why and "[code: 2004]" in why and joined_before:
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iiotfl gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--superlink", required=True, help="SuperLink Fleet API as host:port")
    p.add_argument("--ca", help="CA certificate (ca.crt from `iiotfl certs`)")
    p.add_argument("--key", help="this gateway's node key (gateways/gateway-<i>.key from `iiotfl certs`)")
    p.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink run with --insecure)")
    p.add_argument("--data", help="the plant's CSV file or a directory of CSV files (re-read every round)")
    p.add_argument("--partition-id", type=int, default=0, help="this plant's index in the fleet")
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--link", help="link profile to apply with tc (configs/link/*.yaml), e.g. nb_iot")
    p.add_argument("--interface", default="eth0", help="interface the link profile shapes")
    p.add_argument("--shape-downlink", action="store_true", help="also police the downlink on --interface")
    p.add_argument("--node-config", action="append", help="extra key=value for the ClientApp (repeatable)")
    p.add_argument("--clientappio-port", type=int, default=9094)
    p.add_argument("--max-wait", type=float, default=None, help="give up after this many seconds unreachable")
    p.add_argument("--check", action="store_true", help="only check the inputs and apply the link, then exit")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import signal

    def stop(*_):  # `docker stop` / the fleet's teardown: end the SuperNode's process group too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if not args.insecure:
            if not args.ca:
                raise GatewayError("no --ca given; pass ca.crt from `iiotfl certs` (or --insecure for a SuperLink "
                                   "started without TLS)")
            check_ca(args.ca)
        if args.key:
            check_node_key(args.key)
        if args.data:
            check_data(args.data)
        if args.link:
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
        if args.check:
            return 0
        return supervise(args, say)
    except GatewayError as err:
        say(f"error: {err}")
        return 2
    except ValueError as err:  # DataFormatError and friends already name the file and the fix
        say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        return 130
