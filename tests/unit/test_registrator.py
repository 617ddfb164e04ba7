"""The Docker registrator's decisions, with our own seams faked (the Docker SDK client and the
Registrar); the Registrar's retries against a stub agent are in test_registration_consul.py, the
live engine in tests/integration/test_registrator.py."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import docker.errors
import pytest
import requests.exceptions

from lab.processes import wait_until
from renderer.errors import ConfigError, ConsulError
from renderer.registration.register import Registration
from renderer.registration.registrator import (
    HOST_KEY,
    OWNER,
    OWNER_KEY,
    DockerRegistrator,
    LabelPolicy,
    LabelRefused,
    _address,
    _checked_service,
    service_from_container,
)
from renderer.source.client import ConsulRequestError
from tests.helpers import Pace

LOGGER = "renderer.registration.registrator"


def container(cid: str, **labels: str) -> dict[str, Any]:
    networks = {"bridge": {"IPAddress": "172.17.0.5"}}
    return {"Id": cid, "Config": {"Labels": labels}, "NetworkSettings": {"Networks": networks}}


def web(cid: str, **labels: str) -> dict[str, Any]:
    return container(cid, **{"consul.service": "web", "consul.port": "8080", **labels})


@dataclass
class Listed:
    attrs: dict[str, Any]

    @property
    def id(self) -> str | None:
        return self.attrs.get("Id")


class FakeDocker:
    """A `DockerEngine` (and its `Containers`) holding `containers`; no events."""

    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self._listed = [Listed(c) for c in containers]

    @property
    def containers(self) -> FakeDocker:
        return self

    def events(self, decode: bool, filters: dict[str, str], since: int, until: int) -> list[dict[str, Any]]:
        return []

    def list(self, filters: dict[str, str], sparse: bool = False) -> list[Listed]:
        return self._listed

    def get(self, container_id: str) -> Listed:
        return next(c for c in self._listed if c.attrs["Id"] == container_id)


class FakeRegistrar:
    """Refuses (400) the services named in `refuse`, as Consul refuses a registration it cannot take."""

    def __init__(self, services: dict[str, Any], refuse: tuple[str, ...] = ()) -> None:
        self._services = services
        self._refuse = refuse
        self.registered: list[Registration] = []
        self.deregistered: list[str] = []

    def services(self) -> dict[str, Any]:
        return self._services

    def register(self, registration: Registration) -> str:
        if registration.name in self._refuse:
            raise ConsulRequestError("Consul answered 400 for /v1/agent/service/register: Invalid service", 400)
        self.registered.append(registration)
        return registration.id

    def deregister(self, service_id: str) -> bool:
        self.deregistered.append(service_id)
        return True

    def interrupt(self) -> None:
        pass


def test_labels_describe_the_service_and_bad_ones_skip_the_container() -> None:
    svc = service_from_container(container("a" * 64, **{"consul.service": "web", "consul.port": "8080",
                                                       "consul.tags": "lb, x", "consul.meta.weight": "5"}))  # fmt: skip
    assert svc is not None
    assert (svc.name, svc.port, svc.address, svc.tags, dict(svc.meta)) == ("web", 8080, "172.17.0.5", ("lb", "x"),
                                                                          {"weight": "5"})  # fmt: skip
    assert service_from_container(container("b" * 64, **{"consul.service": "web", "consul.port": "http"})) is None
    assert service_from_container(container("c" * 64)) is None


HOSTILE = [
    ("quote in the name", {"consul.service": 'web"'}, "consul.service"),
    ("semicolon in the name", {"consul.service": "web;reload"}, "consul.service"),
    ("newline in the name", {"consul.service": "web\nbackend evil"}, "consul.service"),
    ("name too long", {"consul.service": "w" * 65}, "consul.service"),
    ("newline in a tag", {"consul.tags": "lb,x\ny"}, "consul.tags"),
    ("64 KB tag", {"consul.tags": "t" * 65536}, "consul.tags"),
    ("bidi override in a tag", {"consul.tags": "lb\u202e"}, "consul.tags"),
    ("huge port", {"consul.port": "99999"}, "consul.port"),
    ("port 0", {"consul.port": "0"}, "consul.port"),
    ("unicode digits", {"consul.port": "８０"}, "consul.port"),
    ("signed port", {"consul.port": "+80"}, "consul.port"),
    ("URL check", {"consul.check.http": "http://169.254.169.254/latest/meta-data"}, "consul.check.http"),
    ("quote in the check", {"consul.check.http": "/health'"}, "consul.check.http"),
    ("space in the check", {"consul.check.http": "/health x"}, "consul.check.http"),
    ("fragment in the check", {"consul.check.http": "/health#x"}, "consul.check.http"),
    ("interval in hours", {"consul.check.interval": "1h"}, "consul.check.interval"),
    ("interval with a space", {"consul.check.interval": "2 s"}, "consul.check.interval"),
    ("meta key with a dot", {"consul.meta.a.b": "1"}, "consul.meta.a.b"),
    ("our own meta key", {"consul.meta.registered-by": "x"}, "consul.meta.registered-by"),
    ("control character in meta", {"consul.meta.zone": "a\x1b[2J"}, "consul.meta.zone"),
    ("blank meta value", {"consul.meta.zone": "   "}, "consul.meta.zone"),
    ("512 characters but 1,024 bytes in a meta value", {"consul.meta.zone": "é" * 512}, "consul.meta.zone"),
    # The key is the container's too (the Docker API checks none): it is quoted, never a new log line.
    ("a log line in a meta key", {"consul.meta.\n2025-01-01 INFO deregistered db": "1"}, "'consul.meta.\\n2025"),
    ("a 1 MB meta key", {"consul.meta." + "K" * 1_000_000: "1"}, "'consul.meta.KKK"),
]


@pytest.mark.parametrize(("labels", "label"), [(labels, label) for _, labels, label in HOSTILE],
                         ids=[case for case, _, _ in HOSTILE])  # fmt: skip
def test_a_hostile_label_skips_the_container_with_one_warning_naming_it(
    labels: dict[str, str], label: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert service_from_container(web("d" * 64, **labels)) is None
    [record] = caplog.records
    message = record.getMessage()
    named = f"label {label}" if label.startswith("'") else f"label {label}="  # a quoted key: its start
    assert message.startswith(f"container {'d' * 12}: {named}") and "skipped" in message
    assert "\n" not in message and len(message) < 400  # a 64 KB label is not copied into the log


def test_a_service_name_outside_the_allow_list_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    policy = LabelPolicy.parse(["web", "api-*"])
    assert service_from_container(web("a" * 64), policy) is not None
    assert service_from_container(web("b" * 64, **{"consul.service": "api-v2"}), policy) is not None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert service_from_container(web("c" * 64, **{"consul.service": "payments"}), policy) is None
    assert "label consul.service='payments' is not an allowed name (--allow-service web,api-*)" in caplog.text


def test_an_allow_list_reads_its_patterns_as_serve_services_does() -> None:
    """An attacker's review: fnmatch's `*` matched a dot, so `shop-*` let a container register
    `shop-eu.example`, which takes Host shop-eu.example.* from `shop-eu` in the default template
    (the renderer's serve_services would have refused it, but defaults to `*`). And case counts."""
    policy = LabelPolicy.parse(["shop-*", "web"])
    assert policy.allows("shop-eu") and policy.allows("web")
    assert not policy.allows("shop-eu.example") and not policy.allows("WEB") and not policy.allows("Shop-eu")
    assert LabelPolicy.parse(["shop-*.example"]).allows("shop-eu.example")
    assert LabelPolicy().allows("anything.at.all")


def test_an_allow_list_pattern_must_look_like_a_service_name() -> None:
    assert LabelPolicy.parse([" web ", "", "api-*"]).allowed_services == ("web", "api-*")
    with pytest.raises(ConfigError, match="--allow-service 'web;x'"):
        LabelPolicy.parse(["web;x"])


def test_an_address_label_is_ignored_without_the_flag_and_checked_with_it(caplog: pytest.LogCaptureFixture) -> None:
    labelled = web("a" * 64, **{"consul.address": "10.0.0.9"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ignored = service_from_container(labelled)
    assert ignored is not None and ignored.address == "172.17.0.5"  # the container's own address
    assert "label consul.address='10.0.0.9' ignored" in caplog.text and "--allow-address-label" in caplog.text
    honoured = service_from_container(labelled, LabelPolicy(address_label=True))
    assert honoured is not None and honoured.address == "10.0.0.9"
    bad = web("b" * 64, **{"consul.address": "10.0.0.9; rm"})
    assert service_from_container(bad, LabelPolicy(address_label=True)) is None


def test_a_check_path_and_interval_are_carried_on() -> None:
    svc = service_from_container(
        web("a" * 64, **{"consul.check.http": "/health?full=1", "consul.check.interval": "500ms"})
    )
    assert svc is not None and (svc.check_http, svc.check_interval) == ("/health?full=1", "500ms")


def test_a_container_id_docker_would_never_give_is_skipped() -> None:
    assert service_from_container(web("../../v1/acl")) is None


def test_without_an_allow_list_the_registrator_warns_once_that_any_name_can_be_claimed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), FakeRegistrar({}), host="h1")
        registrator.sync()
        registrator.sync()
    assert len([r for r in caplog.records if "can register any service name" in r.getMessage()]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DockerRegistrator(FakeDocker([]), FakeRegistrar({}), policy=LabelPolicy(("web",)))
    assert caplog.records == []


def test_sync_registers_what_runs_and_removes_only_its_own_ghosts() -> None:
    running = container("a" * 64, **{"consul.service": "web", "consul.port": "8080"})
    ours = {OWNER_KEY: OWNER, HOST_KEY: "h1"}
    agent = {
        "web-" + "d" * 12: {"Meta": ours},  # ours, its container is gone: a ghost
        "web-" + "e" * 12: {"Meta": {OWNER_KEY: OWNER, HOST_KEY: "h2"}},  # another host's
        "api-1": {"Meta": {}},  # registered by someone else
        "../acl/x": {"Meta": ours},  # our marks, but not an id we make: never touched
        "junk": "not a service",  # a hostile answer
    }
    registrar = FakeRegistrar(agent)
    added, removed = DockerRegistrator(FakeDocker([running]), registrar, host="h1").sync()
    assert added == ["web-" + "a" * 12] and removed == ["web-" + "d" * 12]
    assert registrar.registered[0].meta[HOST_KEY] == "h1"


def test_one_container_with_bad_labels_does_not_stop_the_sync_of_the_others() -> None:
    containers = [
        web("a" * 64, **{"consul.port": "８０"}),
        web("b" * 64),
        web("c" * 64, **{"consul.tags": "x" * 65536}),
    ]
    registrar = FakeRegistrar({})
    added, _ = DockerRegistrator(FakeDocker(containers), registrar, host="h1").sync()
    assert added == ["web-" + "b" * 12]


def test_a_registration_consul_refuses_is_logged_and_the_next_container_still_registers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    containers = [web("a" * 64, **{"consul.service": "api"}), web("b" * 64)]
    registrar = FakeRegistrar({}, refuse=("api",))
    registrator = DockerRegistrator(FakeDocker(containers), registrar, host="h1")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        added, _ = registrator.sync()
        for cid in ("a" * 64, "b" * 64):  # the same through events
            registrator.handle({"Action": "start", "Actor": {"ID": cid}})
    assert added == ["web-" + "b" * 12]
    assert [r.id for r in registrar.registered] == ["web-" + "b" * 12] * 2
    refusals = [r.getMessage() for r in caplog.records if "not registered" in r.getMessage()]
    assert refusals == [f"container {'a' * 12}: service api not registered: Consul answered 400 for "
                        "/v1/agent/service/register: Invalid service"] * 2  # fmt: skip


def test_events_with_an_id_docker_would_never_send_are_ignored() -> None:
    registrar = FakeRegistrar({})
    registrator = DockerRegistrator(FakeDocker([]), registrar, host="h1")
    registrator.handle({"Action": "start", "Actor": {"ID": "../../containers/x"}})
    registrator.handle({"Action": "start", "Actor": "not a mapping"})
    assert registrar.registered == []


def test_listener_meta_is_ignored_without_the_flag_and_kept_with_it(caplog: pytest.LogCaptureFixture) -> None:
    """haproxy_mode=tcp + haproxy_port give a service a TCP listener of its own on every load
    balancer: a container allowed to claim `web-*` could open a port there. Without
    --allow-listener-label the two meta keys are dropped (the rest of the meta kept, the container
    registered as an HTTP service), with a warning that names the flag."""
    labelled = web("d" * 64, **{"consul.meta.haproxy_mode": "tcp", "consul.meta.haproxy_port": "2222",
                                "consul.meta.weight": "5"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plain = service_from_container(labelled, LabelPolicy(allowed_services=("web",)))
    assert plain is not None and dict(plain.meta) == {"weight": "5"}
    assert "meta haproxy_mode, haproxy_port ignored" in caplog.text and "--allow-listener-label" in caplog.text
    allowed = service_from_container(labelled, LabelPolicy.parse(["web"], listener_label=True))
    assert allowed is not None and allowed.meta["haproxy_port"] == "2222" and allowed.meta["haproxy_mode"] == "tcp"


@pytest.mark.parametrize("mode", ["none", "container:" + "f" * 64, None])
def test_a_container_with_no_address_of_its_own_is_not_registered_at_the_hosts(
    mode: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """`--network none` or `container:X`: no IP of its own, and the registrar would fill in this
    host's address: `consul.port=22` then put the host's sshd (or the agent's 8500) behind the load
    balancer (a review's reproduction). Skipped with a warning; host networking still registers
    at the host's address, as it runs there."""
    attrs = web("b" * 64, **{"consul.port": "22"})
    attrs["NetworkSettings"] = {"Networks": {} if mode != "none" else {"none": {"IPAddress": ""}}}
    if mode is not None:
        attrs["HostConfig"] = {"NetworkMode": mode}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert service_from_container(attrs) is None
    assert "no address of its own" in caplog.text
    attrs["HostConfig"] = {"NetworkMode": "host"}
    found = service_from_container(attrs)
    assert found is not None and found.address is None  # the registrar's: this host's address


def test_events_of_a_container_without_the_service_label_cost_consul_nothing() -> None:
    """Every stop-type event of any container read the agent's services (a review's finding: a
    busy host's unrelated containers each cost Consul a request). Docker's events carry the
    container's labels: one without `consul.service` was never registered."""

    class CountingRegistrar(FakeRegistrar):
        reads = 0

        def services(self) -> dict[str, Any]:
            CountingRegistrar.reads += 1
            return super().services()

    registrar = CountingRegistrar({})
    registrator = DockerRegistrator(FakeDocker([]), registrar, host="h1")
    unrelated = {"ID": "f" * 64, "Attributes": {"name": "batch-job", "image": "busybox"}}
    for action in ("die", "stop", "kill", "destroy", "health_status: unhealthy"):
        registrator.handle({"Action": action, "Actor": unrelated})
    assert CountingRegistrar.reads == 0
    labelled = {"ID": "f" * 64, "Attributes": {"name": "web-1", "consul.service": "web"}}
    registrator.handle({"Action": "die", "Actor": labelled})
    assert CountingRegistrar.reads == 0 and registrar.deregistered == []  # labelled, but never registered


def test_a_stop_event_withdraws_what_we_registered_without_listing_the_agents_services() -> None:
    """Each stop-like event of a labelled container listed the agent's services (a stop sends die,
    stop and destroy; a flapping health check one a second). What we registered is known: the
    sync's listing and our own registrations since."""

    class CountingRegistrar(FakeRegistrar):
        reads = 0

        def services(self) -> dict[str, Any]:
            CountingRegistrar.reads += 1
            return super().services()

    before = "b" * 64  # registered by an earlier run of the registrator: the start's sync finds it
    earlier = {OWNER_KEY: OWNER, HOST_KEY: "h1", "container-id": before[:12]}
    registrar = CountingRegistrar({"web-" + before[:12]: {"Meta": earlier}})
    registrator = DockerRegistrator(FakeDocker([web("a" * 64), web(before)]), registrar, host="h1")
    registrator.sync()
    assert CountingRegistrar.reads == 1
    for cid in ("a" * 64, before):
        for action in ("die", "stop", "destroy"):
            registrator.handle({"Action": action, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}})
    assert CountingRegistrar.reads == 1
    assert registrar.deregistered == ["web-" + "a" * 12, "web-" + "b" * 12]  # each once


def test_a_withdrawal_consul_fails_is_tried_again_at_the_next_stop_event() -> None:
    class FailingOnce(FakeRegistrar):
        failed = False

        def deregister(self, service_id: str) -> bool:  # as Registrar's: a failure logged, said, not raised
            if not FailingOnce.failed:
                FailingOnce.failed = True
                return False
            return super().deregister(service_id)

    registrar = FailingOnce({})
    registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), registrar, host="h1")
    registrator.sync()
    stop = {"Action": "die", "Actor": {"ID": "a" * 64, "Attributes": {"consul.service": "web"}}}
    registrator.handle(stop)  # logged, not raised
    assert registrar.deregistered == []
    registrator.handle({**stop, "Action": "stop"})
    assert registrar.deregistered == ["web-" + "a" * 12]


def test_a_registration_whose_answer_was_lost_is_withdrawn_at_the_stop_event() -> None:
    """A review (/tmp/rev22): Consul took the registration but the answer was lost (a timeout, a
    5xx behind a proxy); the registrator did not count it as ours, so the container's stop withdrew
    nothing and its dead address was served until the periodic sync."""

    class LostAnswer(FakeRegistrar):
        def register(self, registration: Registration) -> str:
            super().register(registration)  # taken …
            raise ConsulRequestError("Consul answered 504 for /v1/agent/service/register: gateway timeout", 504)

    for registers in ("start", "sync"):  # the event's registration, and the periodic sync's
        registrar = LostAnswer({})
        registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), registrar, host="h1")
        if registers == "sync":
            registrator.sync()
        else:
            registrator.handle({"Action": "start", "Actor": {"ID": "a" * 64, "Attributes": {"consul.service": "web"}}})
        registrator.handle({"Action": "die", "Actor": {"ID": "a" * 64, "Attributes": {"consul.service": "web"}}})
        assert registrar.deregistered == ["web-" + "a" * 12], registers


