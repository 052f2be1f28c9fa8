"""The MQTT source: a gateway subscribed to the plant's broker, every message into the local store.

Description keys (``source:`` with ``kind: mqtt``; ``spec.SOURCE_KEYS["mqtt"]``)::

    broker: 10.77.0.1:8883           # host:port
    topics: [plant/line1/+/cycle]    # topic filters, all subscribed with ``qos``
    format: json                     # json | sparkplug | value
    qos: 1                           # 0 | 1 | 2 (default 1)
    client_id: iiotfl-press-7        # default iiotfl-<hostname>-<hash of the store path>; unique per
                                     # gateway (two with one id take the session from each other)
    keepalive_s: 60
    tls: {ca: ca.pem, certificate: gw.pem, private_key: gw.key, insecure: false}   # or tls: true
    username: gateway-7
    password_file: mqtt.pass         # the password is the file's content, stripped

Paths are relative to the description file. ``tls: true`` verifies the broker against the system's
CA store; ``insecure: true`` skips only the check of the broker's host name in its certificate.

Payload formats (each message is handed to :class:`~intake.Intake`, which maps the plant's names
to the task's columns and ignores names the description does not map):

* ``json``: one JSON object per message, one record; nested objects are flattened with ``.``
  (``{"s": {"T24": 641.2}}`` is the signal ``s.T24``). The description's ``timestamp`` field, if
  any, is the record's time.
* ``sparkplug``: the JSON form of a Sparkplug B payload, ``{"timestamp": <ms>, "metrics": [{"name":
  ..., "value": ...}, ...], "seq": ...}``: the metrics' names and values, at the payload's
  timestamp (else the newest metric timestamp). Metrics with ``is_null: true`` are skipped; the
  protobuf encoding and metric aliases are not read.
* ``value``: the payload is one bare value (a number, else UTF-8 text) and the topic is the
  signal's name (``signals: {T24: plant/line1/T24}``); the description's ``row_key`` ends a
  record (publish the cycle counter after the sensors).

A message that cannot be read (not UTF-8, not JSON, JSON that is not an object, ``metrics`` not a
list, a metric without a name or value, an empty payload) is skipped and counted by kind in the
status (``malformed``); each kind is logged once. Nothing from a payload raises out of the source.

QoS and session. The subscription uses ``qos`` on an MQTT 3.1.1 persistent session
(``clean_session=False``) under a stable client id, so the broker keeps the subscription and
queues the QoS 1/2 messages published while the gateway is disconnected (a broker or network
outage, a gateway restart) and delivers them when it reconnects. Bounds: the broker's queue per
client (mosquitto ``max_queued_messages``, 1,000 by default: raise it for long outages or fast
publishers, it also caps a burst at QoS 1), and the broker must keep sessions across its own
restarts (mosquitto ``persistence true``). A message is acknowledged once it is handed to the
intake, which commits every ``store.flush_s`` (0.2 s): a clean stop loses nothing; a gateway
killed outright can lose the readings of that last fraction of a second. Retained messages are
taken on a new session; on a resumed session the broker's replay of them (it re-sends them on every
SUBSCRIBE) is skipped, so a reconnect does not store the last record again.

Reconnect. An unreachable broker, a refused connection (credentials, TLS) or a dropped one is
reported with ``intake.connected(False, "<host:port>: <reason>; retrying in N s")`` (logged, and in
the status) and retried after 1 s, doubling to ``RETRY_MAX_S`` (the environment's
``IIOTFL_SOURCE_RETRY_MAX_S`` overrides it); the delay starts at 1 s again after a connection that
lasted ``STABLE_S`` (10 s; one dropped sooner, e.g. by a second gateway under the same client id,
keeps doubling). ``intake.connected(True, broker)`` on each (re)connect. Setting ``stop`` ends the
source within about 0.2 s (a TCP connect under way may take up to its 5 s timeout), with a clean
DISCONNECT that keeps the session.

Logged (through the intake's ``say``): connected / unreachable (each retry), the first malformed
message of each kind, a subscription the broker refused, and a reconnect on which the broker had
lost the session (messages published meanwhile are lost).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError("the MQTT source needs paho-mqtt 2.x on the gateway: pip install 'paho-mqtt>=2,<3'") from err

from iiotfl.clients.sources.intake import Intake, retry_max_s
from iiotfl.clients.sources.spec import DataSpec, SpecError

TLS_KEYS = {"ca", "certificate", "private_key", "insecure"}
CONNACK_TIMEOUT_S = 10.0
STABLE_S = 10.0  # a connection that lasted this long starts the next outage's backoff over at 1 s
LOOP_S = 0.2  # the network loop's wait: how soon ``stop`` is seen when no traffic comes


class Malformed(ValueError):
    """A payload the format cannot read: (kind, detail) for ``intake.malformed``."""


# -- static checks -------------------------------------------------------------------------------
def _fail(spec: DataSpec, key: str, what: str) -> SpecError:
    return SpecError(f"{spec.path}: source.{key}: {what}")


def _readable(spec: DataSpec, key: str, value: Any, what: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise _fail(spec, key, f"{value!r} is not a path; give {what} (relative to this file)")
    path = spec.resolve(value)
    if not path.is_file():
        raise _fail(spec, key, f"{path} does not exist; give {what} (relative to this file)")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise _fail(spec, key, f"{path} is not readable ({err.strerror}); let the gateway's user read it") from None
    return path


def _valid_filter(topic: str) -> bool:
    levels = topic.split("/")
    return all(("+" not in lv or lv == "+") and ("#" not in lv or (lv == "#" and i == len(levels) - 1))
               for i, lv in enumerate(levels)) and "\0" not in topic


def check(spec: DataSpec) -> None:
    """Static checks for ``iiotfl gateway --check``: the TLS files and the password file exist and
    are readable, and the other keys have usable values. Raises SpecError (one line)."""
    src = spec.source
    for topic in src["topics"]:
        if not _valid_filter(topic):
            raise _fail(spec, "topics", f"{topic!r} is not a topic filter ('+' and '#' stand for whole levels, "
                        "'#' only last); e.g. plant/line1/+/cycle")
    tls = src.get("tls")
    if isinstance(tls, Mapping):
        unknown = set(tls) - TLS_KEYS
        if unknown:
            raise _fail(spec, "tls", f"unknown key(s) {sorted(unknown)}; it takes {sorted(TLS_KEYS)}")
        if tls.get("ca") is not None:
            _readable(spec, "tls.ca", tls["ca"], "the CA certificate that signed the broker's (PEM)")
        if tls.get("private_key") is not None and tls.get("certificate") is None:
            raise _fail(spec, "tls.private_key", "given without tls.certificate; give the gateway's client "
                        "certificate too, or neither")
        if tls.get("certificate") is not None:
            _readable(spec, "tls.certificate", tls["certificate"], "the gateway's client certificate (PEM)")
        if tls.get("private_key") is not None:
            _readable(spec, "tls.private_key", tls["private_key"], "the client certificate's private key (PEM)")
        if not isinstance(tls.get("insecure", False), bool):
            raise _fail(spec, "tls.insecure", f"{tls['insecure']!r} is not true or false")
    elif tls is not None and not isinstance(tls, bool):
        raise _fail(spec, "tls", f"{tls!r} is neither true/false nor {{ca: ..., certificate: ..., private_key: ..., "
                    "insecure: false}")
    username = src.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise _fail(spec, "username", f"{username!r} is not a user name")
    if src.get("password_file") is not None:
        if username is None:
            raise _fail(spec, "password_file", "a password needs source.username; give the broker's user name")
        path = _readable(spec, "password_file", src["password_file"], "a file holding the broker password")
        if not path.read_text(encoding="utf-8", errors="replace").strip():
            raise _fail(spec, "password_file", f"{path} is empty; write the broker password into it")
    client_id = src.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not client_id or len(client_id) > 65535):
        raise _fail(spec, "client_id", f"{client_id!r} is not a client id; give a short text unique to this gateway")
    keepalive = src.get("keepalive_s", 60)
    if isinstance(keepalive, bool) or not isinstance(keepalive, (int, float)) or not 1 <= keepalive <= 65535:
        raise _fail(spec, "keepalive_s", f"{keepalive!r} is not a number of seconds from 1 to 65535; e.g. 60")


# -- payloads ------------------------------------------------------------------------------------
def _excerpt(topic: str, payload: bytes | bytearray) -> str:
    return f"topic {topic}: {payload[:48]!r}{'...' if len(payload) > 48 else ''}"


def _flatten(obj: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {} if out is None else out
    for key, value in obj.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value
    return out


def _object(payload: bytes | bytearray) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("payload (not UTF-8)") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise Malformed("payload (not JSON)") from None
    if not isinstance(obj, dict):
        raise Malformed("payload (not a JSON object)")
    return obj


def parse_json(topic: str, payload: bytes | bytearray) -> tuple[dict[str, Any], Any]:
    obj = _object(payload)
    for value in obj.values():
        if isinstance(value, dict):
            return _flatten(obj), None
    return obj, None


def parse_sparkplug(topic: str, payload: bytes | bytearray) -> tuple[dict[str, Any], Any]:
    obj = _object(payload)
    metrics = obj.get("metrics")
    if not isinstance(metrics, list):
        raise Malformed("sparkplug (metrics not a list)")
    values: dict[str, Any] = {}
    newest = None
    for metric in metrics:
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
            raise Malformed("sparkplug (metric without name)")
        if metric.get("is_null"):
            continue
        if "value" not in metric:
            raise Malformed("sparkplug (metric without value)")
        values[metric["name"]] = metric["value"]
        stamp = metric.get("timestamp")
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and (newest is None or stamp > newest):
            newest = stamp
    ts = obj.get("timestamp")
    return values, newest if ts is None else ts


def parse_value(topic: str, payload: bytes | bytearray) -> tuple[dict[str, Any], Any]:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Malformed("payload (not UTF-8)") from None
    if not text:
        raise Malformed("payload (empty)")
    value: Any
    try:
        value = float(text)
    except ValueError:
        value = text
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                value = json.loads(text)
            except ValueError:
                pass
    else:
        if not math.isfinite(value):
            raise Malformed("payload (not a finite number)")
    return {topic: value}, None


PARSERS: dict[str, Callable[[str, bytes | bytearray], tuple[dict[str, Any], Any]]] = {
    "json": parse_json, "sparkplug": parse_sparkplug, "value": parse_value}


# -- the connection ------------------------------------------------------------------------------
def default_client_id(spec: DataSpec) -> str:
    digest = hashlib.sha256(str(spec.store_path).encode()).hexdigest()[:10]
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"iiotfl-{host}-{digest}"


def _address(broker: str) -> tuple[str, int]:
    host, _, port = broker.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate was not accepted ({err.verify_message}); give the CA that signed it "
                "as source.tls.ca")
    if isinstance(err, ssl.SSLError):
        return f"TLS: {err.reason or err}"
    if isinstance(err, socket.timeout):
        return "connection timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}"


class _Session:
    """One paho client, its callbacks and what they saw; used by one thread only."""

    def __init__(self, spec: DataSpec, intake: Intake) -> None:
        src = spec.source
        self.spec, self.intake = spec, intake
        self.broker = str(src["broker"])
        self.host, self.port = _address(self.broker)
        self.topics = [(str(t), int(src["qos"])) for t in src["topics"]]
        self.keepalive = int(src.get("keepalive_s", 60))
        self.client_id = str(src.get("client_id") or default_client_id(spec))
        self.parse = PARSERS[src["format"]]
        self.up = False             # CONNACK accepted on the current connection
        self.up_since = 0.0
        self.ever_up = False
        self.session_present = False
        self.refused: str | None = None
        self.retained_skipped = 0
        self._refused_topics: set[str] = set()
        self._pending_sub: dict[int, list[str]] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                             protocol=mqtt.MQTTv311)
        tls = src.get("tls")
        if tls is True or isinstance(tls, Mapping):
            opts: Mapping[str, Any] = tls if isinstance(tls, Mapping) else {}
            path = {k: str(spec.resolve(opts[k])) if opts.get(k) else None
                    for k in ("ca", "certificate", "private_key")}
            client.tls_set(ca_certs=path["ca"], certfile=path["certificate"], keyfile=path["private_key"],
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if opts.get("insecure"):
                client.tls_insecure_set(True)
        if src.get("username"):
            password = None
            if src.get("password_file"):
                password = spec.resolve(src["password_file"]).read_text(encoding="utf-8").strip()
            client.username_pw_set(str(src["username"]), password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    # paho's callbacks (run inside client.loop(), in this source's thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused = f"the broker refused the connection: {reason}"
            return
        self.up, self.refused, self.up_since = True, None, time.monotonic()
        self.session_present = bool(flags.session_present)
        if self.ever_up and not self.session_present:
            self.intake.say(f"iiotfl gateway: the MQTT broker {self.broker} kept no session for client id "
                            f"{self.client_id}: messages published while the gateway was disconnected are lost; "
                            "enable persistence on the broker (mosquitto: persistence true)")
        self.ever_up = True
        result, mid = client.subscribe(self.topics)
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_sub[mid] = [t for t, _ in self.topics]
        self.intake.connected(True, self.broker)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        topics = self._pending_sub.pop(mid, [])
        for topic, reason in zip(topics, reasons):
            if reason.is_failure and topic not in self._refused_topics:
                self._refused_topics.add(topic)
                self.intake.say(f"iiotfl gateway: the MQTT broker {self.broker} refused the subscription to {topic!r} "
                                f"({reason}); allow it in the broker's ACL for this gateway's user / client id "
                                f"{self.client_id}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and self.session_present:
            self.retained_skipped += 1  # the broker's replay on re-subscribing: stored already
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # the broker should have refused it
            self.intake.malformed("topic (not UTF-8)", repr(msg._topic[:64]))
            return
        try:
            values, ts = self.parse(topic, msg.payload)
        except Malformed as bad:
            self.intake.malformed(str(bad), _excerpt(topic, msg.payload))
            return
        self.intake.values(values, ts)

    # the connection's life
    def connect(self) -> str | None:
        """Open the TCP (TLS) connection and send CONNECT; None, or why it failed."""
        self.up, self.refused = False, None
        try:
            self.client.connect(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as err:
            return _reason(err)
        return None

    def serve(self, stop: threading.Event) -> str | None:
        """Run the network loop until the connection ends (why) or ``stop`` is set (None)."""
        opened = time.monotonic()
        while not stop.is_set():
            rc = self.client.loop(timeout=LOOP_S)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if self.refused:
                    return self.refused
                if rc == mqtt.MQTT_ERR_CONN_LOST:
                    return "connection lost"
                return f"connection ended: {mqtt.error_string(rc)}"
            if self.refused:
                return self.refused
            if not self.up and time.monotonic() - opened > CONNACK_TIMEOUT_S:
                self.close()
                return f"no answer to CONNECT within {CONNACK_TIMEOUT_S:g} s (an MQTT broker? TLS needed?)"
        return None

    def close(self) -> None:
        """A clean DISCONNECT (the broker keeps the session), then the socket closed."""
        try:
            self.client.disconnect()
            for _ in range(10):
                if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except (OSError, ValueError):
            pass
        self.up = False


def run(spec: DataSpec, intake: Intake, stop: threading.Event) -> None:
    """Subscribe to the description's broker and feed ``intake`` until ``stop`` is set, reconnecting
    with backoff (see the module docstring)."""
    check(spec)
    session = _Session(spec, intake)
    longest = retry_max_s()
    delay = min(1.0, longest)
    try:
        while not stop.is_set():
            reason = session.connect()
            if reason is None:
                reason = session.serve(stop)
                if session.up and time.monotonic() - session.up_since >= STABLE_S:
                    delay = min(1.0, longest)  # it had been up a while: this outage starts over at 1 s
            if stop.is_set():
                break
            session.up = False
            intake.connected(False, f"{session.broker}: {reason}; retrying in {delay:g} s")
            stop.wait(delay)
            delay = min(delay * 2, longest)
    finally:
        session.close()
        intake.up, intake.detail = False, f"{session.broker}: stopped"
