from __future__ import annotations

import logging
from pathlib import Path

import pytest

from renderer.config import ConsulSettings, TemplateSpec, Wait, load, parse_consul_addr, parse_duration
from renderer.errors import ConfigError


def test_durations() -> None:
    assert parse_duration("250ms", "k") == 0.25
    assert parse_duration("2s", "k") == 2.0
    assert parse_duration("1m", "k") == 60.0
    assert parse_duration(3, "k") == 3.0
    with pytest.raises(ConfigError, match="k: 'soon' is not a duration"):
        parse_duration("soon", "k")


def test_wait_max_defaults_to_four_times_min() -> None:
    assert Wait.parse("1s") == Wait(1.0, 4.0)
    assert Wait.parse("100ms:2s") == Wait(0.1, 2.0)
    with pytest.raises(ConfigError, match="below min"):
        Wait.parse("2s:1s")


def test_template_flag() -> None:
    spec = TemplateSpec.parse_flag("in.j2:/etc/haproxy/haproxy.cfg:systemctl reload haproxy")
    assert spec.source == Path("in.j2") and spec.destination == Path("/etc/haproxy/haproxy.cfg")
    assert spec.command == "systemctl reload haproxy" and spec.haproxy
    assert not TemplateSpec.parse_flag("a.j2:out.txt").haproxy
    with pytest.raises(ConfigError, match="expected SRC:DST"):
        TemplateSpec.parse_flag("only-source.j2")


def test_consul_addr() -> None:
    assert parse_consul_addr("127.0.0.1:8500") == ("127.0.0.1", 8500, "http")
    assert parse_consul_addr("https://consul.example:8501") == ("consul.example", 8501, "https")
    for bad in ("not an address", "localhost", "ftp://x:1", "host:port"):
        with pytest.raises(ConfigError, match="is not an address"):
            parse_consul_addr(bad)


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'consul_addr = "10.0.0.1:8500"\nlog_level = "warning"\nwait = "1s"\n'
        '[vars]\nhttp_port = "81"\nstats_port = "2000"\n'
        '[[template]]\nsource = "t.j2"\ndestination = "out/haproxy.cfg"\n'
    )
    env = {"CONSUL_HTTP_ADDR": "10.0.0.2:8500", "CONSUL_HTTP_TOKEN": "secret"}
    config = load(cfg, {"log_level": "debug", "vars": {"http_port": "82"}}, env)
    assert config.consul.addr == "10.0.0.2:8500"  # env beats file
    assert config.log_level == "DEBUG"  # flag beats file
    assert config.wait == Wait(1.0, 4.0)  # file beats default
    assert dict(config.vars) == {"http_port": "82", "stats_port": "2000"}
    assert config.templates[0].source == tmp_path / "t.j2"  # relative to the config file
    assert config.consul.token == "secret"
    assert "secret" not in repr(config)


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('consul_adr = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'consul_adr'; did you mean 'consul_addr'"):
        load(cfg, {}, {})


def test_malformed_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("consul_addr = \n")
    with pytest.raises(ConfigError, match=r"is not valid TOML.*line 1"):
        load(cfg, {}, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml", {}, {})


def test_token_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    assert load(None, {"token_file": str(tmp_path / "tok")}, {}).consul.token == "from-file"
    with pytest.raises(ConfigError, match="token_file"):
        load(None, {"token_file": str(tmp_path / "none")}, {})


def test_unknown_key_in_a_template_table_names_the_file_the_table_and_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[template]]\nsource = "a.j2"\ndestination = "a.cfg"\n\n[[template]]\nsource = "b.j2"\n'
                    'destination = "b.cfg"\ncomand = "true"\n')  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load(path, {}, environ={})
    assert str(err.value) == f"{path}: [[template]] #2 (source b.j2): unknown key 'comand'; did you mean 'command'?"


def test_check_takes_a_source_alone() -> None:
    spec = TemplateSpec.parse_flag("templates/haproxy.cfg.j2", destination_optional=True)
    assert spec.source == Path("templates/haproxy.cfg.j2") and spec.destination == Path("templates/haproxy.cfg")
    with pytest.raises(ConfigError, match="expected SRC:DST"):
        TemplateSpec.parse_flag("templates/haproxy.cfg.j2")


def test_connection_budget_and_once_timeout_keys(tmp_path: Path) -> None:
    config = load(None, {"max_connections": "32", "once_timeout": "5s", "reconcile_interval": "1m"}, environ={})
    assert (config.consul.max_connections, config.once_timeout, config.reconcile_interval) == (32, 5.0, 60.0)
    with pytest.raises(ConfigError, match="max_connections: 3 is too few"):
        load(None, {"max_connections": "3"}, environ={})


def test_block_wait_key() -> None:
    """0 leaves the wait to the protocol (60 s over HTTP/1.1, 10 min over HTTP/2); a wait of its own
    from 1 s to 24 h (Consul's servers cut it to their max_query_time)."""
    assert load(None, {}, environ={}).block_wait == 0.0
    assert load(None, {"block_wait": "1h"}, environ={}).block_wait == 3600.0
    assert load(None, {"block_wait": "0"}, environ={}).block_wait == 0.0
    for bad in ("500ms", "25h"):
        with pytest.raises(ConfigError, match=f"block_wait: '{bad}' is outside 1s-24h; write e.g. 10m or 1h"):
            load(None, {"block_wait": bad}, environ={})
    with pytest.raises(ConfigError, match="block_wait: 'soon' is not a duration"):
        load(None, {"block_wait": "soon"}, environ={})


