"""docker-compose.yml and docker/Dockerfile checked against reality, without a Docker engine.

* the file parses and every service's command is accepted by the real 1.42 parsers
  (flower-superlink's, ``iiotfl gateway``'s, and flower-supernode's for what the gateway runs);
* every file it mounts from ./certs is one that ``iiotfl certs`` writes;
* ports and addresses agree across services and the certificate's SANs;
* the gateway entrypoint, run natively in a network namespace, applies the same tc
  shaping as the local fleet (tests/unit/test_compose.py::test_gateway_entrypoint_shapes_like_the_fleet).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
import uuid

import pytest
import yaml

from tests.conftest import IIOTFL, ROOT, run_cli

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GATEWAYS = sorted(name for name in SERVICES if name.startswith("gateway-"))


def _flag(argv: list[str], name: str) -> str:
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def _superlink_args():
    from iiotfl.compat.flower import superlink_parser

    argv = SERVICES["superlink"]["command"]
    assert argv[0] == "flower-superlink"
    return superlink_parser().parse_args(argv[1:])


def _gateway_args(name: str):
    from iiotfl.clients.gateway import parser

    return parser().parse_args(SERVICES[name]["command"])


def _front_args():
    from iiotfl.server.cli import build_parser

    argv = SERVICES["front"]["command"]
    assert argv[:2] == ["iiotfl", "front"]
    return build_parser().parse_args(argv[1:])


def _server_argv() -> list[str]:
    """The server's command as compose runs it with IIOTFL_OVERRIDES unset."""
    return shlex.split(SERVICES["server"]["command"].replace("${IIOTFL_OVERRIDES:-}", ""))


def _host(path: str) -> str:
    return path.replace("${IIOTFL_CERTS:-./certs}", "./certs")


def _mounts(name: str) -> list[tuple[str, str, str]]:
    out = []
    for v in SERVICES[name].get("volumes", []):
        host, target, *mode = _host(v).split(":")
        out.append((host, target, mode[0] if mode else "rw"))
    return out


def test_services_and_their_commands_parse_with_the_real_flags():
    assert {"certs", "superlink", "register", "server", "front"} <= set(SERVICES) and len(GATEWAYS) >= 2
    assert SERVICES["certs"]["profiles"] == ["setup"]
    sl = _superlink_args()  # argparse exits on any flag 1.42 does not know
    assert not sl.insecure and sl.enable_supernode_auth and sl.database.startswith("/state/")
    assert sl.runtime_dependency_install is False  # containers never download at run time
    from iiotfl.clients.gateway import supernode_argv
    from iiotfl.compat.flower import supernode_parser

    for name in GATEWAYS:
        args = _gateway_args(name)
        assert not args.insecure and args.ca and args.key and args.link
        argv = supernode_argv(args)
        assert argv[1:3] == ["-m", "iiotfl.compat.supernode"]  # Flower's SuperNode, showing its client certificate
        node = supernode_parser().parse_args(argv[3:])
        assert node.root_certificates == args.ca and node.auth_supernode_private_key == args.key
        assert args.client_cert and args.client_key  # mutual TLS at the front
        assert "NET_ADMIN" in SERVICES[name]["cap_add"] and SERVICES[name]["restart"] == "unless-stopped"
        assert "healthcheck" in SERVICES[name]
    assert "healthcheck" in SERVICES["superlink"] and SERVICES["superlink"]["restart"] == "unless-stopped"
    front = SERVICES["front"]
    assert "healthcheck" in front and front["restart"] == "unless-stopped"
    assert front["depends_on"]["superlink"]["condition"] == "service_healthy"
    for name in GATEWAYS:  # a gateway starts once the front serves
        assert SERVICES[name]["depends_on"]["front"]["condition"] == "service_healthy"


