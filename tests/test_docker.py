"""Static checks of docker/: the worker image (Dockerfile) and the stack (compose.yaml, env.example).

No container engine runs where orch is developed and tested, so the image is never built and the stack never
started here. These checks need neither an engine nor the network; they read the files and hold them against
the real code:

- compose.yaml parses, with its variables filled in from env.example the way compose fills them in;
- it has the services (postgres with a pg_isready healthcheck and a volume, mlflow, worker with a GPU
  reservation), the start-up order (depends_on conditions), and volumes where the commands write;
- every `orch` command (compose's, and the Dockerfile's ENTRYPOINT + CMD) names a real subcommand and real
  flags of orch's Typer app, and click parses it; every `mlflow server` command likewise against the
  installed mlflow; `python -m trainer.prepare` against the trainer's own parser;
- no literal secret: a password-like variable is a required ${VAR} with no default, no URL holds a password,
  env.example defines exactly the variables compose reads, with a placeholder password;
- the Dockerfile pins torch as the Makefile does and installs it before the project, copies only what
  .dockerignore lets into the build context, runs as a non-root user, and bakes no secret into ENV or ARG.

Not checked: that the image builds, that the base image tag and the torch wheel index exist, that the
containers see the GPUs, that the services start and reach each other (see docker/README.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / "env.example"

# A variable or an option whose value is a secret: its value may only come from the env file.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|_KEY$|^PGPASS", re.IGNORECASE)
# A required reference, ${VAR} or ${VAR:?message}; ${VAR:-default} would carry a literal default secret.
REQUIRED_REF = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(:?\?[^}]*)?\}")
# scheme://user:password@host: a URL that would put a password on a command line or in `docker inspect`.
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]*@")
# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


# --- reading the files -------------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """A string of compose.yaml as compose would pass it on, given the env file's variables."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        assert match.group(4) is None, f"write ${{{match.group(4)}}}, not ${match.group(4)}, in compose.yaml"
        name, op, arg = match.group(1, 2, 3)
        value = env.get(name)
        if op in (":?", "?"):
            missing = value is None or (op == ":?" and value == "")
            assert not missing, f"${{{name}}} is required ({arg}) but not set"
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        assert value is not None, f"${{{name}}} is neither set nor given a default"
        return value

    return REFERENCE.sub(one, text)


def interpolated(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def strings(node):
    """Every string in a YAML tree, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)


def references(node) -> dict[str, bool]:
    """The variables compose.yaml reads: name -> whether every reference to it gives a default."""
    found: dict[str, bool] = {}
    for text in strings(node):
        for match in REFERENCE.finditer(text):
            if match.group(1):
                found[match.group(1)] = found.get(match.group(1), True) and match.group(2) in (":-", "-")
    return found


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment lines (and the parser directive)
    dropped, as Docker's parser does."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions:
        if word == "ARG":
            name, _, default = rest.partition("=")
            defaults[name] = default
    return defaults


def expand_args(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def exec_form(instructions, word: str) -> list[str] | None:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON) form: the shell form would make orch a child
    of /bin/sh, which does not pass SIGTERM on, and the worker would never checkpoint its runs."""
    found = [rest for w, rest in instructions if w == word]
    if not found:
        return None
    try:
        value = json.loads(found[-1])
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f'{word} {found[-1]}: write it in exec form, {word} ["orch", …]'
    )
    return value


ENV = read_env_file(ENV_EXAMPLE)
RAW = yaml.safe_load(COMPOSE.read_text())
COMPOSE_FILE = interpolated(RAW, ENV)
SERVICES = COMPOSE_FILE["services"]
INSTRUCTIONS = dockerfile_instructions()
WORKDIR = PurePosixPath([rest for word, rest in INSTRUCTIONS if word == "WORKDIR"][-1])


