"""The OPC UA source: a machine's variables on an OPC UA server into the gateway's store.

Contract (the package's, see ``iiotfl.clients.sources``):

* ``run(spec, intake, stop)`` blocks in the calling thread (its own asyncio loop) until ``stop`` is
  set, and ends within about two seconds after it (a polite disconnect takes at most 2 s). It
  connects to ``source.endpoint`` with asyncua's ``Client``, resolves every mapped signal's
  ``name`` once per connection and feeds ``intake``.
* ``check(spec)`` makes the static checks of ``iiotfl gateway --check`` (security files readable
  PEM/DER, policy and mode known, password file readable, timeout a number); it raises
  :class:`~iiotfl.clients.sources.spec.SpecError` with one line naming the file, the key and the
  fix. ``run`` makes them too before it first connects.

Names. A signal's ``name`` is an OPC UA node id (``ns=2;s=Machine1.T24``, ``ns=2;i=1001``,
``nsu=urn:plant;s=T24``) or a browse path from the Objects folder, ``Machine1/T24`` or with namespace
indexes ``2:Machine1/2:T24`` (a segment without an index matches a browse name in any namespace).
A name that does not resolve to a variable is said once (naming the signal, what was not found and
the fix), left out, and shows as ``stale`` in the status; the other signals flow.

Modes (``source.mode``):

* ``subscribe``: one subscription, publishing interval ``interval_s``, every change sampled (sampling
  interval 0, a queue per monitored item, so a machine faster than the publishing interval loses no
  cycle; trigger StatusValueTimestamp, so a steady value the machine writes every cycle counts as
  updated and is not flagged stale; a server without that trigger reports value changes only).
  A publish notification's changes are put in source-timestamp order (the ``row_key`` signal last
  among equal times: the machine writes its cycle counter last) and given to
  ``intake.values({name: value, ...}, ts)`` in one call per ``row_key`` change, the changes after the
  last one in a further call (held by the intake until the next). ``ts`` is the latest source
  timestamp of the call's changes. So the records the intake assembles are the machine's cycles
  even when one notification holds several cycles, or a cycle's end and the next one's start.
* ``poll``: every ``interval_s`` one Read of all resolved nodes, one ``intake.values`` call with
  all of them, ``ts`` the newest source timestamp (else the gateway's clock).

Values: numbers and booleans become floats, strings stay text; a value of another type (arrays,
structures, null) is counted with ``intake.malformed("value type", ...)``, a value with a bad status
code with ``intake.malformed("bad status", ...)``; neither stops the source.

Security (``source.security``, optional)::

    security: {policy: Basic256Sha256, mode: SignAndEncrypt,     # or Sign
               certificate: pki/gateway-cert.pem, private_key: pki/gateway-key.pem,
               private_key_password_file: pki/key-pass,          # optional
               server_certificate: pki/plc-cert.der}             # optional, else the one the
                                                                 # server's endpoint offers
    username: gateway-7
    password_file: secrets/opcua-pass                             # first line is the password

Relative paths are relative to the description. The client's application URI is taken from the
certificate's subjectAltName URI, as servers compare the two.

Connection: an unreachable endpoint, a refused session, a lost connection or a subscription that
stops answering (no publish response, not even a keep-alive, for ``max(15, 3 x keep-alive)`` s)
is reported with ``intake.connected(False, "<endpoint>: <reason>; retrying in N s")`` and retried
with backoff from 1 s doubling to ``RETRY_MAX_S`` (env ``IIOTFL_SOURCE_RETRY_MAX_S`` overrides it);
``intake.connected(True, endpoint)`` once the signals are subscribed (or first read). Requests
time out after ``source.timeout_s`` (default 5 s). A failure of the intake itself (its store) is
not retried: ``run`` raises it, and ``collect`` says why the source stopped.

asyncua's own log (a traceback for every lost connection) is silenced unless the process
configures logging.

Speed: the notifications are read straight from the publish responses (no task or queue per
change); asyncua's decoding is most of the cost. ``python tests/opcua_machine.py --bench 10`` (a
machine in another process writing 16 variables as fast as asyncua's server publishes them) stored
12,000-14,000 readings/s, every one the server published, using 0.2-0.4 of a core: about 30,000-
60,000 readings per CPU-second, the server being the limit.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import re
import threading
import time
from contextlib import suppress
from operator import itemgetter
from pathlib import Path
from typing import Any, Awaitable, Iterable, Mapping, TypeVar

from asyncua import Client, Node, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iiotfl.clients.sources.intake import Intake, retry_max_s
from iiotfl.clients.sources.spec import DataSpec, SpecError

T = TypeVar("T")

NODE_ID = re.compile(r"^(ns=\d+;|nsu=[^;]+;)?[isgb]=")
POLICIES = tuple(sorted(n[len("SecurityPolicy"):] for n in dir(security_policies)
                        if n.startswith("SecurityPolicy") and n not in ("SecurityPolicy", "SecurityPolicyNone",
                                                                        "SecurityPolicyFactory")))
MODES = ("Sign", "SignAndEncrypt")
SECURITY_KEYS = {"policy", "mode", "certificate", "private_key", "private_key_password_file", "server_certificate"}
QUEUE_SIZE = 1000           # changes a server keeps per monitored item between two publish responses
KEEPALIVE_S = 5.0           # the server sends an empty publish response at least this often
POLL_STOP_S = 0.05          # how often the loop looks at ``stop``
WATCH_S = 0.2               # how often a connection's health is looked at


# -- static checks -------------------------------------------------------------------------------
def _fail(spec: DataSpec, key: str, what: str) -> SpecError:
    return SpecError(f"{spec.path}: source.{key}: {what}")


def _readable(spec: DataSpec, key: str, value: Any, what: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise _fail(spec, key, f"{value!r} is not a path; give {what}")
    path = spec.resolve(value)
    if not path.is_file():
        raise _fail(spec, key, f"{path} not found; give {what} (relative paths are relative to {spec.path.name})")
    try:
        path.read_bytes()
    except OSError as err:
        raise _fail(spec, key, f"{path} is not readable ({err.strerror}); let the gateway's user read it") from None
    return path


def _certificate(spec: DataSpec, key: str, value: Any, what: str) -> x509.Certificate:
    path = _readable(spec, key, value, what)
    data = path.read_bytes()
    for load in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
        try:
            return load(data)
        except ValueError:
            continue
    raise _fail(spec, key, f"{path} is not an X.509 certificate (PEM or DER); give {what}")


def _password(spec: DataSpec, key: str, value: Any) -> str:
    path = _readable(spec, key, value, "a file whose first line is the password")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(spec, key, f"{path} is not UTF-8 text; write the password as its first line") from None
    line = text.splitlines()[0] if text.splitlines() else ""
    if not line:
        raise _fail(spec, key, f"{path} is empty; write the password as its first line")
    return line


def _security(spec: DataSpec) -> dict[str, Any] | None:
    """The checked ``source.security`` (None: no security), paths resolved."""
    raw = spec.source.get("security")
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return None
    if not isinstance(raw, Mapping):
        raise _fail(spec, "security", f"{raw!r} is not a mapping; give {{policy: Basic256Sha256, mode: SignAndEncrypt, "
                    "certificate: <file>, private_key: <file>}} or leave it out")
    unknown = set(raw) - SECURITY_KEYS
    if unknown:
        raise _fail(spec, "security", f"unknown key(s) {sorted(unknown)}; it takes {sorted(SECURITY_KEYS)}")
    policy = str(raw.get("policy", "Basic256Sha256"))
    if policy not in POLICIES:
        raise _fail(spec, "security.policy", f"{policy!r} is not one of {list(POLICIES)} (Basic256Sha256 is what "
                    "most servers offer)")
    mode = str(raw.get("mode", "SignAndEncrypt"))
    if mode not in MODES:
        raise _fail(spec, "security.mode", f"{mode!r} is not one of {list(MODES)}")
    for key in ("certificate", "private_key"):
        if key not in raw:
            raise _fail(spec, f"security.{key}", f"missing; give this gateway's OPC UA client {key.replace('_', ' ')} "
                        "file (PEM or DER)")
    cert = _certificate(spec, "security.certificate", raw["certificate"],
                        "this gateway's OPC UA client certificate (PEM or DER)")
    key_pass = None
    if raw.get("private_key_password_file") is not None:
        key_pass = _password(spec, "security.private_key_password_file", raw["private_key_password_file"])
    key_path = _readable(spec, "security.private_key", raw["private_key"], "the client certificate's private key "
                         "(PEM or DER)")
    data = key_path.read_bytes()
    secret = key_pass.encode() if key_pass is not None else None
    why = "not a private key (PEM or DER)"
    for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            load(data, password=secret)
            break
        except TypeError:  # encrypted without a password, or a password for a plain key
            why = ("encrypted; give security.private_key_password_file" if secret is None else
                   "not encrypted; leave out security.private_key_password_file")
        except ValueError:
            continue
    else:
        raise _fail(spec, "security.private_key", f"{key_path}: {why}")
    server_cert = None
    if raw.get("server_certificate") is not None:
        _certificate(spec, "security.server_certificate", raw["server_certificate"],
                     "the server's certificate (PEM or DER), or leave it out to take the one its endpoint offers")
        server_cert = spec.resolve(raw["server_certificate"])
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {"policy": policy, "mode": mode, "certificate": spec.resolve(raw["certificate"]), "private_key": key_path,
            "private_key_password": key_pass, "server_certificate": server_cert,
            "application_uri": uris[0] if uris else None}


def _credentials(spec: DataSpec) -> tuple[str | None, str | None]:
    username = spec.source.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise _fail(spec, "username", f"{username!r} is not a user name")
    password_file = spec.source.get("password_file")
    if password_file is None:
        return username, None
    if username is None:
        raise _fail(spec, "password_file", "given without source.username; add the user name it belongs to")
    return username, _password(spec, "password_file", password_file)


def _timeout(spec: DataSpec) -> float:
    value = spec.source.get("timeout_s", 5.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(spec, "timeout_s", f"{value!r} is not a number > 0; e.g. timeout_s: 5")
    return float(value)


def check(spec: DataSpec) -> None:
    """The static checks of ``iiotfl gateway --check``: SpecError with one line, else None."""
    _timeout(spec)
    _credentials(spec)
    _security(spec)


# -- the source ----------------------------------------------------------------------------------
def run(spec: DataSpec, intake: Intake, stop: threading.Event) -> None:
    """Feed ``intake`` from the description's OPC UA server until ``stop`` is set."""
    check(spec)
    _quiet_asyncua()
    asyncio.run(_Source(spec, intake, stop).main())


