"""The gateway-facing front: nginx, forwarding only the Fleet API, with mutual TLS.

flwr 1.42 serves its Fleet, Control and Runtime APIs on one HTTP port. The local fleet's
SuperLink listens on loopback; the gateways reach it only through this front, which

* terminates TLS with the SuperLink's certificate and asks every client for a certificate
  issued by the fleet's CA (``gateways/gateway-<i>.crt`` from ``iiotfl certs``): no
  certificate, no connection;
* forwards ``/v1/fleet/...`` to the SuperLink over TLS (verified against the CA) and answers
  every other path (``/v1/control``, ``/v1/runtime``: registering nodes, submitting runs)
  with 403, after nginx has normalised the path (``..``, ``%2e``);
* on top of Flower's own SuperNode authentication (registered node keys).

Operators register nodes and submit runs on the server itself, against the SuperLink's
loopback port. The config is written to ``<run>/front/nginx.conf``; ``front.json`` beside it
says where the front listens (what the gateways dial).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from iiotfl.security import certs

FRONT_DIR = "front"
FLEET_PATH = "/v1/fleet/"
FRONTS = ("nginx", "auto", "none")  # engine.front
NGINX_HINT = "install it (Debian: `apt-get install nginx-light`) or set engine.front=none"


def nginx() -> str | None:
    """The nginx binary, or None when it is not installed."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 0.0.0.0:9443)")
    return host, int(port)


def config(directory: Path, listen: str, upstream: str, certs_dir: Path, console: bool = False) -> str:
    """nginx.conf of a front on ``listen`` (host:port) for the SuperLink at ``upstream`` (host:port).

    The SuperLink's certificate must name ``upstream``'s host (``localhost`` for loopback); the front
    shows the same certificate to the gateways, so it must name the front's address as well
    (``iiotfl certs --san``). ``console``: logs to stderr/stdout (a container) instead of ``directory``."""
    _split(listen)
    host, _ = _split(upstream)
    name = "localhost" if host in ("127.0.0.1", "::1", "[::1]") else host
    ca, crt, key = (certs_dir / certs.CA_CRT, certs_dir / certs.SERVER_CRT, certs_dir / certs.SERVER_KEY)
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    errors, access = ("stderr", "/dev/stdout") if console else (directory / "error.log", directory / "access.log")
    return f"""# The gateway-facing front of the SuperLink (server/launch/front.py, `iiotfl front`).
# nginx writes its process title over its environment: a run's tags are words of the master's
# command line (-g env ...), its workers are in the master's process group.
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {errors} notice;
events {{ worker_connections 512; }}
http {{
    access_log {access};
    {temp}
    server_tokens off;
    upstream superlink_fleet_api {{  # kept-alive TLS connections: no handshake per Fleet API call
        server {upstream};
        keepalive 16;
        keepalive_timeout 120s;
    }}
    server {{
        listen {listen} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        client_max_body_size 0;
        location {FLEET_PATH} {{
            proxy_pass https://superlink_fleet_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_session_reuse on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {name};
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 403; }}
    }}
}}
"""


def prepare(directory: Path, listen: str, upstream: str, certs_dir: Path, tags: Mapping[str, str],
            console: bool = False) -> list[str]:
    """Write the front's config into ``directory`` and return the command that runs it in the foreground.

    ``tags`` (a run's ``IIOTFL_*`` entries) become words of the command line, which is what
    stays readable in /proc once nginx has set its title (``clients/processes.py``)."""
    binary = nginx()
    if binary is None:
        raise FileNotFoundError(f"nginx is not installed; {NGINX_HINT}")
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, listen, upstream, certs_dir, console))
    (directory / "front.json").write_text(json.dumps({"listen": listen, "forwards": FLEET_PATH,
                                                      "superlink": upstream}))
    marks = "".join(f" env {key}={value} ;" for key, value in tags.items())
    return [binary, "-p", str(directory), "-c", str(conf), "-g", f"daemon off;{marks}"]


def listening(run_dir: Path) -> str | None:
    """Where a run's front listens (``front.json``), or None without a front."""
    try:
        return str(json.loads((run_dir / FRONT_DIR / "front.json").read_text())["listen"])
    except (OSError, ValueError, KeyError):
        return None
