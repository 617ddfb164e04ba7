"""The `consul-renderer` command line: `run` and `check` (and the commands other modules add).

Flags default to None so that only the flags a user gives override the file and the environment;
`config.load` is the one place where the layers meet. Errors end as one line on stderr with the
exit code of their class (see renderer.errors).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from renderer import __version__
from renderer.config import KEYS, Config, TemplateSpec, load
from renderer.errors import ConfigError, RendererError, TemplateError
from renderer.logs import redact, setup_logging
from renderer.render.template import check_template

log = logging.getLogger("renderer")


def _var(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--var {text!r}: expected KEY=VALUE, e.g. --var http_port=8080")
    return key, value


TEMPLATE_HELP = (
    "SRC:DST[:COMMAND], repeatable: render SRC to DST, then run COMMAND instead of the HAProxy reload; "
    "e.g. templates/haproxy.cfg.j2:/etc/haproxy/haproxy.cfg"
)


def _add_check_flags(parser: argparse.ArgumentParser) -> None:
    """`check` reads config and templates and writes nothing: only the flags that matter to it."""
    flag = parser.add_argument
    flag("--config", type=Path, help="TOML file; its [[template]] tables and [vars] are checked too")
    flag(
        "--template",
        action="append",
        metavar="SRC[:DST[:COMMAND]]",
        help="repeatable; DST may be left out, check writes nothing; e.g. --template templates/haproxy.cfg.j2",
    )
    flag("--var", action="append", metavar="KEY=VALUE", help="template variable; repeatable")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The run flags: --config, --template and --var, then one flag per key of config.KEYS."""
    flag = parser.add_argument
    flag("--config", type=Path, help="TOML file; every flag has a key of the same name (dashes → underscores)")
    flag("--template", action="append", metavar="SRC:DST[:COMMAND]", help=TEMPLATE_HELP)
    flag("--var", action="append", metavar="KEY=VALUE", help="template variable; repeatable")
    for key in KEYS:
        if key.flag == "switch":
            flag(key.option, action="store_const", const=True, default=None, help=key.full_help)
        elif key.flag == "value":
            flag(key.option, metavar=key.metavar, choices=key.choices or None, help=key.full_help)


_FLAG_KEYS = tuple(key.name for key in KEYS if key.flag != "none")


def flags_layer(args: argparse.Namespace, destination_optional: bool = False) -> dict[str, Any]:
    layer = {key: getattr(args, key) for key in _FLAG_KEYS if getattr(args, key, None) is not None}
    layer["template"] = tuple(TemplateSpec.parse_flag(spec, destination_optional) for spec in args.template or ())
    layer["vars"] = dict(_var(item) for item in args.var or ())
    return layer


def config_from_args(args: argparse.Namespace) -> Config:
    return load(args.config, flags_layer(args))


def cmd_run(args: argparse.Namespace) -> int:
    from renderer.runner import Runner

    config = config_from_args(args)
    setup_logging(config.log_level, config.log_format)
    runner = Runner(config, reload_config=lambda: config_from_args(args))
    return asyncio.run(runner.run())


def default_template() -> Path | None:
    """The default HAProxy template: ./templates/, else the checkout this package runs from."""
    import renderer

    for base in (Path.cwd(), Path(renderer.__file__).resolve().parents[1]):
        candidate = base / "templates" / "haproxy.cfg.j2"
        if candidate.is_file():
            return candidate
    return None


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args.config, flags_layer(args, destination_optional=True))
    if not config.templates:
        default = default_template()
        if default is None:
            raise ConfigError("no template: pass --template SRC[:DST] or add a [[template]] table to the config file")
        print(f"no template given: checking the default template {default}")
        config = replace(config, templates=(TemplateSpec.parse_flag(str(default), destination_optional=True),))
        args.template = [str(default)]
    given = {str(spec).split(":", 2)[0] for spec in args.template or () if ":" not in str(spec)}
    errors = []
    for spec in config.templates:
        errors += check_template(spec, config.vars)
        if str(spec.source) not in given and not spec.destination.parent.is_dir():
            errors.append(f"{spec.destination}: directory {spec.destination.parent} does not exist")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        return TemplateError.exit_code
    print(f"ok: {len(config.templates)} template(s) parse; configuration valid")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running renderer's state at a glance (from its status server), and with
    `--changes` its last changes; every figure is the status server's, none is computed here."""
    state = _fetch_status(args.status_addr, args.status_auth or os.environ.get("CONSUL_RENDERER_STATUS_AUTH"))
    if state is None:
        return 3
    _print_state(state)
    if args.changes:
        _print_changes(state)
    return 0 if state["check"] == "passing" else 1


