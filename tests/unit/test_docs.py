"""Every shell command in README.md and docs/*.md works as written (fast: no process starts but --help).

Each line of every ```bash / ```sh / ```shell / ```console block is one command (a line ending in
``\\`` continues on the next; ``$ `` prompts and ``# comments`` are dropped). Every command must:

* **quote what the shell would change**: unquoted ``{ } [ ] * ? ; < > | ( ) ! `` and backticks
  fail the test (brace expansion, globs, redirection, a second command), as does a quote that
  ``shlex`` cannot close; a single trailing ``&`` (run in the background) is allowed;
* be one of these, each checked against the project itself:

  ==========================================  ===========================================================
  ``iiotfl run ...``, ``make run ARGS=...``   the Hydra overrides compose (``iiotfl.configs.compose``) and
                                              validate (``iiotfl.server.launch.validate``: the ServerApp's checks and the engine's). ``-m`` sweeps:
                                              every point composes and the first validates (a sweep records
                                              a later point the checks refuse as failed and goes on, as the
                                              docs say). ``hydra.*`` overrides are skipped.
  ``iiotfl <command> ...``                    ``iiotfl.server.cli.build_parser().parse_args`` accepts it;
                                              a command that hands its arguments on (``certs``) has each
                                              ``--flag`` checked against its ``--help``; every documented
                                              command's ``--help`` prints its usage and exits 0
  ``make <target> ...``                       the target is in the Makefile
  ``docker compose ...``                      services and profiles are in docker-compose.yml; a command
                                              given to ``run`` is checked as a command itself
  ``flower-superlink``, ``flwr ...``          every ``--flag`` is in the tool's ``--help`` (also
                                              ``flower-supernode``)
  ``python SCRIPT ...``                       the script exists and names every ``--flag`` used
  a path such as ``.ci/run``                  an executable file of the repository
  a name in ``ALLOWED`` (``ray``)             not checked: a cluster's own tools (system tools such as
                                              ``cp`` or ``ssh`` would go there too)
  ==========================================  ===========================================================

Files a command refers to: ``$PWD`` is replaced by an empty temporary directory. Validation reads
one kind of file, a certificate directory (``engine.certs=``): the test creates it there with
``iiotfl.security.certs.create`` for the command's gateway count, so validation checks the real
thing rather than a missing-file message. Other paths in overrides (``task.data.path``,
``engine.ca``, ``strategy.keys``) are not read before a run starts and are left as written.

Also checked: README.md starts with the two set-up commands, stays a front door (at most 250
lines) and links every docs/ page; every relative link and heading anchor resolves; every
repository path and ``iiotfl.*`` name in backticks exists; docs/configuration.md names every
option and key of configs/.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException

from iiotfl.configs import ConfigError, compose
from iiotfl.security.certs import create as create_certs
from iiotfl.server.cli import build_parser
from iiotfl.server.launch import validate

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
OTHER_FENCES = {"text", "toml", "yaml", "json", "python"}  # a fence must name its language

# Commands the test does not check, by name: Ray's own CLI, run on a cluster's machines. Add a system
# tool here (cp, ssh, ...) when a page needs one; test_allowed_commands_are_used keeps the list exact.
ALLOWED = {"ray", "mosquitto"}

SHELL_SPECIAL = set("{}[]*?;<>|()!`")
FLOWER_TOOLS = {"flower-superlink", "flower-supernode", "flwr"}
PYTHONS = {"python", "python3", "python3.11"}


class DocCommandError(AssertionError):
    """A documented command that would not work as written."""


# -- extraction ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # the command with continuations joined

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Fence:
    file: str
    line: int
    lang: str
    lines: tuple[tuple[int, str], ...]


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def fences(path: Path) -> list[Fence]:
    out, rel = [], str(path.relative_to(ROOT))
    opened: tuple[str, int, str] | None = None
    body: list[tuple[int, str]] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if opened is None and m:
            opened, body = (m.group(1), no, m.group(2).lower()), []
        elif opened is not None and m and m.group(1).startswith(opened[0]) and not m.group(2):
            out.append(Fence(rel, opened[1], opened[2], tuple(body)))
            opened = None
        elif opened is not None:
            body.append((no, line))
    if opened is not None:
        out.append(Fence(rel, opened[1], opened[2] + " (not closed)", tuple(body)))
    return out


def commands(fence: Fence) -> list[Command]:
    out: list[Command] = []
    pending: tuple[int, str] | None = None
    for no, raw in fence.lines:
        line = raw.strip()
        if fence.lang == "console":
            if not line.startswith("$ ") and pending is None:
                continue  # output, not a command
            line = line[2:] if line.startswith("$ ") else line
        if pending is not None:
            start, text = pending
            line, no = text + " " + line, start
            pending = None
        if line.endswith("\\"):
            pending = (no, line[:-1].rstrip())
            continue
        if line and not line.startswith("#"):
            out.append(Command(fence.file, no, line))
    if pending is not None:
        out.append(Command(fence.file, pending[0], pending[1] + " \\"))
    return out


ALL_FENCES = [f for doc in DOCS for f in fences(doc)]
ALL_COMMANDS = [c for f in ALL_FENCES if f.lang in SHELL_FENCES for c in commands(f)]


# -- quoting --------------------------------------------------------------------------------------
def unquoted_specials(text: str) -> list[str]:
    """Characters outside quotes a shell would act on, up to an unquoted ``#`` comment."""
    found, quote, escaped, prev = [], "", False, " "
    for ch in text:
        if escaped:
            escaped, prev = False, "x"
            continue
        if quote == "'":
            quote = "" if ch == "'" else quote
        elif quote == '"':
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quote = ""
        elif ch == "\\":
            escaped = True
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            break
        elif ch in SHELL_SPECIAL:
            found.append(ch)
        elif ch == "&":
            found.append(ch)
        prev = ch
    return found


