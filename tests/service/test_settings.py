"""Settings: environment, settings files (YAML, dotenv), command-line overrides, model specs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.settings import ModelSpec, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "REID_CONFIG",
        "REID_MODELS",
        "REID_PORT",
        "REID_DATA_DIR",
        "REID_DATASET_ROOTS",
        "REID_DATABASE_URL",
        "REID_INDEX_BACKEND",
        "REID_MAX_K",
        "REID_AUTH",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    s = load_settings()
    assert s.host == "127.0.0.1" and s.port == 8000 and s.index_backend == "auto"
    assert s.models == [] and s.dataset_roots == []
    assert s.resolved_database_url.startswith("sqlite:///") and s.resolved_database_url.endswith(
        "reid.sqlite3"
    )


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REID_PORT", "9001")
    monkeypatch.setenv("REID_MODELS", "person=/m/p,vehicle=/m/v")
    monkeypatch.setenv("REID_DATASET_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("REID_INDEX_BACKEND", "milvus")
    s = load_settings()
    assert s.port == 9001 and s.index_backend == "milvus"
    assert s.models == [ModelSpec("person", Path("/m/p")), ModelSpec("vehicle", Path("/m/v"))]
    assert s.dataset_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("REID_MODELS", '{"person": "/m/p2"}')
    assert load_settings().models == [ModelSpec("person", Path("/m/p2"))]
    monkeypatch.setenv("REID_DATASET_ROOTS", '["/x", "/y"]')
    assert load_settings().dataset_roots == [Path("/x"), Path("/y")]


def test_yaml_file_then_env_then_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "reid.yaml"
    config.write_text("port: 7000\nmax_k: 50\nmodels:\n  - person=/yaml/p\ndataset_roots: [/data]\n")
    s = load_settings(config)
    assert s.port == 7000 and s.max_k == 50 and s.models == [ModelSpec("person", Path("/yaml/p"))]
    monkeypatch.setenv("REID_PORT", "7100")
    assert load_settings(config).port == 7100  # the environment beats the file
    assert load_settings(config, port=7200, host=None).port == 7200  # the command line beats both
    monkeypatch.setenv("REID_CONFIG", str(config))
    assert load_settings().max_k == 50


def test_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / "reid.env"
    env.write_text("REID_PORT=7300\nREID_MODELS=person=/env/p\n")
    s = load_settings(env)
    assert s.port == 7300 and s.models == [ModelSpec("person", Path("/env/p"))]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="NAME=MODEL_DIR"):
        Settings(models=["just-a-path"])
    with pytest.raises(ValueError):
        Settings(index_backend="elasticsearch")
    bad = tmp_path / "typo.yaml"
    bad.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_settings(bad)


@settings(max_examples=40, deadline=None)
@given(
    name=st.text(st.characters(categories=("L", "N"), include_characters="-_."), min_size=1, max_size=20),
    path=st.text(st.characters(categories=("L", "N"), include_characters="/-_.="), min_size=1, max_size=40),
)
def test_model_spec_round_trip(name: str, path: str) -> None:
    spec = ModelSpec.parse(f"{name}={path}")
    assert spec.name == name.strip() and spec.path == Path(path.strip()).expanduser()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "person=/nonexistent/model"], "not an exported model directory"),
        (["--database-url", "mysql://u@h/db"], "not supported"),
        (["--index-backend", "annoy"], "--index-backend='annoy' is not valid: expected one of auto, faiss"),
    ],
)
def test_reid_serve_refuses_foreseeable_mistakes_without_a_traceback(args: list[str], message: str) -> None:
    import typer
    from typer.testing import CliRunner

    from service.cli import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert message in text and "Traceback" not in result.output


def test_cli_help_keeps_every_default() -> None:
    """Rich would read "[default: ...]" as markup and drop it: the help must show the defaults."""
    from typer.testing import CliRunner

    from reid_cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    serve = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert serve.exit_code == 0
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: auto"):
        assert default in serve.output, serve.output
    calibrate = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert "(default: 0.002)" in calibrate.output


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REID_PORT": "abc"}, "REID_PORT='abc' is not valid: expected an integer between 0 and 65535"),
        ({"REID_MAX_K": "0"}, "REID_MAX_K='0' is not valid: expected an integer of at least 1"),
        ({"REID_AUTH": "maybe"}, "REID_AUTH='maybe' is not valid: expected one of on, off, auto"),
        ({"REID_MODELS": "a-path"}, "REID_MODELS='a-path' is not valid: model 'a-path' must be"),
    ],
)
@pytest.mark.parametrize("command", [["serve"], ["db", "current"]])
def test_a_bad_environment_variable_is_named_by_the_real_cli(
    env: dict[str, str], expected: str, command: list[str], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reid_cli", *command],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "REID_DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert expected in output
    assert "pydantic" not in output.lower() and "Traceback" not in output and "validation error" not in output


def test_settings_errors_name_the_file_key_or_the_option(tmp_path: Path) -> None:
    yaml_file = tmp_path / "reid.yaml"
    yaml_file.write_text("port: x\nprot: 1\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(yaml_file)
    lines = str(caught.value).splitlines()
    expected = "port='x' in the settings file reid.yaml is not valid: expected an integer between 0 and 65535"
    assert expected in lines
    assert any(line.startswith("prot in the settings file reid.yaml is not a setting") for line in lines)
    assert str(tmp_path) not in str(caught.value)  # the file's name, not where it lives
    env_file = tmp_path / "reid.env"
    env_file.write_text("REID_BOGUS=1\n")
    with pytest.raises(SettingsError, match=r"^REID_BOGUS in the settings file reid.env is not a setting"):
        load_settings(env_file)
    with pytest.raises(SettingsError, match=r"^--port=70000 is not valid: expected an integer between"):
        load_settings(port=70000)
    # A database URL may hold a password: the setting is named, its value never repeated.
    with pytest.raises(SettingsError) as caught:
        load_settings(database_url=12345)
    message = str(caught.value)
    assert "--database-url is not valid: expected text" in message and "12345" not in message