def test_answer_size_limit_key(tmp_path: Path) -> None:
    assert load(None, {}, environ={}).consul.max_answer_bytes == 64 * 1024 * 1024 == ConsulSettings.max_answer_bytes
    assert load(None, {"max_answer_bytes": "128MiB"}, environ={}).consul.max_answer_bytes == 128 * 1024 * 1024
    env = {"CONSUL_RENDERER_MAX_ANSWER_BYTES": "2097152"}
    assert load(None, {}, environ=env).consul.max_answer_bytes == 2 * 1024 * 1024
    (tmp_path / "c.toml").write_text("max_answer_bytes = 4096\n")
    assert load(tmp_path / "c.toml", {}, environ={}).consul.max_answer_bytes == 4096
    with pytest.raises(ConfigError, match="max_answer_bytes: 'lots' is not a size; write a number of bytes or e"):
        load(None, {"max_answer_bytes": "lots"}, environ={})
    with pytest.raises(ConfigError, match="max_answer_bytes: 10 bytes is too small"):
        load(None, {"max_answer_bytes": "10"}, environ={})


def test_a_token_given_as_a_flag_is_warned_about_once_and_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    with caplog.at_level(logging.WARNING, logger="renderer.config"):
        assert load(None, {}, environ={"CONSUL_HTTP_TOKEN": "from-env"}).consul.token == "from-env"
        assert load(None, {"token_file": str(tmp_path / "tok")}, environ={}).consul.token == "from-file"
        env_file = {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "tok")}
        assert load(None, {}, environ=env_file).consul.token == "from-file"
        assert caplog.records == []
        assert load(None, {"token": "from-flag"}, environ={}).consul.token == "from-flag"
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "--token" in message and "`ps`" in message
    assert "CONSUL_HTTP_TOKEN_FILE" in message and "token_file" in message and "CONSUL_HTTP_TOKEN" in message
    assert "from-flag" not in caplog.text


def test_address_policy_keys_from_file_env_and_flags(tmp_path: Path) -> None:
    """Local addresses and host names are refused unless allowed: the file, the environment
    (CONSUL_RENDERER_ALLOW_*) and flags each can allow them; a non-boolean names the key."""
    default = load(None, {}, environ={})
    assert (default.allow_local_addresses, default.allow_host_names) == (False, False)
    (tmp_path / "c.toml").write_text("allow_local_addresses = true\nallow_host_names = true\n")
    from_file = load(tmp_path / "c.toml", {}, environ={})
    assert (from_file.allow_local_addresses, from_file.allow_host_names) == (True, True)
    env = {"CONSUL_RENDERER_ALLOW_LOCAL_ADDRESSES": "true", "CONSUL_RENDERER_ALLOW_HOST_NAMES": "1"}
    from_env = load(None, {}, environ=env)
    assert (from_env.allow_local_addresses, from_env.allow_host_names) == (True, True)
    flags = load(tmp_path / "c.toml", {"allow_local_addresses": "false"}, environ=env)
    assert (flags.allow_local_addresses, flags.allow_host_names) == (False, True)
    with pytest.raises(ConfigError, match="allow_host_names: 'maybe' is not a boolean; write true or false"):
        load(None, {"allow_host_names": "maybe"}, environ={})


def test_tcp_ports_read_ranges_and_ports_from_file_env_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('tcp_ports = "5432, 6379, 10000-20000"\n')
    assert load(cfg, {}, {}).tcp_ports == ((5432, 5432), (6379, 6379), (10000, 20000))
    assert load(None, {}, {"CONSUL_RENDERER_TCP_PORTS": "1-65535"}).tcp_ports == ((1, 65535),)
    assert load(None, {"tcp_ports": ""}, {}).tcp_ports == ()  # no TCP listener from meta at all
    assert load(None, {}, {}).tcp_ports == ((1024, 65535),)  # by default no privileged port
    for bad in ("80-", "0-10", "2000-1000", "70000", "ssh"):
        with pytest.raises(ConfigError, match="tcp_ports"):
            load(None, {"tcp_ports": bad}, {})


def test_bad_bytes_and_bad_addresses_are_clear_errors_not_tracebacks(tmp_path: Path) -> None:
    """A review's findings: each of these ended in a traceback (ValueError, UnicodeDecodeError), and
    a template's `haproxy = "false"` meant true."""
    for addr in ("http://[::1", "[fe80::1%eth0"):
        with pytest.raises(ConfigError, match="consul_addr"):
            load(None, {"consul_addr": addr}, {})
    latin = tmp_path / "c.toml"
    latin.write_bytes(b'log_level = "info" # caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(latin, {}, {})
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfesecret")
    with pytest.raises(ConfigError, match="token_file") as err:
        load(None, {"token_file": str(token)}, {})
    assert "secret" not in str(err.value)
    spec = tmp_path / "t.toml"
    spec.write_text(
        f'[[template]]\nsource = "{tmp_path}/a.j2"\ndestination = "{tmp_path}/haproxy.cfg"\nhaproxy = "false"\n'
    )
    assert load(spec, {}, {}).templates[0].haproxy is False


def test_certs_max_bounds_the_certificates_served_and_must_be_a_positive_count() -> None:
    assert load(None, {}, environ={}).certs_max == 1000
    assert load(None, {"certs_max": "20000"}, environ={}).certs_max == 20000
    assert load(None, {}, environ={"CONSUL_RENDERER_CERTS_MAX": "50"}).certs_max == 50
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="certs_max"):
            load(None, {"certs_max": bad}, environ={})
