"""README promises of the configuration and the command line: a template's `haproxy` defaults to
true when the destination's name contains "haproxy"; relative paths in a config file are relative
to the file's directory; `docker-registrator` without the Docker SDK says how to get it and exits 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from renderer import cli
from renderer.config import TemplateSpec, load


def config_file(directory: Path, templates: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "renderer.toml"
    path.write_text(templates)
    return path


@pytest.mark.parametrize(
    ("destination", "haproxy"),
    [
        ("/etc/haproxy/haproxy.cfg", True),
        ("/srv/lb/my-haproxy-backends.conf", True),
        ("haproxy", True),
        ("/etc/lb/HAProxy.cfg", True),  # whatever the case
        ("/etc/haproxy/routes.map", False),  # the name, not the directory, decides
        ("/etc/nginx/nginx.conf", False),
    ],
)
def test_haproxy_defaults_to_true_when_the_destinations_name_contains_haproxy(
    tmp_path: Path, destination: str, haproxy: bool
) -> None:
    path = config_file(tmp_path, f'[[template]]\nsource = "t.j2"\ndestination = "{destination}"\n')
    assert [t.haproxy for t in load(path, {}, environ={}).templates] == [haproxy]
    assert TemplateSpec.parse_flag(f"t.j2:{destination}").haproxy is haproxy  # --template SRC:DST alike


@pytest.mark.parametrize(("destination", "given"), [("/etc/haproxy/haproxy.cfg", False), ("/etc/lb/lb.cfg", True)])
def test_an_explicit_haproxy_key_wins_over_the_destinations_name(tmp_path: Path, destination: str, given: bool) -> None:
    text = f'[[template]]\nsource = "t.j2"\ndestination = "{destination}"\nhaproxy = {str(given).lower()}\n'
    assert [t.haproxy for t in load(config_file(tmp_path, text), {}, environ={}).templates] == [given]


def test_relative_template_paths_in_a_config_file_are_relative_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part
    directory = tmp_path / "etc" / "renderer"
    text = (
        '[[template]]\nsource = "templates/haproxy.cfg.j2"\ndestination = "../out/haproxy.cfg"\n'
        '[[template]]\nsource = "/abs/routes.map.j2"\ndestination = "/abs/routes.map"\n'
    )
    templates = load(config_file(directory, text), {}, environ={}).templates
    assert [(t.source, t.destination) for t in templates] == [
        (directory / "templates" / "haproxy.cfg.j2", directory / ".." / "out" / "haproxy.cfg"),
        (Path("/abs/routes.map.j2"), Path("/abs/routes.map")),  # absolute paths stay as written
    ]


def test_relative_files_in_a_config_file_are_relative_to_its_directory_those_from_flags_to_the_working_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    directory = tmp_path / "etc" / "renderer"
    directory.mkdir(parents=True)
    (directory / "token").write_text("file-token\n")
    (elsewhere / "token").write_text("cwd-token\n")
    text = 'token_file = "token"\nca_file = "tls/ca.pem"\ncert_file = "/abs/cert.pem"\n'
    path = config_file(directory, text)
    config = load(path, {}, environ={})
    assert config.consul.token == "file-token"
    assert (config.consul.ca_file, config.consul.cert_file) == (str(directory / "tls" / "ca.pem"), "/abs/cert.pem")
    empty = load(config_file(directory, 'ca_file = ""\n'), {}, environ={})
    assert not empty.consul.ca_file, "an empty value stays none, not the file's directory"
    from_env = load(path, {}, environ={"CONSUL_HTTP_TOKEN_FILE": "token", "CONSUL_CACERT": "ca.pem"})
    assert (from_env.consul.token, from_env.consul.ca_file) == ("cwd-token", "ca.pem")  # the environment's: as written


def test_docker_registrator_without_the_docker_sdk_says_how_to_install_it_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)  # `import docker` fails, as without the extra
    assert cli.main(["docker-registrator", "--sync-once"]) == 2
    err = capsys.readouterr().err
    assert "Docker SDK" in err and "pip install 'consul-renderer[docker]'" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