def _quiet_asyncua() -> None:
    """asyncua logs a traceback for every lost connection and a warning for every revised setting;
    the source says what matters in one line. Left alone where the process configured logging (a
    handler on the root logger, or a level on asyncua's)."""
    log = logging.getLogger("asyncua")
    if log.level == logging.NOTSET and not logging.getLogger().handlers:
        log.setLevel(logging.CRITICAL)


class _Stopped(Exception):
    """``stop`` was set while the source waited."""


class _Fatal(Exception):
    """The intake failed (its store): not the server's fault, so not retried; ``run`` raises it."""

    def __init__(self, err: Exception) -> None:
        super().__init__(str(err))
        self.err = err


class _Feed(Subscription):
    """A subscription whose publish responses go to the source whole: the changes of one
    notification together, without a task or a queue entry per change."""

    def __init__(self, client: Client, params: ua.CreateSubscriptionParameters, source: "_Source") -> None:
        super().__init__(client.uaclient.session, params, None, queue_maxsize=1)
        self.source = source
        self.failed: ua.StatusCode | None = None
        self.fatal: Exception | None = None

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        message = publish_result.NotificationMessage
        if not message.NotificationData:
            return  # a keep-alive
        self.last_sequence_number = int(message.SequenceNumber)
        for notification in message.NotificationData:
            if isinstance(notification, ua.DataChangeNotification) and self.fatal is None:
                try:
                    self.source.changes(notification.MonitoredItems)
                except Exception as err:  # noqa: BLE001 - asyncua would log and drop it; _watch raises it
                    self.fatal = err
            elif isinstance(notification, ua.StatusChangeNotification) and notification.Status.is_bad():
                self.failed = notification.Status