def test_ports_addresses_and_partitions_agree():
    sl = _superlink_args()
    address = f"superlink:{sl.port}"
    front = _front_args()
    assert front.superlink == address  # the front forwards to the SuperLink's port on the operator network
    entry = f"front:{front.listen.rsplit(':', 1)[1]}"
    ids = []
    for name in GATEWAYS:
        args = _gateway_args(name)
        assert args.superlink == entry, name  # the gateways dial the front, never the SuperLink
        assert args.num_partitions == len(GATEWAYS), name
        ids.append(args.partition_id)
    assert sorted(ids) == list(range(len(GATEWAYS)))
    server = _server_argv()
    assert server[:2] == ["iiotfl", "run"]
    assert f"engine.superlink={address}" in server and f"fleet.gateways={len(GATEWAYS)}" in server
    assert address in SERVICES["register"]["command"]
    certs = SERVICES["certs"]["command"]
    sans = [certs[i + 1] for i, a in enumerate(certs) if a == "--san"]
    assert {"superlink", "front"} <= set(sans) and int(_flag(certs, "--gateways")) == len(GATEWAYS)
    health = " ".join(SERVICES["superlink"]["healthcheck"]["test"])
    assert str(sl.port) in health
    # the ServerApp runs inside the SuperLink container: it and `server` share /results
    assert ("results", "/results", "rw") in _mounts("superlink") and ("results", "/results", "rw") in _mounts("server")
    # model checkpoints are encrypted with keys kept in their own volume, not beside the results
    keys = SERVICES["superlink"]["environment"]["IIOTFL_ARTEFACT_KEYS"]
    assert any(t == keys and h in COMPOSE["volumes"] for h, t, _ in _mounts("superlink"))
    assert not keys.startswith("/results")
    # the server's overrides are a valid config
    from iiotfl.configs import compose
    from iiotfl.server.launch import validate

    validate(compose(server[2:]))


def test_every_up_writes_its_own_run_directory_on_the_projects_own_subnet():
    """No fixed hydra.run.dir (a reused directory lets an old checkpoint pass for today's): the server
    runs in /results, so each run is /results/runs/<date>/<time>; the plant network is inside 10.77.0.0/16."""
    server = SERVICES["server"]
    assert not any(a.startswith("hydra.run.dir") for a in _server_argv())
    assert server["working_dir"] == "/results"
    hydra = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())["hydra"]
    assert hydra["run"]["dir"].startswith("runs/${now:")
    subnets = {net: [ipaddress.ip_network(c["subnet"]) for c in COMPOSE["networks"][net]["ipam"]["config"]]
               for net in ("plant", "operator")}
    assert subnets["plant"] != subnets["operator"]
    for (subnet,) in subnets.values():  # inside the range docker/engine isolates (10.77.224.0/19)
        assert subnet.subnet_of(ipaddress.ip_network("10.77.224.0/19"))
    assert COMPOSE["networks"]["operator"]["internal"] is True
    # no service on compose's default network: it would take a subnet from the engine's pool, which a
    # local fleet running beside (10.77.0.1/16 on its bridge) makes overlap, and the engine refuses.
    # Gateways on `plant` only, the SuperLink and its operators on `operator` only, the front on both.
    on = {name: sorted(svc["networks"]) for name, svc in SERVICES.items() if "networks" in svc}
    assert all(svc.get("network_mode") == "none" for name, svc in SERVICES.items() if name not in on)
    assert on.pop("front") == ["operator", "plant"]
    for name in GATEWAYS:
        assert on.pop(name) == ["plant"], name
    assert on == {"superlink": ["operator"], "register": ["operator"], "server": ["operator"]}
    fixed = SERVICES["superlink"]["networks"]["operator"]["ipv4_address"]
    assert ipaddress.ip_address(fixed) in subnets["operator"][0]
    for name in GATEWAYS:  # each gateway remembers that its key joined (a restarted container waits)
        assert _gateway_args(name).state_dir


def test_every_mounted_certificate_file_is_one_iiotfl_certs_writes(tmp_path):
    certs = SERVICES["certs"]["command"]
    out = tmp_path / "certs"
    proc = run_cli("certs", str(out), *certs[3:])
    assert proc.returncode == 0, proc.stderr
    mounted = 0
    for name in SERVICES:
        for host, target, mode in _mounts(name):
            if not host.startswith("./certs"):
                continue
            path = out / host.removeprefix("./certs").lstrip("/")
            assert path.exists(), f"{name} mounts {host}, which `iiotfl certs` does not write"
            if name != "certs":
                assert mode == "ro", f"{name} mounts {host} writable"
            mounted += 1
    assert mounted >= 3 + 2 * len(GATEWAYS)
    # what the SuperLink and gateways are told to read inside the container is what is mounted there
    sl_targets = {t for _, t, _ in _mounts("superlink")}
    sl = _superlink_args()
    assert {sl.ssl_ca_certfile, sl.ssl_certfile, sl.ssl_keyfile} <= sl_targets
    front = _front_args()
    assert {f"{front.certs}/{n}" for n in ("ca.crt", "superlink.crt", "superlink.key")} <= {
        t for _, t, _ in _mounts("front")}
    for name in GATEWAYS:
        args, targets = _gateway_args(name), {t for _, t, _ in _mounts(name)}
        assert {args.ca, args.key, args.client_cert, args.client_key} <= targets
        hosts = {t: h for h, t, _ in _mounts(name)}
        assert hosts[args.client_cert].endswith(f"gateway-{args.partition_id}.crt")
        assert hosts[args.client_key].endswith(f"gateway-{args.partition_id}.tls.key")
        key_host = next(h for h, t, _ in _mounts(name) if t == args.key)
        assert key_host.endswith(f"gateway-{args.partition_id}.key")
        # its public key is what `register` gives the SuperLink; no private key leaves the gateway
        assert key_host.replace(".key", ".pub") in {h for h, _, _ in _mounts("register")}
    assert not any(h.endswith(".key") for h, _, _ in _mounts("register") + _mounts("server"))


