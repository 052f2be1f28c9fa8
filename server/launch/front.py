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

from iiotfl.clients import processes
from iiotfl.security import certs

FRONT_DIR = "front"
FLEET_PATH = "/v1/fleet/"
FRONTS = ("nginx", "auto", "none")  # engine.front
NGINX_HINT = "install it (Debian: `apt-get install nginx-light`) or set engine.front=none"


def nginx() -> str | None:
    """The nginx binary, or None when it is not installed."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def config(directory: Path, listen: str, upstream_port: int, certs_dir: Path) -> str:
    """nginx.conf of a front on ``listen`` (host:port) for the SuperLink on 127.0.0.1:``upstream_port``."""
    ca, crt, key = (certs_dir / certs.CA_CRT, certs_dir / certs.SERVER_CRT, certs_dir / certs.SERVER_KEY)
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    return f"""# The gateway-facing front of the SuperLink (server/launch/front.py); written per run.
# The run's process tags reach the workers too, so a cleanup after kill -9 finds them.
env {processes.RUN_VAR}; env {processes.LAUNCHER_VAR}; env FLWR_HOME;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} notice;
events {{ worker_connections 512; }}
http {{
    access_log {directory / "access.log"};
    {temp}
    server_tokens off;
    server {{
        listen {listen} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        client_max_body_size 0;
        location {FLEET_PATH} {{
            proxy_pass https://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 403; }}
    }}
}}
"""


def prepare(run_dir: Path, listen: str, upstream_port: int, certs_dir: Path) -> list[str]:
    """Write the front's config into ``<run>/front`` and return the command that runs it in the foreground."""
    binary = nginx()
    if binary is None:
        raise FileNotFoundError(f"engine.front=nginx: nginx is not installed; {NGINX_HINT}")
    directory = run_dir / FRONT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, listen, upstream_port, certs_dir))
    (directory / "front.json").write_text(json.dumps({"listen": listen, "forwards": FLEET_PATH,
                                                      "superlink": f"127.0.0.1:{upstream_port}"}))
    return [binary, "-p", str(directory), "-c", str(conf), "-g", "daemon off;"]


def listening(run_dir: Path) -> str | None:
    """Where a run's front listens (``front.json``), or None without a front."""
    try:
        return str(json.loads((run_dir / FRONT_DIR / "front.json").read_text())["listen"])
    except (OSError, ValueError, KeyError):
        return None
