"""The command line: flags become the same Config a file or the environment would give."""

from __future__ import annotations

from pathlib import Path

import pytest

from renderer.cli import build_parser, config_from_args, main
from renderer.config import Wait


def test_run_flags_become_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["run", "--template", f"{tmp_path}/t.j2:{tmp_path}/out.cfg", "--max-connections", "16",
         "--var", "http_port=8080", "--wait", "5ms:20ms", "--max-stale", "10s", "--consul-addr", "10.0.0.1:8500"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.templates[0].destination == tmp_path / "out.cfg"
    assert config.consul.max_connections == 16 and config.consul.addr == "10.0.0.1:8500"
    assert config.vars == {"http_port": "8080"} and config.wait == Wait(0.005, 0.02) and config.max_stale == 10.0


def test_a_bad_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", "--template", f"{tmp_path}/t.j2:{tmp_path}/o", "--var", "no-equals-sign"])
    err = capsys.readouterr().err
    assert code == 2 and "--var 'no-equals-sign': expected KEY=VALUE" in err


def test_every_key_is_declared_once_and_reaches_flags_file_and_environment(tmp_path: Path) -> None:
    """config.KEYS is the one declaration: a flag per key (unless file/env only), a TOML key, the
    environment variable it names, and a field of Config (or of its Consul settings)."""
    from dataclasses import fields

    from renderer.config import ENV_KEYS, KEYS, Config, ConsulSettings, read_config_file

    config_fields = {f.name for f in fields(Config)} | {f.name for f in fields(ConsulSettings)}
    aliases = {"consul_addr": "addr", "consul_ssl": "ssl"}
    parser = build_parser()
    for key in KEYS:
        value = [] if key.flag == "switch" else [key.choices[0] if key.choices else "1"]
        if key.flag == "none":
            with pytest.raises(SystemExit):
                parser.parse_args(["run", key.option, *value])
        else:
            assert getattr(parser.parse_args(["run", key.option, *value]), key.name) is not None, key.name
        assert aliases.get(key.name, key.name) in config_fields or key.name == "token_file", key.name
        if key.env:
            assert ENV_KEYS[key.env] == key.name
    config_file = tmp_path / "c.toml"
    config_file.write_text("".join(f'{key.name} = "x"\n' for key in KEYS[:3]))
    assert set(read_config_file(config_file)) == {key.name for key in KEYS[:3]}


def test_address_policy_flags(tmp_path: Path) -> None:
    template = ["--template", f"{tmp_path}/t.j2:{tmp_path}/out.cfg"]
    config = config_from_args(build_parser().parse_args(["run", *template]))
    assert (config.allow_local_addresses, config.allow_host_names) == (False, False)
    args = build_parser().parse_args(
        ["run", *template, "--allow-local-addresses", "true", "--allow-host-names", "true"]
    )
    config = config_from_args(args)
    assert (config.allow_local_addresses, config.allow_host_names) == (True, True)
    text = build_parser().format_help() + _run_help()
    assert "--allow-local-addresses" in text and "CONSUL_RENDERER_ALLOW_HOST_NAMES" in text


def _run_help() -> str:
    import argparse

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["run"].format_help()