def uses_orch_image(service: dict) -> bool:
    build = service.get("build")
    if not isinstance(build, dict):
        return False
    return (DOCKER / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def argv(service: dict) -> list[str]:
    """What a service runs: its entrypoint and command, or the image's. As in Docker, a service that sets its
    own entrypoint drops the image's CMD."""
    image = uses_orch_image(service)
    entrypoint = service.get("entrypoint", exec_form(INSTRUCTIONS, "ENTRYPOINT") if image else None)
    default_cmd = exec_form(INSTRUCTIONS, "CMD") if image and "entrypoint" not in service else None
    command = service.get("command", default_cmd)
    split = [shlex.split(part) if isinstance(part, str) else list(part or []) for part in (entrypoint, command)]
    return split[0] + split[1]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mount_targets(service: dict) -> dict[PurePosixPath, str]:
    """Where a service's volumes are mounted: target -> source (a named volume or a host path)."""
    targets = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets[PurePosixPath(volume["target"])] = volume.get("source", "")
        else:
            source, target = volume.split(":")[:2]
            targets[PurePosixPath(target)] = source
    return targets


def mounted_volume(service: dict, path: str) -> str | None:
    """The volume that holds `path` (relative paths resolve against the image's WORKDIR), or None."""
    absolute = WORKDIR / path
    for target, source in mount_targets(service).items():
        if absolute == target or target in absolute.parents:
            return source
    return None


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} not in {shlex.join(args)}"
    return args[args.index(name) + 1]


# --- checking commands against the real command-line interfaces ---------------------------------------------


def check_flags(path: list[str], command, args: list[str]) -> None:
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-") and not re.fullmatch(r"-\d.*", arg):  # a negative number is a value
            flag = arg.split("=", 1)[0]
            assert flag in known, f"`{' '.join(path)}` has no option {flag}; it has {', '.join(sorted(known))}"


def check_parses(path: list[str], command, args: list[str]) -> None:
    """click parses the arguments as the command would (values' types, required arguments), running nothing."""
    try:
        command.make_context(" ".join(path), list(args))
    except Exception as exc:  # click's (or typer's copy of click's) UsageError, BadParameter…
        raise AssertionError(f"`{shlex.join(path + args)}`: {exc}") from None


def check_orch(args: list[str]) -> None:
    import typer

    from orchestrator.cli import app

    command, path = typer.main.get_command(app), ["orch"]
    while hasattr(command, "commands"):  # a group: the next word names one of its subcommands
        assert args and args[0] in command.commands, (
            f"`{' '.join(path)}` has no subcommand {args[0] if args else '(none given)'!r}; "
            f"it has {', '.join(sorted(command.commands))}"
        )
        path, command, args = path + [args[0]], command.commands[args[0]], args[1:]
    check_flags(path, command, args)
    check_parses(path, command, args)


def check_mlflow(args: list[str]) -> None:
    from mlflow.cli import cli

    assert args[:1] == ["server"], f"expected `mlflow server …`, got `mlflow {shlex.join(args)}`"
    server = cli.commands["server"]
    check_flags(["mlflow", "server"], server, args[1:])
    check_parses(["mlflow", "server"], server, args[1:])


class Parsed(Exception):
    """Raised in place of the real preparation once trainer.prepare has parsed its arguments."""


