"""A simulated machine as an OPC UA server, for the tests and benches of the OPC UA source.

``Machine(port, records, period_s, signals, security)`` serves one object ``Machine1`` (namespace
2, ``urn:iiotfl:test:machine``) on ``opc.tcp://127.0.0.1:<port>/iiotfl/machine``, with one variable
per name: ``Unit`` and ``Cycle`` (Int32) and the fourteen informative sensors under plant-style
names (:data:`PLANT_NAMES`, Double). Its node ids are ``ns=2;s=Machine1.<name>``, its browse paths
``2:Machine1/2:<name>``.

``start()`` runs the server in a background thread with its own event loop and writes the first
record (a machine's variables always hold its last cycle); ``begin()`` starts publishing the rest,
one record every ``period_s`` (0: as fast as it can), each tick the sensors first, then ``Unit``,
then ``Cycle`` last, all with the tick's source timestamp. ``published`` lists the records
written, ``done`` is set after the last; names added to ``frozen`` are no longer written.
``stop()`` ends the server (and is safe to call twice).

``security={"trust": [client_cert_path, ...]}`` serves only Basic256Sha256 SignAndEncrypt with a
fresh self-signed server certificate, and accepts only the listed client certificates.

Run as a script (``python tests/opcua_machine.py --bench 10``) it measures the source's ingest
rate: a machine in another process changing all 16 variables as fast as it can, the gateway's
``collect`` subscribing, readings stored per second.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from iiotfl.tasks.predictive_maintenance.generator import SENSORS, generate_plant

NAMESPACE = "urn:iiotfl:test:machine"
OBJECT = "Machine1"
PLANT_NAMES: dict[str, str] = {  # task column -> the plant's name for it
    "T24": "Temp_LPC_out", "T30": "Temp_HPC_out", "T50": "Temp_LPT_out", "P30": "Press_HPC_out",
    "Nf": "Fan_speed", "Nc": "Core_speed", "Ps30": "Static_press_HPC_out", "phi": "Fuel_flow_ratio",
    "NRf": "Corr_fan_speed", "NRc": "Corr_core_speed", "BPR": "Bypass_ratio", "htBleed": "Bleed_enthalpy",
    "W31": "HPT_coolant_bleed", "W32": "LPT_coolant_bleed",
}
assert set(PLANT_NAMES) == set(SENSORS)
COLUMNS: dict[str, str] = {"unit": "Unit", "cycle": "Cycle", **PLANT_NAMES}
NAMES: tuple[str, ...] = tuple(COLUMNS.values())
INTEGERS = ("Unit", "Cycle")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plant_rows(seed: int = 7, plant: int = 0, limit: int | None = None) -> list[dict[str, float]]:
    """The generator's run-to-failure records of one plant, as the machine's variables (plant names)."""
    data = generate_plant(seed, plant, units_min=2, units_max=3, rul_cap=125)
    rows = []
    for i in range(len(data.unit) if limit is None else min(limit, len(data.unit))):
        row: dict[str, float] = {"Unit": int(data.unit[i]), "Cycle": int(data.cycle[i])}
        for j, sensor in enumerate(data.sensor_names):
            row[PLANT_NAMES[sensor]] = float(data.sensors[i, j])
        rows.append(row)
    return rows


def node_id(name: str) -> str:
    return f"ns=2;s={OBJECT}.{name}"


def browse_path(name: str, indexed: bool = True) -> str:
    return f"2:{OBJECT}/2:{name}" if indexed else f"{OBJECT}/{name}"


def make_certificate(directory: str | Path, name: str, uri: str, server: bool = False) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate and its key (PEM files ``<name>-cert.pem``,
    ``<name>-key.pem``) for ``uri`` on this host."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    uses = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname()),
                        x509.DNSName("localhost")], uses)
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


class Machine:
    """A simulated machine on an OPC UA server (see the module docstring)."""

    def __init__(self, port: int | None = None, records: Sequence[Mapping[str, float]] | None = None,
                 period_s: float = 0.02, signals: Sequence[str] = NAMES,
                 security: Mapping[str, Any] | None = None) -> None:
        self.port = port or free_port()
        self.records = list(records) if records is not None else plant_rows()
        self.period_s = period_s
        self.signals = tuple(signals)
        self.security = security
        self.frozen: set[str] = set()
        self.published: list[dict[str, float]] = []
        self.done = threading.Event()
        self.ready = threading.Event()
        self._go = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/iiotfl/machine"

    def start(self, timeout: float = 30.0) -> "Machine":
        self._thread = threading.Thread(target=self._run, name=f"opcua-machine-{self.port}", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"the simulated machine on {self.endpoint} did not start: {self._error!r}")
        return self

    def begin(self) -> None:
        """Publish the records after the first (written at start)."""
        self._go.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with_stop = self._stop
            try:
                self._loop.call_soon_threadsafe(with_stop.set)
            except RuntimeError:
                pass  # the loop has ended
        if self._thread is not None:
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), f"the simulated machine on {self.endpoint} did not stop"
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Machine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the server's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - start() reports it
            self._error = err
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("iiotfl simulated machine")
        if self.security is not None:
            await self._secure(server)
        ns = await server.register_namespace(NAMESPACE)
        assert ns == 2, ns
        machine = await server.nodes.objects.add_object(ua.NodeId(OBJECT, ns), ua.QualifiedName(OBJECT, ns))
        self._ids = {}
        for name in self.signals:
            kind = ua.VariantType.Int32 if name in INTEGERS else ua.VariantType.Double
            initial = ua.Variant(0 if name in INTEGERS else 0.0, kind)
            var = await machine.add_variable(ua.NodeId(f"{OBJECT}.{name}", ns), ua.QualifiedName(name, ns), initial)
            self._ids[name] = var.nodeid
        self._server = server
        async with server:
            if self.records:
                await self._write(self.records[0])
            self.ready.set()
            publisher = asyncio.create_task(self._publish())
            await self._stop.wait()
            publisher.cancel()
            try:
                await publisher
            except asyncio.CancelledError:
                pass

    async def _secure(self, server: Server) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="opcua-machine-")
        uri = "urn:iiotfl:test:machine-server"
        cert, key = make_certificate(self._tmp.name, "machine", uri, server=True)
        await server.set_application_uri(uri)
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        assert self.security is not None
        trusted = set()
        for path in self.security.get("trust", ()):
            data = Path(path).read_bytes()
            c = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
            trusted.add(c.fingerprint(hashes.SHA256()))

        async def validate(certificate: x509.Certificate, app: ua.ApplicationDescription) -> None:
            if certificate.fingerprint(hashes.SHA256()) not in trusted:
                raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

        server.set_certificate_validator(validate)

    async def _write(self, record: Mapping[str, float]) -> None:
        stamp = datetime.now(timezone.utc)
        order = [n for n in self.signals if n not in INTEGERS] + [n for n in INTEGERS if n in self.signals]
        for name in order:
            if name in self.frozen or name not in record:
                continue
            kind = ua.VariantType.Int32 if name in INTEGERS else ua.VariantType.Double
            value = int(record[name]) if name in INTEGERS else float(record[name])
            await self._server.write_attribute_value(
                self._ids[name], ua.DataValue(ua.Variant(value, kind), SourceTimestamp=stamp, ServerTimestamp=stamp))
        self.published.append(dict(record))

    async def _publish(self) -> None:
        while not self._go.is_set():
            await asyncio.sleep(0.01)
        due = time.monotonic()
        for record in self.records[1:]:
            await self._write(record)
            if self.period_s > 0:
                due += self.period_s
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)
        self.done.set()


# -- the ingest bench ---------------------------------------------------------------------------------
def _bench_machine(port: int, seconds: float, started: Any, go: Any, published: Any) -> None:
    rows = plant_rows()
    records = [{**rows[i % len(rows)], "Unit": 1, "Cycle": i + 1} for i in range(400_000)]
    machine = Machine(port, records, period_s=0.0)
    machine.start()
    started.set()
    go.wait(60)
    machine.begin()
    time.sleep(seconds)
    published.value = len(machine.published)
    machine.stop()


def bench(seconds: float = 10.0) -> dict[str, float]:
    """Readings stored per second by ``collect`` (subscribe mode, publishing interval 50 ms) from a
    machine in another process writing its 16 variables as fast as it can."""
    import json
    import multiprocessing as mp
    import os
    import resource
    import threading as th

    from iiotfl.clients.sources import collect, open_store
    from iiotfl.clients.sources.spec import parse

    port = free_port()
    ctx = mp.get_context("spawn")
    started, go, published = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = {"task": "predictive_maintenance", "row_key": "cycle",
               "source": {"kind": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}/iiotfl/machine",
                          "mode": "subscribe", "interval_s": 0.05},
               "signals": {c: browse_path(n) for c, n in COLUMNS.items()}, "store": {"path": "store.sqlite"}}
        spec = parse(raw, Path(tmp) / "gateway.yaml")
        stop = th.Event()
        lines: list[str] = []
        proc = ctx.Process(target=_bench_machine, args=(port, seconds, started, go, published))
        proc.start()
        started.wait(60)
        thread = collect(spec, stop, say=lines.append)
        assert spec.store_path is not None
        status = spec.store_path.with_name(spec.store_path.stem + ".status.json")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (status.exists() and json.loads(status.read_text())["connected"]):
            time.sleep(0.05)
        store = open_store(spec)
        n0 = store.count()
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        go.set()
        time.sleep(seconds)
        n1 = store.count()
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        proc.join(60)
        stop.set()
        thread.join(10)
        store.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    readings = (n1 - n0) * len(COLUMNS)
    return {"seconds": round(wall, 2), "records_published": published.value, "records_stored": n1 - n0,
            "readings_stored_per_s": round(readings / wall), "gateway_cpu_s": round(cpu, 2),
            "readings_per_gateway_cpu_s": round(readings / cpu) if cpu else 0, "cpus": os.cpu_count() or 0}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=float, default=10.0, help="seconds of burst")
    print(json.dumps(bench(parser.parse_args().bench), indent=1))