def _fetch_status(addr: str, login: str | None) -> dict[str, Any] | None:
    import base64
    import json
    import urllib.error
    import urllib.request

    url = f"http://{addr}/status"
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            state: dict[str, Any] = json.loads(resp.read())
            return state
    except urllib.error.HTTPError as err:
        hints = {
            401: "pass --status-auth USER:PASSWORD (or CONSUL_RENDERER_STATUS_AUTH)",
            421: "without status_auth the status server answers only by an IP address or localhost: give "
            "--status-addr as IP:PORT, or set status_auth on the renderer and pass --status-auth",
        }
        hint = hints.get(err.code, "")
        print(f"consul-renderer: {url} answered {err.code} {err.reason}; {hint}".rstrip("; "), file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(
            f"consul-renderer: no status at {url} ({err}); is the renderer running with --status-addr?", file=sys.stderr
        )
    return None


def _print_state(state: dict[str, Any]) -> None:
    print(f"{state['check']:<8} {state['output']}")
    print(f"ready    {state['ready']}")
    print(f"renders  {state['renders']}   applies {state['applies']}   failures {state['failures']}")
    print(f"watch errors {state['watch_errors']}   last success {_ago(state['last_success'])}")
    consul = state.get("consul")
    if consul:
        failing = f"{consul['failing']} of {consul['watched']} keys get no answer"
        answering = failing if consul["failing"] else "answering"
        print(
            f"consul   {consul['address']} {answering}; data age {consul['data_age_s']:.0f}s "
            f"(max_data_age {consul['max_data_age_s']:.0f}s, {consul['freshness']}); {consul['budget']}; "
            f"index {consul['index']}"
        )
        if consul["stale"]:
            print(f"stale    {consul['stale']}")
    for template, served in state.get("served", {}).items():
        lag = served["after_change_ms"]
        print(
            f"serving  {template}: {served['backends']} backend(s), {served['servers']} server(s); last applied by "
            f"{served['kind']}"
            + (f" {lag:.0f} ms after the Consul change" if lag is not None else "")
            + f", {_ago(served['at'])}"
        )
        for left_out in served["left_out"]:
            print(f"left out {left_out}")
    for template, items in state.get("left_out", {}).items():
        for item in items:
            print(f"unsafe   {template}: left out {item}")
    for template, problem in state["problems"].items():
        print(f"problem  {template}: {problem['reason']}: {problem['message'].splitlines()[0]}")


def _print_changes(state: dict[str, Any]) -> None:
    """The timeline, newest first: when, which file, how, how long after the Consul change, what, why."""
    import time

    latency = state.get("latency") or {}
    if latency.get("count"):
        print(
            f"last hour {latency['count']} change(s): median {latency['median_ms']:.0f} ms, "
            f"slowest {latency['max_ms']:.0f} ms from the Consul change to applied"
        )
    changes = state.get("changes", [])
    if not changes:
        print("changes  none applied since the renderer started")
    for change in changes:
        when = time.strftime("%H:%M:%S", time.localtime(change["at"]))
        lag = f"{change['after_change_ms']:.0f} ms" if change["after_change_ms"] is not None else "-"
        keys = ", ".join(f"{k['key']}@{k['index']}" for k in change["keys"])
        unnamed = change["keys_total"] - len(change["keys"])
        more = f" (+{unnamed} more)" if unnamed > 0 else ""
        print(f"change   {when} {Path(change['template']).name} {change['kind']} {lag}: {change['summary']}")
        if keys:
            print(f"           keys {keys}{more}")


def _ago(timestamp: float | None) -> str:
    import time

    return "never" if timestamp is None else f"{time.time() - timestamp:.0f}s ago"


def cmd_register(args: argparse.Namespace) -> int:
    from renderer.config import parse_duration
    from renderer.registration.register import Registration, Supervision, child_exit_status, parse_meta, run_registered

    config = load(args.config, flags_layer(args))
    setup_logging(config.log_level, config.log_format)
    command = list(args.command_line or [])
    if command and command[0] == "--":
        command = command[1:]
    registration = Registration(
        name=args.name,
        port=args.port,
        address=args.address,
        service_id=args.id,
        tags=tuple(args.tag or ()),
        meta=parse_meta(args.meta or []),
        check_http=args.check_http,
        check_interval=args.check_interval,
        check_timeout=args.check_timeout,
        deregister_critical_after=args.deregister_critical_after,
    )
    supervision = Supervision(
        parse_duration(args.drain_delay, "--drain-delay"), parse_duration(args.kill_after, "--kill-after")
    )
    return child_exit_status(run_registered(registration, config.consul, command, supervision))


def cmd_docker_registrator(args: argparse.Namespace) -> int:
    try:
        import docker
    except ModuleNotFoundError as err:
        raise ConfigError(
            "docker-registrator needs the Docker SDK, an extra: pip install 'consul-renderer[docker]'"
        ) from err
    from renderer.registration.register import Registrar
    from renderer.registration.registrator import (
        REGISTRATION_FAILING_FOR_S,
        DockerRegistrator,
        LabelPolicy,
        host_marks,
        serve,
    )

    config = load(args.config, flags_layer(args))
    setup_logging(config.log_level, config.log_format)
    patterns = args.allow_service or os.environ.get("CONSUL_RENDERER_ALLOW_SERVICES", "").split(",")
    policy = LabelPolicy.parse(
        patterns, address_label=args.allow_address_label, listener_label=args.allow_listener_label
    )
    try:
        client = docker.DockerClient(base_url=args.docker_host) if args.docker_host else docker.from_env()
    except docker.errors.DockerException as err:
        where = f"--docker-host {args.docker_host}" if args.docker_host else "DOCKER_HOST or the local socket"
        raise ConfigError(f"cannot reach Docker ({where}): {err}") from err
    host, adopt = host_marks(client, args.host_id, tuple(args.adopt or ()))
    registrar = Registrar(config.consul, failing_for=REGISTRATION_FAILING_FOR_S)
    registrator = DockerRegistrator(client, registrar, host=host, policy=policy, adopt=adopt)
    if args.sync_once:
        registrator.sync()
        return 0
    serve(registrator)  # until SIGTERM or SIGINT
    return 0


def _add_register_flags(parser: argparse.ArgumentParser) -> None:
    flag = parser.add_argument
    flag("--name", required=True, help="service name")
    flag("--port", type=int, required=True, help="port the instance serves on")
    flag("--address", help="address to register (default: this host's address towards the agent)")
    flag("--id", help="service id (default NAME-HOSTNAME-PORT)")
    flag("--tag", action="append", help="repeatable, e.g. --tag lb")
    flag("--meta", action="append", metavar="KEY=VALUE", help="repeatable, e.g. --meta weight=5")
    flag("--check-http", metavar="PATH|URL", help="HTTP health check, e.g. /health")
    flag("--check-interval", default="2s")
    flag("--check-timeout", default="1s")
    flag("--deregister-critical-after", metavar="DURATION", help="Consul reaps the instance after this long critical")
    flag("--drain-delay", default="2s", help="after deregistering, wait this long before stopping COMMAND")
    flag("--kill-after", default="10s", help="SIGKILL COMMAND if it has not stopped this long after the signal")
    flag("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="run and supervise this")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consul-renderer", description="Keep HAProxy's configuration in step with a Consul catalog."
    )
    parser.add_argument("--version", action="version", version=f"consul-renderer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="watch Consul, render, validate, swap, apply")
    _add_config_flags(run)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser(
        "check",
        help="check config and templates without contacting Consul",
        description="Check the configuration and every template (syntax with file:line, undefined names, "
        "destination directories) without contacting Consul and without writing anything.",
    )
    _add_check_flags(check)
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="print a running renderer's state at a glance")
    status.add_argument("--status-addr", default="127.0.0.1:9464", help="its status server (default 127.0.0.1:9464)")
    status.add_argument(
        "--status-auth", metavar="USER:PASSWORD", help="the status server's login, if it asks for one "
        "(env CONSUL_RENDERER_STATUS_AUTH)",
    )  # fmt: skip
    status.add_argument("--changes", action="store_true", help="also print the last changes, newest first")
    status.set_defaults(func=cmd_status)
    register = sub.add_parser("register", help="register an instance for as long as it (or COMMAND) runs")
    _add_config_flags(register)
    _add_register_flags(register)
    register.set_defaults(func=cmd_register)
    reg = sub.add_parser("docker-registrator", help="register labelled Docker containers while they run")
    _add_config_flags(reg)
    reg.add_argument("--docker-host", help="Docker API address (default: DOCKER_HOST or the local socket)")
    reg.add_argument(
        "--host-id", help="name this registrator marks its registrations with (default: the Docker engine's ID)"
    )
    reg.add_argument(
        "--adopt",
        action="append",
        metavar="MARK",
        help="repeatable: registrations marked with this host mark are this registrator's too (removed when "
        "their container is gone), e.g. the old registrator container's hostname after a compose upgrade",
    )
    reg.add_argument("--sync-once", action="store_true", help="sync once and exit")
    reg.add_argument(
        "--allow-service",
        action="append",
        metavar="PATTERN",
        help="repeatable: containers may only claim service names matching one of these globs, e.g. web-*; "
        "env CONSUL_RENDERER_ALLOW_SERVICES (comma-separated); default: any name (with a warning)",
    )
    reg.add_argument(
        "--allow-address-label",
        action="store_true",
        help="honour the consul.address label (default: ignore it and register the container's own address)",
    )
    reg.add_argument(
        "--allow-listener-label",
        action="store_true",
        help="honour consul.meta.haproxy_mode and consul.meta.haproxy_port, which give the service a TCP "
        "listener of its own on every load balancer (default: ignore them, with a warning)",
    )
    reg.set_defaults(func=cmd_docker_registrator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except RendererError as err:
        secrets = (getattr(args, "token", None), os.environ.get("CONSUL_HTTP_TOKEN"))
        print(redact(f"consul-renderer: {type(err).__name__}: {err}", *secrets), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return code