def test_dockerfile_pins_and_copies_what_exists():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", text)
    assert "ARG BASE=python:3.11-slim" in text and "iproute2" in text
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.M):
        assert (ROOT / src).exists(), src  # docker/wheels too: its README is in git, the wheels are not
    # the images never carry the wheelhouse: it is only copied into the deps stage
    assert re.findall(r"^COPY docker/wheels", text, flags=re.M) and "COPY --from=deps /opt/venv /opt/venv" in text
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M))
    for name, svc in SERVICES.items():
        build = svc.get("build")
        if build:
            assert build["target"] in targets and (ROOT / build["dockerfile"]).is_file(), name
    entry = re.search(r"FROM base AS gateway.*?ENTRYPOINT (\[.*?\])", text, flags=re.S).group(1)
    assert yaml.safe_load(entry) == ["iiotfl", "gateway"]


def _ruleset(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True).stdout


def _qdiscs(ns: str, dev: str) -> list[str]:
    out = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True, check=True)
    return sorted(re.sub(r"qdisc (\w+) \w+:", r"qdisc \1", line).strip() for line in out.stdout.splitlines())


@pytest.mark.skipif(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0",
                    reason="network namespaces need root")
def test_gateway_entrypoint_shapes_like_the_fleet():
    """Namespace A: the local fleet's shaping. Namespace B: the compose gateway's command,
    run natively (``iiotfl gateway --check``). Same qdiscs on eth0."""
    from iiotfl.configs import compose
    from iiotfl.links.namespaces import PREFIX, LinkFleet
    from iiotfl.links.profiles import gateway_profiles

    args = _gateway_args(GATEWAYS[0])
    tag = uuid.uuid4().hex[:6]
    fleet = LinkFleet(tag)
    ns_b, veth = f"{PREFIX}{tag}-gw", f"ifl{tag}x"
    try:
        fleet.create(gateway_profiles(compose([f"link={args.link}", "fleet.gateways=1"]))[:1])
        expected = _qdiscs(fleet.gateways[0].netns, "eth0")
        subprocess.run(["ip", "netns", "add", ns_b], check=True)
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns_b], check=True)
        subprocess.run(["ip", "-n", ns_b, "link", "set", "eth0", "up"], check=True)
        # the gateway service's own link and interface; no SuperLink to reach in --check mode
        proc = subprocess.run(["ip", "netns", "exec", ns_b, str(IIOTFL), "gateway", "--superlink", "superlink:1",
                               "--insecure", "--link", args.link, "--interface", args.interface, "--check"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "uplink tbf" in proc.stderr
        assert _qdiscs(ns_b, "eth0") == expected and any("tbf" in q for q in expected)
        if shutil.which("nft"):  # random loss: the same nftables rules
            assert _ruleset(ns_b) == _ruleset(fleet.gateways[0].netns) and "numgen random" in _ruleset(ns_b)
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns_b], capture_output=True)
        fleet.remove()


@pytest.mark.skipif(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0",
                    reason="network namespaces need root")
def test_shaping_that_the_kernel_refuses_is_one_line():
    """The downlink policer needs tc modules some kernels lack: the gateway says so in one line
    (here on a device that does not exist in a fresh namespace, which tc refuses the same way)."""
    ns = f"iiotfl-{uuid.uuid4().hex[:6]}-chk"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, str(IIOTFL), "gateway", "--superlink", "superlink:1",
                               "--insecure", "--link", "nb_iot", "--interface", "eth9", "--check"],
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "cannot shape eth9 for --link nb_iot" in line and "tc" in line