def test_withdrawals_the_agent_fails_do_not_damp_the_container() -> None:
    """A review (/tmp/rev24): while the agent failed, each of a stop's die, stop and destroy events
    tried the withdrawal again and counted it, so one `docker stop` damped the container (its next
    start waited for the periodic sync). Only a withdrawal Consul took counts."""

    class Failing(FakeRegistrar):
        def deregister(self, service_id: str) -> bool:
            return False

    registrar = Failing({})
    registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), registrar, host="h1")
    registrator.sync()
    for action in ("die", "stop", "destroy", "start"):
        registrator.handle({"Action": action, "Actor": {"ID": "a" * 64, "Attributes": {"consul.service": "web"}}})
    assert len(registrar.registered) == 2  # the sync's, and the start's: not damped


def test_a_container_without_an_ip_of_its_own_registers_at_an_address_label_or_its_ipv6() -> None:
    """With --allow-address-label, `consul.address` is the operator's choice whatever the network
    mode; a container on an IPv6-only network has an address of its own (its GlobalIPv6Address)."""
    labelled = web("c" * 64, **{"consul.address": "10.0.0.9"})
    labelled["NetworkSettings"] = {"Networks": {}}
    labelled["HostConfig"] = {"NetworkMode": "none"}
    found = service_from_container(labelled, LabelPolicy(address_label=True))
    assert found is not None and found.address == "10.0.0.9"
    v6 = web("d" * 64)
    v6["NetworkSettings"] = {"Networks": {"v6net": {"IPAddress": "", "GlobalIPv6Address": "fd00::5"}}}
    found = service_from_container(v6)
    assert found is not None and found.address == "fd00::5"