def split(text: str) -> list[str]:
    """The argv a shell gives the command; DocCommandError where the shell would do something else."""
    try:
        argv = shlex.split(text, comments=True)
    except ValueError as err:
        raise DocCommandError(f"the shell cannot split it ({err})") from None
    specials = unquoted_specials(text)
    if argv and argv[-1] == "&" and specials[-1:] == ["&"]:
        argv, specials = argv[:-1], specials[:-1]
    if specials:
        raise DocCommandError(f"unquoted {''.join(dict.fromkeys(specials))}: the shell would expand or act on "
                              "it; quote the word, e.g. 'task.data.csv.sep=\";\"'")
    if not argv:
        raise DocCommandError("empty command")
    return argv


# -- iiotfl run: Hydra overrides -------------------------------------------------------------------
def _override_text(override) -> str:
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(override.type, "")
    return prefix + override.get_key_element() + "="


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every point of the run (one without -m): lists of overrides Hydra's compose takes."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise DocCommandError(f"Hydra cannot parse the overrides: {str(err).splitlines()[0]}") from None
    axes = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            if not multirun:
                raise DocCommandError(f"{text} is a sweep; add -m")
            axes.append([_override_text(override) + value for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(point) for point in itertools.product(*axes)]


def check_run(args: list[str], tmp: Path) -> None:
    multirun = False
    overrides = []
    for arg in args:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            raise DocCommandError(f"iiotfl run {arg}: the test knows only -m; check it or drop it")
        elif not arg.lstrip("+~").startswith("hydra."):
            overrides.append(arg.replace("$PWD", str(tmp)))
    configs = []
    for point in sweep_points(overrides, multirun):
        try:
            configs.append(compose(point))
        except Exception as err:  # Hydra's errors: a missing key, an unknown option
            raise DocCommandError(f"does not compose ({' '.join(point)}): {str(err).splitlines()[0]}") from None
    _materialise(configs[0], tmp)
    try:
        validate(configs[0])  # the first point; a sweep records a later point the checks refuse and goes on
    except ConfigError as err:
        raise DocCommandError(f"refused by the config checks: {err}") from None


def _materialise(cfg: dict, tmp: Path) -> None:
    """Create, under the temporary $PWD, the certificate directory a command names."""
    certs = (cfg.get("engine") or {}).get("certs")
    if certs and Path(str(certs)).is_relative_to(tmp):
        create_certs(Path(str(certs)), gateways=int(cfg["fleet"]["gateways"]))


# -- other iiotfl commands ---------------------------------------------------------------------------
def check_iiotfl(args: list[str], tmp: Path) -> None:
    if not args:
        return
    if args[0] == "run":
        check_run(args[1:], tmp)
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        said = err.getvalue().strip().splitlines()[-1:] or [f"exit {exc.code}"]
        raise DocCommandError(f"iiotfl {args[0]}: the CLI refuses it: {said[0]}") from None
    if getattr(getattr(parsed, "parser", None), "passthrough", False):
        # The command hands its arguments to its own parser (iiotfl certs: security/certs.py's), which
        # would act on them: check each --flag against that parser's --help instead.
        text = command_help(args[0])
        for arg in args[1:]:
            if arg.startswith("-") and not re.search(rf"(?<![\w-]){re.escape(arg.split('=', 1)[0])}(?![\w-])", text):
                raise DocCommandError(f"iiotfl {args[0]}: the CLI refuses it: no flag {arg.split('=', 1)[0]} "
                                      "in its --help")


@functools.cache
def command_help(command: str) -> str:
    """``iiotfl COMMAND --help``, in this process; DocCommandError unless it prints usage and exits 0."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args([command, "--help"])
            if command != "run" and getattr(getattr(args, "parser", None), "passthrough", False):
                args.handler(args)  # a passthrough command hands --help on to its own parser
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise DocCommandError(f"iiotfl {command} --help exited {exc.code}") from None
        if "usage" not in out.getvalue().lower():
            raise DocCommandError(f"iiotfl {command} --help printed no usage") from None
        return out.getvalue()
    raise DocCommandError(f"iiotfl {command} --help did not exit")


# -- make -----------------------------------------------------------------------------------------------
@functools.cache
def make_targets() -> frozenset[str]:
    variables: dict[str, str] = {}
    targets: set[str] = set()

    def expand(text: str) -> str:
        for _ in range(10):
            text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), text)
        return text

    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        if m := re.match(r"^(\w+)\s*(\?=|:=|=)\s*(.*)$", line):
            variables[m.group(1)] = m.group(3).split("#")[0].strip()
        elif m := re.match(r"^([^:=]+):(?!=)", line):
            targets.update(expand(m.group(1)).split())
    return frozenset(targets - {".PHONY"})


def check_make(args: list[str], tmp: Path) -> None:
    variables = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    goals = [a for a in args if "=" not in a and not a.startswith("-")]
    if not goals:
        raise DocCommandError("make without a target; name it")
    for goal in goals:
        if goal not in make_targets():
            raise DocCommandError(f"make {goal}: no such target in the Makefile ({sorted(make_targets())})")
    if "run" in goals:
        check_run(split(variables.get("ARGS", "")) if variables.get("ARGS") else [], tmp)
    elif "ARGS" in variables:
        split(variables["ARGS"])  # the recipe's shell splits ARGS again


# -- docker compose ----------------------------------------------------------------------------------
@functools.cache
def compose_file() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _service(name: str) -> None:
    if name not in compose_file()["services"]:
        raise DocCommandError(f"docker compose: no service {name!r} in docker-compose.yml")


COMPOSE_SERVICE_ARGS = {"build", "up", "down", "logs", "ps", "pull", "stop", "start", "restart", "rm"}
COMPOSE_VALUE_OPTIONS = {"-e", "--env", "--entrypoint", "-u", "--user", "-w", "--workdir", "--name", "-p",
                         "--project-name"}


def check_compose(args: list[str], tmp: Path) -> None:
    profiles = {p for s in compose_file()["services"].values() for p in s.get("profiles", [])}
    while args and args[0].startswith("-"):
        if args[0] == "--profile":
            if args[1] not in profiles:
                raise DocCommandError(f"docker compose --profile {args[1]}: no service has it ({sorted(profiles)})")
            args = args[2:]
        elif args[0] in ("-p", "--project-name"):
            args = args[2:]
        else:
            raise DocCommandError(f"docker compose {args[0]}: the test does not know this option")
    if not args:
        raise DocCommandError("docker compose without a command")
    sub, rest = args[0], args[1:]
    if sub in COMPOSE_SERVICE_ARGS:
        for arg in rest:
            if not arg.startswith("-"):
                _service(arg)
    elif sub in ("run", "exec"):
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in COMPOSE_VALUE_OPTIONS else rest[1:]
        if not rest:
            raise DocCommandError(f"docker compose {sub} without a service")
        _service(rest[0])
        if rest[1:]:
            check_argv(rest[1:], tmp)
    elif sub == "cp":
        located = [a.split(":", 1)[0] for a in rest if ":" in a and not a.startswith(("/", "."))]
        if not located:
            raise DocCommandError("docker compose cp: neither side names SERVICE:PATH")
        for name in located:
            _service(name)
    else:
        raise DocCommandError(f"docker compose {sub}: the test does not know this command")


# -- Flower's tools ----------------------------------------------------------------------------------
@functools.cache
def flower_help(path: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([str(BIN / path[0]), *path[1:], "--help"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise DocCommandError(f"{' '.join(path)} --help exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return proc.stdout + proc.stderr


@functools.cache
def _warm_flower_help() -> None:
    """Run the --help calls the documented Flower commands need, side by side (each takes seconds)."""
    paths = set()
    for command in ALL_COMMANDS:
        with contextlib.suppress(DocCommandError):
            argv = split(command.text)
            words = [Path(argv[0]).name]
            if words[0] not in FLOWER_TOOLS:
                continue
            paths.add(tuple(words))
            for arg in argv[1:3]:
                if not re.fullmatch(r"[a-z][a-z-]*", arg):
                    break
                words.append(arg)
                paths.add(tuple(words))

    def warm(path: tuple[str, ...]) -> None:
        with contextlib.suppress(DocCommandError):
            flower_help(path)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(warm, sorted(paths)))


def check_flower(argv: list[str], tmp: Path) -> None:
    _warm_flower_help()
    path, rest = (argv[0],), argv[1:]
    while rest and not rest[0].startswith("-") and "Commands" in flower_help(path):
        if not re.search(rf"(?m)^\W*{re.escape(rest[0])}\b", flower_help(path)):
            raise DocCommandError(f"{' '.join(path)}: no command {rest[0]!r}")
        path, rest = (*path, rest[0]), rest[1:]
    text = flower_help(path)
    for arg in rest:
        if arg.startswith("-") and not re.fullmatch(r"-\d[\d.]*", arg):
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                raise DocCommandError(f"{' '.join(path)}: no flag {flag} in its --help")


# -- python scripts, repository executables ----------------------------------------------------------
def check_python(argv: list[str], tmp: Path) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        raise DocCommandError("python without a script of the repository")
    script = ROOT / argv[1]
    if not script.is_file():
        raise DocCommandError(f"{argv[1]}: no such script")
    source = script.read_text()
    for arg in argv[2:]:
        if arg.startswith("--") and arg.split("=", 1)[0] not in source:
            raise DocCommandError(f"{argv[1]} does not know {arg.split('=', 1)[0]}")


def check_argv(argv: list[str], tmp: Path) -> None:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]  # VAR=value before the command
    if not argv:
        raise DocCommandError("only variable assignments")
    prog, name = argv[0], Path(argv[0]).name
    if name == "iiotfl":
        check_iiotfl(argv[1:], tmp)
    elif name == "make":
        check_make(argv[1:], tmp)
    elif name == "docker" and argv[1:2] == ["compose"]:
        check_compose(argv[2:], tmp)
    elif name == "docker-compose":
        check_compose(argv[1:], tmp)
    elif name in FLOWER_TOOLS:
        check_flower([name, *argv[1:]], tmp)
    elif name in PYTHONS:
        check_python(argv, tmp)
    elif name in ALLOWED:
        pass
    elif "/" in prog and not prog.startswith(".venv/"):
        if not (ROOT / prog).is_file() or not os.access(ROOT / prog, os.X_OK):
            raise DocCommandError(f"{prog}: not an executable file of the repository")
    else:
        raise DocCommandError(f"{name}: the test cannot check it; add a check or list it in ALLOWED")


def check_command(text: str, tmp: Path) -> None:
    check_argv(split(text), tmp)


# -- tests ----------------------------------------------------------------------------------------------
@pytest.fixture
def pwd(tmp_path) -> Path:
    (tmp_path / "pwd").mkdir()
    return tmp_path / "pwd"


def test_documents_have_shell_commands():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1, "docs/ is missing"
    assert len(ALL_COMMANDS) > 20, [str(c) for c in ALL_COMMANDS]


def test_every_fence_names_its_language():
    bad = [f"{f.file}:{f.line}: ```{f.lang}" for f in ALL_FENCES if f.lang not in SHELL_FENCES | OTHER_FENCES]
    assert not bad, f"name the language of each fenced block ({sorted(SHELL_FENCES | OTHER_FENCES)}): {bad}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.file}:{c.line}")
def test_documented_command_works_as_written(command: Command, pwd: Path):
    try:
        check_command(command.text, pwd)
    except DocCommandError as err:
        pytest.fail(f"{command.file}:{command.line}: {err}\n    {command.text}", pytrace=False)


@pytest.mark.parametrize("text, says", [
    ("iiotfl run fleet.nope=1", "does not compose"),
    ("iiotfl run fleet.gateways=0", "refused by the config checks"),
    ("iiotfl run task.data.source=csv task.data.path=/data/plant_{partition}.csv", "unquoted {}"),
    ("iiotfl run 'task.data.path=/data/plant_{partition}.csv'", "Hydra cannot parse"),
    ("iiotfl run task.data.csv.sep=\";\"", "Hydra cannot parse"),
    ("iiotfl run engine=sim seed=0,1", "add -m"),
    ("iiotfl run -m codec=none,nope", "does not compose"),
    ("iiotfl run 'fleet.link_mix={lte_m:0.7", "cannot split"),
    ("iiotfl audit runs/<date>/<time>", "unquoted <>"),
    ("make nope", "no such target"),
    ("make run ARGS=\"fleet.rounds=-1\"", "refused"),
    ("docker compose up nope", "no service"),
    ("docker compose --profile nope run --rm certs", "no service has it"),
    ("flower-superlink --nope", "no flag --nope"),
    ("python bench/nope.py", "no such script"),
    ("rm -rf runs", "cannot check it"),
])
def test_the_checks_catch_bad_commands(text: str, says: str, pwd: Path):
    with pytest.raises(DocCommandError, match=re.escape(says)):
        check_command(text, pwd)


def test_allowed_commands_are_used():
    used = set()
    for c in ALL_COMMANDS:
        with contextlib.suppress(DocCommandError):
            used.add(Path(split(c.text)[0]).name)
    assert ALLOWED <= used, f"ALLOWED names commands no page uses: {sorted(ALLOWED - used)}"


def test_an_unknown_subcommand_or_option_is_caught(pwd: Path):
    for text in ("iiotfl nope runs/x", "iiotfl certs certs --nope", "iiotfl gateway --nope"):
        with pytest.raises(DocCommandError, match="refuses"):
            check_command(text, pwd)


def _iiotfl_commands() -> list[str]:
    used = set()
    for c in ALL_COMMANDS:
        with contextlib.suppress(DocCommandError):
            argv = split(c.text)
            if Path(argv[0]).name == "iiotfl" and len(argv) > 1 and argv[1] != "run":
                used.add(argv[1])
    return sorted(used)


@pytest.mark.parametrize("command", _iiotfl_commands())
def test_documented_subcommand_answers_help(command: str):
    try:
        command_help(command)
    except DocCommandError as err:
        pytest.fail(str(err), pytrace=False)


def test_readme_starts_with_the_two_commands_and_stays_a_front_door():
    text = (ROOT / "README.md").read_text()
    first = next(f for f in ALL_FENCES if f.file == "README.md")
    assert first.lang in SHELL_FENCES
    assert [split(c.text) for c in commands(first)] == [["make", "run"], ["make", "test"]]
    assert "\n## " not in text.split("```")[0], "the two commands come before any section"
    assert len(text.splitlines()) <= 250, "README.md is the front door; move depth into docs/"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", text))
    pages = {str(p.relative_to(ROOT)) for p in DOCS[1:]}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not (m := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file) if file else doc
            if not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                bad.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad


TOP = "server|clients|configs|tasks|strategies|links|privacy|security|compat|bench|tests|docker|docs"
REPO_PATH = re.compile(rf"`((?:{TOP})/[\w./-]*)`")
DOTTED = re.compile(r"`(iiotfl(?:\.\w+)+)(?::(\w+))?(?:\(.*?\))?`")


def _resolves(dotted: str, attr: str | None) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in [*parts[cut:], *([attr] if attr else [])]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_named_files_and_modules_exist():
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for path in REPO_PATH.findall(text):
            if not (ROOT / path).exists():
                bad.append(f"{doc.relative_to(ROOT)}: {path}")
        for dotted, attr in DOTTED.findall(text):
            if not _resolves(dotted, attr or None):
                bad.append(f"{doc.relative_to(ROOT)}: {dotted}{':' + attr if attr else ''}")
    assert not bad, f"named in the docs but not in the repository: {bad}"


def _leaf_keys(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, value in node.items() for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def test_configuration_page_names_every_group_option_and_key():
    text = re.sub(r"(?ms)^```.*?^```", "", (ROOT / "docs" / "configuration.md").read_text())
    named = set(re.findall(r"`([^`\n]+)`", text))
    missing = []
    top = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())
    for key in _leaf_keys({k: v for k, v in top.items() if k not in ("defaults", "hydra")}):
        if key not in named:
            missing.append(f"config.yaml: {key}")
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        group, option = path.parent.name, path.stem
        if option not in named:
            missing.append(f"{group}={option}")
        for key in _leaf_keys(yaml.safe_load(path.read_text()) or {}):
            if key != "name" and key not in named:
                missing.append(f"{group}/{option}.yaml: {key}")
    assert not missing, f"docs/configuration.md does not name: {missing}"


def test_every_attack_in_the_security_model_names_tests_that_exist():
    """docs/security.md: one row per attack; each names the tests that try it (bench/security.py runs them)."""
    rows = re.findall(r"(?m)^\| (\d+) \| .+ \| (.+) \|$", (ROOT / "docs" / "security.md").read_text())
    assert len(rows) >= 15, "the security model lists the attacks it defends against"
    missing = []
    for number, cell in rows:
        ids = re.findall(r"`(tests/[^`]+)`", cell)
        if not ids:
            missing.append(f"row {number}: no test")
        for node in ids:
            path, _, name = node.partition("::")
            if not (ROOT / path).is_file() or (name and f"def {name}(" not in (ROOT / path).read_text()):
                missing.append(f"row {number}: {node}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