class _Source:
    def __init__(self, spec: DataSpec, intake: Intake, stop: threading.Event) -> None:
        self.spec, self.intake, self.stop = spec, intake, stop
        self.endpoint: str = spec.source["endpoint"]
        self.mode: str = spec.source.get("mode", "subscribe")
        self.interval = float(spec.source.get("interval_s", 1.0))
        self.timeout = _timeout(spec)
        self.names = list(spec.by_name())  # the plant's names, each once
        self.keys = {s.name for s in spec.signals if spec.row_key is not None and s.column == spec.row_key}
        self.handles: dict[int, str] = {}  # client handle -> name
        self.told: set[str] = set()       # names already reported as unresolved
        self.stopped = asyncio.Event()

    # -- the loop ---------------------------------------------------------------------------
    async def main(self) -> None:
        watcher = asyncio.create_task(self._watch_stop())
        delay = 1.0
        try:
            while not self.stopped.is_set():
                client = Client(self.endpoint, timeout=self.timeout, watchdog_intervall=self.timeout)
                try:
                    await self._guard(self._connect(client), 3 * self.timeout)
                    if self.mode == "poll":
                        await self._poll(client)
                    else:
                        await self._subscribe(client)
                        await self._watch(client)
                    return
                except _Stopped:
                    return
                except _Fatal as fatal:
                    raise fatal.err from None
                except Exception as err:  # noqa: BLE001 - every failure of the server or the link is retried
                    reason = _reason(err, self.timeout)
                    if self.intake.up:
                        delay = 1.0  # it was connected: start the backoff again
                finally:
                    await self._close(client)
                if self.stopped.is_set():
                    return
                self.intake.connected(False, f"{self.endpoint}: {reason}; retrying in {delay:g} s")
                try:
                    await self._guard(asyncio.sleep(delay), None)
                except _Stopped:
                    return
                delay = min(delay * 2.0, retry_max_s())
        finally:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher

    async def _watch_stop(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(POLL_STOP_S)
        self.stopped.set()

    async def _guard(self, aw: Awaitable[T], timeout: float | None) -> T:
        """``aw``, ended early (:class:`_Stopped`) when ``stop`` is set, TimeoutError after ``timeout``."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stopped.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with suppress(BaseException):
            await task
        if self.stopped.is_set():
            raise _Stopped
        raise TimeoutError(f"no answer within {timeout:g} s")

    async def _close(self, client: Client) -> None:
        if client.uaclient.state is UaClientState.DISCONNECTED and not client.uaclient.has_transport:
            return
        with suppress(Exception):
            await asyncio.wait_for(client.disconnect(), min(self.timeout, 2.0))

    # -- connecting ---------------------------------------------------------------------------
    async def _connect(self, client: Client) -> None:
        username, password = _credentials(self.spec)
        if username is not None:
            client.set_user(username)
        if password is not None:
            client.set_password(password)
        security = _security(self.spec)
        if security is not None:
            if security["application_uri"]:
                client.application_uri = security["application_uri"]
            await client.set_security(
                getattr(security_policies, "SecurityPolicy" + security["policy"]),
                str(security["certificate"]), str(security["private_key"]), security["private_key_password"],
                str(security["server_certificate"]) if security["server_certificate"] else None,
                getattr(ua.MessageSecurityMode, security["mode"]))
        await client.connect()

    async def _resolve(self, client: Client) -> dict[str, Node]:
        """Each name's node; a name that does not resolve to a variable is said once and left out."""
        found: dict[str, Node] = {}
        missing: dict[str, str] = {}
        ids: list[tuple[str, Node]] = []
        namespaces: list[str] | None = None
        for name in self.names:
            if not NODE_ID.match(name):
                continue
            text = name
            if name.startswith("nsu="):  # a namespace URI: its index on this server
                uri, _, rest = name[4:].partition(";")
                namespaces = namespaces if namespaces is not None else await client.get_namespace_array()
                if uri not in namespaces:
                    missing[name] = f"the server has no namespace {uri!r} (it has {namespaces})"
                    continue
                text = f"ns={namespaces.index(uri)};{rest}"
            try:
                ids.append((name, client.get_node(text)))
            except (ua.UaError, ValueError):
                missing[name] = "not a valid node id (e.g. ns=2;s=Machine1.T24 or ns=2;i=1001)"
        if ids:
            classes = await client.read_attributes([n for _, n in ids], ua.AttributeIds.NodeClass)
            for (name, node), dv in zip(ids, classes):
                code = dv.StatusCode
                value = dv.Value.Value if dv.Value is not None else None
                if code is not None and not code.is_good():
                    missing[name] = f"the server answers {code.name}"
                elif value != ua.NodeClass.Variable:
                    try:
                        what = ua.NodeClass(value).name if isinstance(value, int) else "unknown"
                    except ValueError:
                        what = "unknown"
                    missing[name] = f"it is a{'n' if what[:1] in 'AEIOU' else ''} {what} node, not a variable"
                else:
                    found[name] = node
        children: dict[str, list[ua.ReferenceDescription]] = {}
        for name in self.names:
            if name in found or name in missing:
                continue
            node_id, why = await self._walk(client, name, children)
            if node_id is None:
                missing[name] = why
            else:
                found[name] = client.get_node(node_id)
        for name, why in missing.items():
            if name not in self.told:
                self.told.add(name)
                columns = ", ".join(f"signals.{s.column}" for s in self.spec.by_name()[name])
                self.intake.say(f"iiotfl gateway: OPC UA node {name!r} ({columns}) not found on {self.endpoint}: "
                                f"{why}; fix {columns} in {self.spec.path} (a node id like ns=2;s=Machine1.T24 or a "
                                "browse path like 2:Machine1/2:T24 from the Objects folder); the other signals are "
                                "read, this one shows as stale in the status")
        return found

    async def _walk(self, client: Client, path: str,
                    children: dict[str, list[ua.ReferenceDescription]]) -> tuple[ua.NodeId | None, str]:
        parts = [p for p in path.strip().strip("/").split("/") if p]
        if parts and parts[0] in ("Objects", "0:Objects"):
            parts = parts[1:]
        node_id = client.nodes.objects.nodeid
        where = "the Objects folder"
        if not parts:
            return None, "an empty browse path"
        refs: list[ua.ReferenceDescription] = []
        for i, part in enumerate(parts):
            index, sep, name = part.partition(":")
            ns = int(index) if sep and index.isdigit() else None
            name = name if ns is not None else part
            key = node_id.to_string()
            if key not in children:
                children[key] = await client.get_node(node_id).get_children_descriptions()
            refs = [r for r in children[key] if r.BrowseName.Name == name
                    and (ns is None or r.BrowseName.NamespaceIndex == ns)]
            if not refs:
                have = sorted({f"{r.BrowseName.NamespaceIndex}:{r.BrowseName.Name}" for r in children[key]})
                want = part if ns is not None else f"{node_id.NamespaceIndex}:{name}"
                close = [h for h in have if h.partition(":")[2].casefold() == name.casefold()] or \
                    difflib.get_close_matches(want, have, n=3, cutoff=0.75)
                shown = ", ".join(have[:8]) + (", ..." if len(have) > 8 else "")
                hint = f"did you mean {' or '.join(close)}?" if close else f"it has {shown or 'nothing'}"
                return None, f"no {part!r} under {where} ({hint})"
            node_id = refs[0].NodeId
            where = "/".join(parts[:i + 1])
        if refs[0].NodeClass != ua.NodeClass.Variable:
            return None, f"{where} is a{'n' if refs[0].NodeClass.name[:1] in 'AEIOU' else ''} " \
                         f"{refs[0].NodeClass.name} node, not a variable"
        return node_id, ""

    # -- subscribe ----------------------------------------------------------------------------
    async def _subscribe(self, client: Client) -> None:
        nodes = await self._guard(self._resolve(client), 3 * self.timeout)
        keepalive = max(1, math.ceil(KEEPALIVE_S / self.interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=self.interval * 1000.0, RequestedLifetimeCount=keepalive * 10,
            RequestedMaxKeepAliveCount=keepalive, MaxNotificationsPerPublish=0, PublishingEnabled=True, Priority=0)
        self.feed = _Feed(client, params, self)
        result = await self._guard(self.feed.init(), self.timeout)
        self.silence_s = max(15.0, 3.0 * result.RevisedPublishingInterval / 1000.0 * result.RevisedMaxKeepAliveCount)
        self.handles = {handle: name for handle, name in enumerate(nodes, 1)}
        items = [(handle, nodes[name]) for handle, name in self.handles.items()]
        refused = await self._monitor(items, ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp))
        if refused:  # a server without the timestamp trigger: changes of value only (a steady one looks stale)
            refused = await self._monitor([(h, n) for h, n, _ in refused], None)
        for handle, _, code in refused:
            name = self.handles.pop(handle)
            if name not in self.told:
                self.told.add(name)
                self.intake.say(f"iiotfl gateway: OPC UA node {name!r} cannot be subscribed on {self.endpoint}: the "
                                f"server answers {code.name}; it shows as stale in the status")
        self.intake.connected(True, self.endpoint)

    async def _monitor(self, items: list[tuple[int, Node]],
                       trigger: ua.DataChangeFilter | None) -> list[tuple[int, Node, ua.StatusCode]]:
        """Monitor ``items`` (client handle, node): every change sampled and queued; the refused ones."""
        if not items:
            return []
        requests = []
        for handle, node in items:
            params = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=0.0, QueueSize=QUEUE_SIZE,
                                             DiscardOldest=True)
            if trigger is not None:
                params.Filter = trigger
            requests.append(ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params))
        results = await self._guard(self.feed.create_monitored_items(requests), self.timeout)
        return [(handle, node, res) for (handle, node), res in zip(items, results) if isinstance(res, ua.StatusCode)]

    async def _watch(self, client: Client) -> None:
        """Until ``stop``: raise when the connection or the subscription is gone."""
        while not self.stopped.is_set():
            try:
                await asyncio.wait_for(self.stopped.wait(), WATCH_S)
                return
            except asyncio.TimeoutError:
                pass
            if self.feed.fatal is not None:
                raise _Fatal(self.feed.fatal)
            if client.uaclient.state is not UaClientState.CONNECTED:
                raise ConnectionError("the connection was lost")
            if self.feed.failed is not None:
                raise ConnectionError(f"the server ended the subscription ({self.feed.failed.name})")
            last = self.feed.last_publish_at
            if last is not None and time.monotonic() - last > self.silence_s:
                raise TimeoutError(f"no publish response for {self.silence_s:g} s")

    def changes(self, items: Iterable[ua.MonitoredItemNotification]) -> None:
        """One notification's data changes into the intake, one call per row_key change."""
        handles, keys, intake = self.handles, self.keys, self.intake
        rows: list[tuple[float, bool, str, Any]] = []
        for item in items:
            name = handles.get(item.ClientHandle)
            dv = item.Value
            if name is None or dv is None:
                continue
            value = _value(name, dv, intake)
            if value is _SKIP:
                continue
            stamp = dv.SourceTimestamp or dv.ServerTimestamp
            when = stamp.timestamp() if stamp is not None else 0.0
            rows.append((when if when > 0.0 else 0.0, name in keys, name, value))  # 0: none (or OPC UA's null)
        if not rows:
            return
        rows.sort(key=itemgetter(0, 1))
        group: dict[str, Any] = {}
        when = 0.0
        for when, is_key, name, value in rows:
            group[name] = value
            if is_key:
                intake.values(group, ts=when or None)
                group = {}
        if group:
            intake.values(group, ts=when or None)

    # -- poll ---------------------------------------------------------------------------------
    async def _poll(self, client: Client) -> None:
        found = await self._guard(self._resolve(client), 3 * self.timeout)
        names, nodes = list(found), list(found.values())
        announced = False
        due = time.monotonic()
        while not self.stopped.is_set():
            if client.uaclient.state is not UaClientState.CONNECTED:
                raise ConnectionError("the connection was lost")
            if nodes:
                dvs = await self._guard(client.read_attributes(nodes, ua.AttributeIds.Value), self.timeout)
                values: dict[str, Any] = {}
                newest = 0.0
                for name, dv in zip(names, dvs):
                    value = _value(name, dv, self.intake)
                    if value is _SKIP:
                        continue
                    values[name] = value
                    stamp = dv.SourceTimestamp
                    if stamp is not None and stamp.timestamp() > newest:
                        newest = stamp.timestamp()
                if not announced:
                    announced = True
                    self.intake.connected(True, self.endpoint)
                if values:
                    try:
                        self.intake.values(values, ts=newest or None)
                    except Exception as err:  # noqa: BLE001 - the store's failure, not the server's
                        raise _Fatal(err) from err
            elif not announced:
                announced = True
                self.intake.connected(True, self.endpoint)
            due += self.interval
            now = time.monotonic()
            if due < now:
                due = now  # behind (a slow server): the next read now, no burst to catch up
            try:
                await asyncio.wait_for(self.stopped.wait(), due - now)
                return
            except asyncio.TimeoutError:
                pass


_SKIP = object()


def _value(name: str, dv: ua.DataValue, intake: Intake) -> Any:
    """A reading as the intake takes it: float, or text; ``_SKIP`` (counted) otherwise."""
    code = dv.StatusCode
    if code is not None and code.value and code.is_bad():
        intake.malformed("bad status", f"{name}: {code.name}")
        return _SKIP
    value = dv.Value.Value if dv.Value is not None else None
    if isinstance(value, (float, str)):
        return value
    if isinstance(value, int):  # and bool
        return float(value)
    intake.malformed("value type", f"{name}: a {type(value).__name__} value ({str(value)[:60]}); the gateway takes "
                     "numbers, booleans and text")
    return _SKIP


def _reason(err: BaseException, timeout: float) -> str:
    """A failure as one short phrase."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (no OPC UA server listening)"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return str(err) or f"no answer within {timeout:g} s"
    if isinstance(err, ua.UaStatusCodeError):
        return f"{type(err).__name__} ({str(err).split('(')[0].strip()})"
    if isinstance(err, OSError):
        return err.strerror or str(err) or type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