def test_a_registration_whose_stop_event_was_missed_is_removed_by_the_periodic_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker's review: sync ran only at start and on reconnect, so a stop event Docker dropped
    (a slow reader) or a deregistration the agent refused in a blip left the registration for good
    (without a check label), at an address Docker may give to another container."""
    from renderer.registration import registrator as module

    monkeypatch.setattr(module, "RESYNC_S", 0.05)
    ours = {OWNER_KEY: OWNER, HOST_KEY: "h1"}
    registrar = FakeRegistrar({})

    class SlowEvents(FakeDocker):
        def events(self, decode: bool, filters: dict[str, str], since: int, until: int) -> list[dict[str, Any]]:
            time.sleep(0.01)
            return []

    registrator = DockerRegistrator(SlowEvents([]), registrar, host="h1")
    worker = threading.Thread(target=registrator.run)
    worker.start()
    try:
        time.sleep(0.1)
        registrar._services["web-" + "d" * 12] = {"Meta": ours}  # its container stopped; the event was missed
        deadline = time.monotonic() + 5
        while not registrar.deregistered and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        registrator.stop()
        worker.join(5)
    assert registrar.deregistered[:1] == ["web-" + "d" * 12] and not worker.is_alive()


def test_a_periodic_sync_consul_refuses_is_tried_again_not_the_end_of_the_registrator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refusing(FakeRegistrar):
        def services(self) -> dict[str, Any]:
            raise ConsulRequestError("Consul answered 500 for /v1/agent/services: rpc error", 500)

    registrator = DockerRegistrator(FakeDocker([]), Refusing({}), host="h1")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator._resync()
    assert "periodic sync failed (tried again in 60 s)" in caplog.text


@pytest.mark.parametrize(
    "state",
    [{"Paused": True}, {"Restarting": True}, {"Health": {"Status": "unhealthy"}}],
    ids=["paused", "restarting", "unhealthy"],
)
def test_a_sync_registers_no_container_an_event_deregistered(state: dict[str, Any]) -> None:
    """A review of the periodic sync: Docker lists paused, restarting and unhealthy containers, so
    the sync registered again within a minute what their events had deregistered."""
    registrar = FakeRegistrar({})
    serving, held = web("a" * 64), {**web("b" * 64), "State": {"Running": True, **state}}
    added, _ = DockerRegistrator(FakeDocker([serving, held]), registrar, host="h1").sync()
    assert added == ["web-" + "a" * 12]


def test_a_registration_consul_refuses_is_warned_of_once_not_at_every_periodic_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), FakeRegistrar({}, refuse=("web",)), host="h1")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator.sync()
        registrator.sync(quiet=True)  # the periodic one
    assert caplog.text.count("not registered") == 1


def test_a_new_reason_for_a_refusal_is_warned_of_again(caplog: pytest.LogCaptureFixture) -> None:
    """A review: "said once" was kept by service id, so a new reason (an outage, say) was DEBUG."""
    registrator = DockerRegistrator(FakeDocker([web("a" * 64)]), FakeRegistrar({}, refuse=("web",)), host="h1")
    registrator.sync()
    registrator._refused["web-" + "a" * 12] = "an older reason"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator.sync(quiet=True)
    assert "not registered" in caplog.text


def test_a_container_flapping_its_health_is_registered_again_by_the_sync_not_each_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attacker's container that flaps its health check every second moved the catalog twice a
    second (deregistered, registered again), and every load balancer's renderer read each move.
    Its withdrawals stay immediate; after FLAP_DROPS of them in FLAP_WINDOW_S its recoveries wait
    for the periodic sync."""
    from renderer.registration import registrator as module

    cid = "f" * 64
    ours = {OWNER_KEY: OWNER, HOST_KEY: "h1", "container-id": cid[:12]}

    class Keeping(FakeRegistrar):
        def register(self, registration: Registration) -> str:
            self._services[registration.id] = {"Meta": ours}
            return super().register(registration)

        def deregister(self, service_id: str) -> bool:
            self._services.pop(service_id, None)
            return super().deregister(service_id)

    def event(status: str) -> dict[str, Any]:
        return {"status": status, "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}}

    registrar = Keeping({})
    registrator = DockerRegistrator(FakeDocker([web(cid)]), registrar, host="h1")
    registrator.sync()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(10):
            registrator.handle(event("health_status: unhealthy"))
            registrator.handle(event("die"))  # a second stop-like event withdraws nothing more
            registrator.handle(event("health_status: healthy"))
    assert len(registrar.deregistered) == module.FLAP_DROPS  # every withdrawal while it was registered
    assert len(registrar.registered) == module.FLAP_DROPS  # the start's, then FLAP_DROPS - 1 recoveries
    assert caplog.text.count("withdrawn or refused 3 times") == 1
    added, _ = registrator.sync(quiet=True)  # the periodic sync: it serves now, so it is registered
    assert added == ["web-" + cid[:12]]


def test_a_container_consul_refuses_flapping_its_health_is_damped_like_one_withdrawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attacker's review (/tmp/rev17): a container whose labels pass our checks but which Consul
    refuses (a meta value of 512 characters and 1,024 bytes), its health flapping, cost a
    registration request and a warning at every healthy event (150 of each in 300 events): only
    withdrawals were counted. A refusal counts too, so after FLAP_DROPS its recoveries wait for the
    periodic sync, which says a refusal said before at DEBUG."""
    from renderer.registration import registrator as module

    cid = "e" * 64
    refusing = FakeRegistrar({}, refuse=("web",))
    attempts = 0

    class Counting(FakeRegistrar):
        def register(self, registration: Registration) -> str:
            nonlocal attempts
            attempts += 1
            return refusing.register(registration)

    registrator = DockerRegistrator(FakeDocker([web(cid)]), Counting({}), host="h1")

    def event(status: str) -> dict[str, Any]:
        return {"status": status, "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}}

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(150):
            registrator.handle(event("health_status: unhealthy"))
            registrator.handle(event("health_status: healthy"))
        registrator.sync(quiet=True)  # the periodic sync asks again, and says nothing new
    assert attempts == module.FLAP_DROPS + 1
    assert caplog.text.count("not registered") == module.FLAP_DROPS
    assert caplog.text.count("withdrawn or refused 3 times") == 1


@pytest.mark.parametrize(
    "failure",
    [
        ConsulError("cannot reach the Consul agent at 127.0.0.1:8500: connection refused"),
        ConsulRequestError("Consul answered 429 for /v1/agent/service/register: too many connections", 429),
        ConsulRequestError("Consul answered 408 for /v1/agent/service/register: timeout", 408),
    ],
    ids=["unreachable", "429", "408"],
)
def test_an_agent_that_cannot_be_reached_or_asks_to_slow_down_damps_no_container(
    caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    """A re-review (/tmp/rev18): with refusals counted for the damping, an agent down while a container
    restarted three times damped it, and its next start, with the agent back, registered nothing.
    The next (/tmp/rev20): the same with 429, which the agent answers anyone on this address holding
    too many connections. Only the 4xx that refuse the registration itself count."""
    cid = "d" * 64
    down = [True]

    class Flaky(FakeRegistrar):
        def register(self, registration: Registration) -> str:
            if down[0]:
                raise failure
            return super().register(registration)

    registrar = Flaky({})
    registrator = DockerRegistrator(FakeDocker([web(cid)]), registrar, host="h1")
    start = {"status": "start", "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}}
    for _ in range(4):
        registrator.handle(start)
    down[0] = False
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator.handle(start)
    assert [r.id for r in registrar.registered] == ["web-" + cid[:12]]
    assert "withdrawn or refused" not in caplog.text


def test_an_unpause_of_an_unhealthy_container_registers_nothing() -> None:
    """An attacker's review: `_on_start` never asked whether the container serves, so an unpause
    (or a late start event) of one whose health is unhealthy registered it until the next sync."""
    cid = "c" * 64
    sick = {**web(cid), "State": {"Running": True, "Health": {"Status": "unhealthy"}}}
    registrar = FakeRegistrar({})
    registrator = DockerRegistrator(FakeDocker([sick]), registrar, host="h1")
    registrator.handle({"status": "unpause", "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}})
    assert registrar.registered == []
    healthy = {**web(cid), "State": {"Running": True, "Health": {"Status": "healthy"}}}
    DockerRegistrator(FakeDocker([healthy]), registrar, host="h1").handle(
        {"status": "health_status: healthy", "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}}
    )
    assert [r.id for r in registrar.registered] == ["web-" + cid[:12]]


def test_a_docker_that_does_not_answer_is_asked_again_and_never_switches_the_mark_silently(caplog: Any) -> None:
    """A later review: one failed `docker info` made the registrator mark its registrations with the
    hostname, without a word, so those it had marked with the engine's ID became ghosts. Now Docker
    is asked again until it answers (within ENGINE_WAIT_S), then the start fails and says why."""
    from renderer.errors import ConfigError
    from renderer.registration.registrator import ENGINE_RETRY_S, engine_host

    class Slow(FakeDocker):
        def __init__(self, failures: int) -> None:
            super().__init__([])
            self.failures = failures

        def info(self) -> Any:
            if self.failures:
                self.failures -= 1
                raise OSError("connection refused")
            return {"ID": "7TRN:IPZB"}

    waits: list[float] = []
    with caplog.at_level("WARNING"):
        assert engine_host(Slow(2), wait_s=60, sleep=waits.append) == "docker-engine-7TRN:IPZB"
    assert waits == [ENGINE_RETRY_S, ENGINE_RETRY_S]
    assert sum("did not say its engine ID" in record.getMessage() for record in caplog.records) == 2
    with pytest.raises(ConfigError, match=r"Docker did not say its engine ID within 0 s .*--host-id"):
        engine_host(Slow(1_000), wait_s=0, sleep=waits.append)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert engine_host(Slow(0)) == "docker-engine-7TRN:IPZB"

        class NoId(FakeDocker):
            def info(self) -> Any:
                return {"ID": "a\nb"}

        assert engine_host(NoId([])) is None
    assert any("no usable engine ID" in record.getMessage() for record in caplog.records)


def test_registrations_are_marked_with_the_engines_id_which_a_recreated_registrator_keeps() -> None:
    """An attacker's review: the default mark was the hostname, in compose the registrator
    container's own ID, new at each recreate: the registrations of containers stopped meanwhile
    were nobody's and never removed, at addresses Docker gives to other containers."""
    from renderer.registration.registrator import engine_host

    class Engine(FakeDocker):
        def __init__(self, info: Any) -> None:
            super().__init__([])
            self._info = info

        def info(self) -> Any:
            if isinstance(self._info, Exception):
                raise self._info
            return self._info

    assert engine_host(Engine({"ID": "7TRN:IPZB:QYBB:VPBQ:UWIO"})) == "docker-engine-7TRN:IPZB:QYBB:VPBQ:UWIO"
    assert engine_host(Engine({"ID": "a\nb"})) is None and engine_host(Engine([])) is None
    gone = "web-" + "e" * 12
    by_hostname = {gone: {"Meta": {OWNER_KEY: OWNER, HOST_KEY: "3f2a1b0c9d8e"}}}  # the old default's mark
    registrar = FakeRegistrar(by_hostname)
    registrator = DockerRegistrator(FakeDocker([]), registrar, host="docker-engine-X", adopt=("3f2a1b0c9d8e",))
    _, removed = registrator.sync()
    assert removed == [gone]


def test_adopted_marks_come_from_the_flag_and_by_default_the_hostname(monkeypatch: Any) -> None:
    """`--adopt MARK` (a compose upgrade: the old registrator container's hostname) makes those
    registrations ours too, with or without `--host-id`."""
    from renderer.errors import ConfigError
    from renderer.registration import registrator as module

    monkeypatch.setattr(module.socket, "gethostname", lambda: "3f2a1b0c9d8e")

    class Engine(FakeDocker):
        def info(self) -> Any:
            return {"ID": "7TRN:IPZB"}

    assert module.host_marks(Engine([]), None, ("0a1b2c3d4e5f",)) == (
        "docker-engine-7TRN:IPZB",
        ("3f2a1b0c9d8e", "0a1b2c3d4e5f"),
    )
    assert module.host_marks(Engine([]), "lb-1", ("0a1b2c3d4e5f",)) == ("lb-1", ("0a1b2c3d4e5f",))
    assert module.host_marks(Engine([]), "lb-1", ()) == ("lb-1", ())
    for flag, host_id, adopt in (("--adopt", None, ("",)), ("--adopt", "lb-1", ("a b",)), ("--host-id", "x\ny", ())):
        with pytest.raises(ConfigError, match=f"{flag} .*expected a host mark"):
            module.host_marks(Engine([]), host_id, adopt)


def test_the_sync_registers_again_one_whose_address_port_tags_or_meta_changed_unseen() -> None:
    """A container restarted while the registrator was away keeps its ID and may get another address;
    the sync compared IDs alone, so the catalog kept the old address (which Docker may give another
    container). One that matches, as Consul answers it (null tags), is left alone."""
    cid = "c" * 64
    service = service_from_container(web(cid))
    assert service is not None
    sid = service.service_id
    wanted = service.registration("h1")
    answer = {
        "ID": sid, "Service": wanted.name, "Port": wanted.port, "Address": wanted.address,
        "Tags": list(wanted.tags) or None, "Meta": dict(wanted.meta),
    }  # fmt: skip
    for changed, moved in ((None, None), ({"Address": "172.17.0.99"}, sid), ({"Port": 1}, sid),
                           ({"Meta": {**answer["Meta"], "weight": "9"}}, sid), ({"Tags": ["x"]}, sid)):  # fmt: skip
        registrar = FakeRegistrar({sid: {**answer, **(changed or {})}})
        added, removed = DockerRegistrator(FakeDocker([web(cid)]), registrar, host="h1").sync()
        assert (added, removed) == (([moved], []) if moved else ([], [])), changed
        assert [r.address for r in registrar.registered] == ([wanted.address] if moved else [])


# helper-141 (/tmp/rev87): the registrator against a hostile container owner and odd Docker answers.


class CountingDocker(FakeDocker):
    """FakeDocker counting its inspects; `failing`: container ids whose inspect Docker answers 500."""

    def __init__(self, containers: list[dict[str, Any]], failing: tuple[str, ...] = ()) -> None:
        super().__init__(containers)
        self.inspected: list[str] = []
        self._failing = failing

    def get(self, container_id: str) -> Listed:
        self.inspected.append(container_id)
        if container_id in self._failing:
            raise docker.errors.APIError("500 Server Error: Internal Server Error")
        return super().get(container_id)


def labelled_event(action: str, cid: str) -> dict[str, Any]:
    return {"Action": action, "id": cid, "Actor": {"ID": cid, "Attributes": {"consul.service": "web"}}}


def test_a_huge_label_is_refused_before_it_is_parsed() -> None:
    """A 16 MB consul.tags label was split whole: 0.9 s and 434 MB each time (e2_huge.py)."""
    with pytest.raises(LabelRefused, match=r"label consul.tags='t,t,.*\(10000000 characters\) is over 8192 characters"):
        _checked_service("a" * 64, {"consul.service": "web", "consul.port": "80", "consul.tags": "t," * 5_000_000},
                         LabelPolicy(), "172.17.0.5")  # fmt: skip
    many = {"consul.service": "web", "consul.port": "80", **{f"consul.x{n}": "1" for n in range(100)}}
    with pytest.raises(LabelRefused, match=r"102 consul\.\* labels, more than 40"):
        _checked_service("a" * 64, many, LabelPolicy(), "172.17.0.5")


def test_a_refused_container_is_inspected_and_warned_of_once_however_often_it_is_unpaused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """e1_logflood.py: 652 pause/unpause pairs of a container refused for its labels made 805
    warnings in 20 s, each after an inspect; a well-labelled one flapping was damped."""
    bad = "e" * 64
    docker = CountingDocker([web(bad, **{"consul.service": "evil"}), web("f" * 64)])
    registrar = FakeRegistrar({})
    registrator = DockerRegistrator(docker, registrar, host="h1", policy=LabelPolicy(("web",)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        registrator.sync()
        for _ in range(100):
            registrator.handle(labelled_event("pause", bad))
            registrator.handle(labelled_event("unpause", bad))
        registrator.sync(quiet=True)
    assert docker.inspected.count(bad) == 1
    assert [r.getMessage() for r in caplog.records].count(
        f"container {bad[:12]}: label consul.service='evil' is not an allowed name (--allow-service web); "
        "container skipped"
    ) == 1
    assert {r.name for r in registrar.registered} == {"web"}


def test_a_note_on_a_registered_container_is_said_once_not_at_every_sync(caplog: pytest.LogCaptureFixture) -> None:
    docker = FakeDocker([web("a" * 64, **{"consul.address": "10.9.9.9"})])
    registrator = DockerRegistrator(docker, FakeRegistrar({}), host="h1", policy=LabelPolicy(("*",)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):
            registrator.sync(quiet=True)
    assert caplog.text.count("label consul.address='10.9.9.9' ignored") == 1


def test_an_oom_event_leaves_the_running_container_registered() -> None:
    """e4_oom.py: a process in the container killed for memory, the container running on, was
    withdrawn until the next sync; its end says `die`."""
    cid = "a" * 64
    registrar = FakeRegistrar({})
    registrator = DockerRegistrator(FakeDocker([web(cid)]), registrar, host="h1")
    registrator.sync()
    registrator.handle(labelled_event("oom", cid))
    assert registrar.deregistered == []
    registrator.handle(labelled_event("die", cid))
    assert registrar.deregistered == ["web-" + cid[:12]]


def test_a_start_event_read_after_the_container_ended_registers_nothing() -> None:
    """e8_replay.py: the overlapping event windows replay a start after the die: 3 of 5 short-lived
    containers were registered again, dead, then withdrawn."""
    ended = {**web("a" * 64), "State": {"Running": False, "Status": "exited"}}
    registrar = FakeRegistrar({})
    registrator = DockerRegistrator(FakeDocker([ended]), registrar, host="h1")
    registrator.handle(labelled_event("start", "a" * 64))
    assert registrar.registered == [] and registrator.sync() == ([], [])


def test_a_container_docker_cannot_inspect_costs_neither_the_others_nor_its_own_registration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """p2_sync_isolation.py: one inspect answered 500 failed every sync, and no container was
    registered. The others are now; its own registration is kept, not taken for a ghost."""
    broken, sid = "b" * 64, "web-" + "b" * 12
    ours = {"Service": "web", "Meta": {OWNER_KEY: OWNER, HOST_KEY: "h1", "container-id": broken[:12]}}
    registrar = FakeRegistrar({sid: ours})
    docker = CountingDocker([web("a" * 64), web(broken), web("c" * 64)], failing=(broken,))
    registrator = DockerRegistrator(docker, registrar, host="h1")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        added, removed = registrator.sync()
        registrator.sync(quiet=True)
    assert added == ["web-" + "a" * 12, "web-" + "c" * 12] and removed == [] and registrar.deregistered == []
    assert caplog.text.count(f"container {broken[:12]}: not read (APIError") == 1


@pytest.mark.parametrize("ip", ["127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.1", "255.255.255.255",
                                "fe80::1%eth0", "fe80::1", "::1", "::ffff:10.0.0.1", "ff02::1"])  # fmt: skip
def test_a_container_address_docker_should_never_give_is_not_registered(ip: str) -> None:
    """p6_own_address.py: Docker's answer was taken whole, and the check URL built on it sends
    the agent there (a zone ID with a newline reached the log too)."""
    attrs = web("a" * 64)
    attrs["NetworkSettings"]["Networks"]["bridge"] = {"IPAddress": ip}
    assert service_from_container(attrs) is None
    attrs["NetworkSettings"]["Networks"]["other"] = {"IPAddress": "172.18.0.9"}
    served = service_from_container(attrs)
    assert served is not None and served.address == "172.18.0.9"  # another network's address serves


def test_an_address_label_the_container_may_not_have_is_refused() -> None:
    """helper-143 (/tmp/rev89, e11.out): with --allow-address-label, consul.address=127.0.0.1 at the
    agent's port and a check path /v1/agent/self put the agent's configuration in the check's
    output, no redirect needed. The label takes the container's own address's rules."""
    for ip in ("0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "127.0.0.1", "::1", "169.254.169.254", "fe80::1"):
        with pytest.raises(LabelRefused, match="is not an address to register"):
            _address(ip)
    assert _address("10.0.0.5") == "10.0.0.5"


def test_a_meta_key_consul_reserves_is_refused_at_the_label() -> None:
    """helper-143 (N1): Consul refuses a `consul-` meta key and echoes the pair in its 400, which
    a container used to switch DisableRedirects off for everyone (see test_registration_consul)."""
    with pytest.raises(LabelRefused, match=r"consul\.meta\.consul-x"):
        _checked_service("a" * 64, {"consul.service": "web", "consul.port": "80", "consul.meta.consul-x": "v"},
                         LabelPolicy(), "172.17.0.5")  # fmt: skip


def test_the_stop_event_of_a_container_docker_could_not_inspect_still_withdraws_it() -> None:
    """helper-143 (N3, p9_unread_forgets_ours.py): the sync kept an unread container's registration
    but forgot it was ours, so its `die` withdrew nothing until the next sync."""
    broken, sid = "b" * 64, "web-" + "b" * 12
    ours = {"Service": "web", "Meta": {OWNER_KEY: OWNER, HOST_KEY: "h1", "container-id": broken[:12]}}
    registrar = FakeRegistrar({sid: ours})
    registrator = DockerRegistrator(CountingDocker([web(broken)], failing=(broken,)), registrar, host="h1")
    registrator.sync()
    registrator.handle(labelled_event("die", broken))
    assert registrar.deregistered == [sid]


@pytest.mark.parametrize("name", ["consul", "Consul", "CONSUL"])
def test_a_container_cannot_claim_consuls_own_service(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """e9_consul_name.py: without --allow-service a container was listed beside the real server."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert service_from_container(web("a" * 64, **{"consul.service": name})) is None
    assert "is Consul's own service" in caplog.text


def test_after_a_reconnect_a_sync_consul_refuses_does_not_end_the_registrator(pace: Pace) -> None:
    """p3_reconnect_403.py: Docker's connection lost, the sync after the reconnect met a 403 on the
    agent's services and `run` ended: no withdrawal after that, ghosts left."""

    class Losing(FakeDocker):
        windows = 0

        def events(self, decode: bool, filters: dict[str, str], since: int, until: int) -> list[dict[str, Any]]:
            Losing.windows += 1
            if Losing.windows == 1:
                raise requests.exceptions.ConnectionError("Docker went away")
            return []

    class Refusing(FakeRegistrar):
        asked = 0

        def services(self) -> dict[str, Any]:
            Refusing.asked += 1
            if Refusing.asked == 2:
                raise ConsulRequestError("Consul refused /v1/agent/services: ACL not found", 403)
            return super().services()

    registrator = DockerRegistrator(Losing([web("a" * 64)]), Refusing({}), host="h1")
    running = threading.Thread(target=registrator.run, daemon=True)
    running.start()
    try:
        wait_until(lambda: Losing.windows >= 3, pace(20), "events followed again")  # reconnected, refused, following
        assert running.is_alive() and Refusing.asked == 2
    finally:
        registrator.stop()
        running.join(pace(10))
    assert not running.is_alive()