def check_prepare(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own argparse parser takes the arguments; nothing is tokenised or written."""
    import trainer.prepare as prepare

    def parsed(*args, **kwargs):
        raise Parsed

    for corpus in ("embedded_corpus", "file_corpus", "fineweb_corpus"):
        monkeypatch.setattr(prepare, corpus, lambda *a, **k: iter(()))
    monkeypatch.setattr(prepare, "prepare", parsed)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            prepare.main(list(args))
    except Parsed:
        return
    except SystemExit:
        raise AssertionError(f"`python -m trainer.prepare {shlex.join(args)}`: {stderr.getvalue().strip()}") from None
    raise AssertionError("trainer.prepare.main returned without preparing anything")


def check_command(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if words[:1] == ["orch"]:
        check_orch(words[1:])
    elif words[:1] == ["mlflow"]:
        check_mlflow(words[1:])
    elif words[:3] == ["python", "-m", "trainer.prepare"]:
        check_prepare(words[3:], monkeypatch)
    else:
        raise AssertionError(f"no check for the program of `{shlex.join(words)}`: add one to tests/test_docker.py")


COMMANDS = {f"service {name}": argv(service) for name, service in SERVICES.items() if argv(service)}
COMMANDS["Dockerfile ENTRYPOINT + CMD"] = exec_form(INSTRUCTIONS, "ENTRYPOINT") + exec_form(INSTRUCTIONS, "CMD")


@pytest.mark.parametrize("words", COMMANDS.values(), ids=COMMANDS.keys())
def test_every_command_exists(words, monkeypatch):
    check_command(words, monkeypatch)


@pytest.mark.parametrize(
    "words",
    [
        ["orch", "wroker"],  # a misspelt subcommand
        ["orch", "db"],  # a group without its subcommand
        ["orch", "worker", "--gpu-per-run", "1"],  # a misspelt flag
        ["orch", "worker", "--gpus-per-run", "two"],  # a value of the wrong type
        ["orch", "worker", "--db"],  # a flag without its value
        ["mlflow", "server", "--artifact-destination", "/mlartifacts"],
        ["mlflow", "ui"],
        ["python", "-m", "trainer.prepare", "embeded", "--out", "data/embedded"],
        ["python", "-m", "trainer.prepare", "embedded", "--output", "data/embedded"],
        ["torchrun", "-m", "trainer"],
    ],
)
def test_the_command_checks_catch_mistakes(words, monkeypatch):
    with pytest.raises(AssertionError):
        check_command(words, monkeypatch)


# --- compose.yaml -------------------------------------------------------------------------------------------


def test_services_and_their_image():
    assert {"postgres", "mlflow", "worker"} <= set(SERVICES)
    assert re.fullmatch(r"postgres:16(\.\d+)*", SERVICES["postgres"]["image"])
    # Everything but the database runs the orch image, built here: no service may pull some other image of
    # that name from a registry.
    for name, service in SERVICES.items():
        if name != "postgres":
            assert uses_orch_image(service), f"{name} does not build docker/Dockerfile"
            assert service["image"] == SERVICES["worker"]["image"], f"{name} names another image"


def test_postgres_keeps_its_data_and_says_when_it_is_ready():
    postgres = SERVICES["postgres"]
    assert mount_targets(postgres).get(PurePosixPath("/var/lib/postgresql/data")) in RAW["volumes"]
    test = postgres["healthcheck"]["test"]
    test = test if isinstance(test, str) else " ".join(test)
    # Over TCP (-h): while the image's init scripts run, only the Unix socket answers, so a check on it would
    # report ready before MLflow's database exists.
    assert re.search(r"pg_isready .*-h (127\.0\.0\.1|localhost)\b", test), test
    # The init script that gives MLflow its own database is mounted where the image runs such scripts.
    assert "./initdb" in mount_targets(postgres).values()
    assert (DOCKER / "initdb").is_dir() and any((DOCKER / "initdb").glob("*.sh"))


def depends(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on", {})
    if isinstance(deps, list):  # the short form means "started"
        return dict.fromkeys(deps, "service_started")
    return {dep: spec["condition"] for dep, spec in deps.items()}


def test_start_up_order():
    assert depends("mlflow")["postgres"] == "service_healthy"
    assert depends("worker")["postgres"] == "service_healthy"
    # Started suffices: the worker's MLflow outbox waits for the tracking server by itself.
    assert depends("worker")["mlflow"] in ("service_started", "service_healthy")
    # Whatever connects to the database waits until it accepts connections.
    for name, service in SERVICES.items():
        if {"ORCH_DB", "PGPASSWORD"} & set(environment(service)):
            assert depends(name).get("postgres") == "service_healthy", name


def test_the_worker_reserves_the_gpus():
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and ("count" in d or "device_ids" in d)
        for d in devices
    ), devices


def test_the_worker_reads_its_database_and_tracking_server_from_the_environment():
    worker = SERVICES["worker"]
    assert {"ORCH_DB", "ORCH_MLFLOW"} <= set(environment(worker))
    assert "--db" not in argv(worker) and "--mlflow" not in argv(worker)
    assert RAW["services"]["worker"]["environment"]["ORCH_DB"].startswith("${ORCH_DB")


def test_volumes_are_where_the_commands_write():
    from trainer.config import TrainConfig

    worker, mlflow = SERVICES["worker"], SERVICES["mlflow"]
    runs_dir = option(argv(worker), "--runs-dir")
    assert mounted_volume(worker, runs_dir) in RAW["volumes"], f"--runs-dir {runs_dir} is not on a volume"
    # A run's data.path (relative, by default data/embedded) resolves against the worker's WORKDIR.
    data = mounted_volume(worker, TrainConfig().data.path)
    assert data in RAW["volumes"], f"{WORKDIR / TrainConfig().data.path} is not on a volume"
    artifacts = option(argv(mlflow), "--artifacts-destination")
    assert mounted_volume(mlflow, artifacts) in RAW["volumes"], f"{artifacts} is not on a volume"
    if "prepare" in SERVICES:  # the one-shot preparation writes into the very volume the worker reads
        assert mounted_volume(SERVICES["prepare"], option(argv(SERVICES["prepare"]), "--out")) == data


def test_new_volumes_are_writable_by_the_image_user():
    # A new named volume takes the owner of the directory it is mounted on: one the image does not create
    # (as its user, before USER) would belong to root, and the worker could not write there.
    made = {token for word, rest in INSTRUCTIONS if word == "RUN" and "mkdir" in rest for token in shlex.split(rest)}
    for name, service in SERVICES.items():
        if uses_orch_image(service):
            for target, source in mount_targets(service).items():
                if source in RAW["volumes"]:
                    assert str(target) in made, f"{name}: the Dockerfile does not create {target}"


def test_mlflow_answers_the_name_the_workers_use():
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [host.strip() for host in option(argv(SERVICES["mlflow"]), "--allowed-hosts").split(",")]
    # Otherwise the server's DNS-rebinding protection refuses every request of the workers (403).
    assert is_allowed_host_header(allowed, urlsplit(ENV["ORCH_MLFLOW"]).netloc), allowed
    assert urlsplit(ENV["ORCH_MLFLOW"]).hostname == "mlflow"
    assert option(argv(SERVICES["mlflow"]), "--port") == str(urlsplit(ENV["ORCH_MLFLOW"]).port)


def literal_secrets(compose: dict) -> list[str]:
    """Each place in a compose tree (not interpolated) where a secret is written out."""
    found = []
    for name, service in compose.get("services", {}).items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not REQUIRED_REF.fullmatch(value):
                found.append(f"{name}: {key}={value!r} is not a required ${{VAR}}")
    found += [f"a URL with a password: {s!r}" for s in strings(compose) if URL_WITH_PASSWORD.search(s)]
    return found


def test_no_literal_secrets():
    assert literal_secrets(RAW) == []


@pytest.mark.parametrize(
    "environment",
    [
        {"POSTGRES_PASSWORD": "hunter2"},
        {"PGPASSWORD": "${POSTGRES_PASSWORD:-hunter2}"},
        ["POSTGRES_PASSWORD=hunter2"],
        {"ORCH_DB": "postgresql+psycopg://orch:hunter2@postgres/orch"},
        {"ORCH_DB": "postgresql+psycopg://orch:${POSTGRES_PASSWORD}@postgres/orch"},
    ],
)
def test_the_secret_check_catches_secrets(environment):
    assert literal_secrets({"services": {"x": {"environment": environment}}})


def test_env_example_defines_what_compose_reads():
    read = references(RAW)
    required = {name for name, always_default in read.items() if not always_default}
    assert sorted(required - set(ENV)) == [], "compose.yaml reads these, docker/env.example lacks them"
    assert sorted(set(ENV) - set(read)) == [], "docker/env.example sets these, compose.yaml never reads them"
    assert ENV["POSTGRES_PASSWORD"] == "change-me", "env.example holds a placeholder, never a real password"


def test_env_example_urls_agree_with_the_database_service():
    from sqlalchemy.engine import make_url

    url = make_url(ENV["ORCH_DB"])
    assert url.password is None, "the password goes as PGPASSWORD; orch keeps it out of trainers' environment"
    assert (url.username, url.database) == (ENV["POSTGRES_USER"], ENV["POSTGRES_DB"])
    assert url.host == "postgres" and url.drivername == "postgresql+psycopg"
    assert not any(URL_WITH_PASSWORD.search(value) for value in ENV.values())


# --- Dockerfile ---------------------------------------------------------------------------------------------


def makefile_torch() -> str:
    match = re.search(r"^TORCH \?= *(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile has no `TORCH ?= …` line"
    return match.group(1)


def pip_installs(instructions) -> list[tuple[int, list[str]]]:
    """(position, words) of each RUN's `pip install`, with ARG defaults filled in."""
    defaults, found = arg_defaults(instructions), []
    for position, (word, rest) in enumerate(instructions):
        if word == "RUN":
            for part in re.split(r"&&|;", expand_args(rest, defaults)):
                words = shlex.split(part)
                if "pip" in words and words[words.index("pip") + 1 : words.index("pip") + 2] == ["install"]:
                    found.append((position, words[words.index("pip") + 2 :]))
    return found


def test_torch_is_pinned_as_in_the_makefile_and_installed_before_the_project():
    pin = makefile_torch()
    installs = pip_installs(INSTRUCTIONS)
    torch = [(position, words) for position, words in installs if any(w.startswith("torch") for w in words)]
    assert torch, "no `pip install torch…` in the Dockerfile"
    assert pin in torch[0][1], f"the Dockerfile installs {torch[0][1]}, the Makefile pins {pin}"
    # The project: the directory that pyproject.toml was copied into.
    copied = [shlex.split(rest) for word, rest in INSTRUCTIONS if word == "COPY" and "pyproject.toml" in rest]
    assert copied, "the Dockerfile never copies pyproject.toml"
    project_dir = copied[0][-1].rstrip("/") or "/"
    project = [position for position, words in installs if project_dir in {w.rstrip("/") for w in words}]
    assert project, f"no `pip install {project_dir}` in the Dockerfile"
    assert torch[0][0] < project[0], "torch must be installed before the project, or pip picks its own torch"


def test_the_base_image_is_pinned_and_matches_the_torch_build():
    base = [rest for word, rest in INSTRUCTIONS if word == "FROM"][-1].split()[0]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.match(r"\d+\.\d+", tag), f"FROM {base}: pin a versioned tag"
    index = arg_defaults(INSTRUCTIONS)["TORCH_INDEX"]
    cuda = re.search(r"/whl/cu(\d+)(\d)$", index)
    assert cuda, f"TORCH_INDEX={index} is not one of PyTorch's CUDA indexes"
    if name == "nvidia/cuda":
        assert tag.startswith(f"{cuda.group(1)}.{cuda.group(2)}."), f"CUDA {tag} under torch wheels of {index}"


def test_the_image_runs_orch_worker_as_a_non_root_user():
    assert exec_form(INSTRUCTIONS, "ENTRYPOINT") == ["orch"]
    assert exec_form(INSTRUCTIONS, "CMD") == ["worker"]
    users = [rest.split(":")[0] for word, rest in INSTRUCTIONS if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert WORKDIR.is_absolute()


def test_the_image_bakes_in_no_secret():
    for word, rest in INSTRUCTIONS:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_]\w*)(?==|\s|$)", rest):
                assert not SECRET_NAME.search(name), f"{word} {name}: a secret would stay in the image's layers"
                # Runtime configuration, which may hold a password ($ORCH_DB), comes from compose.
                assert name not in ("ORCH_DB", "ORCH_MLFLOW") and not name.startswith("POSTGRES_"), f"{word} {name}"
            assert not URL_WITH_PASSWORD.search(rest), f"{word} {rest}"


def test_copied_files_are_in_the_build_context():
    # .dockerignore at the root lets in only what it re-includes with `!`; a COPY of anything else fails.
    allowed = {line[1:].strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for word, rest in INSTRUCTIONS:
        if word == "COPY":
            for source in [s for s in shlex.split(rest) if not s.startswith("--")][:-1]:
                assert source.strip("/") in allowed, f"COPY {source}: not let in by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
