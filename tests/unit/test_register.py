"""What `consul-renderer register` sends to the agent, and how it reports its child."""

from __future__ import annotations

import pytest

from renderer.errors import ConfigError
from renderer.registration.register import Registration, child_exit_status, parse_meta


def test_a_check_path_becomes_a_url_on_the_registered_address() -> None:
    body = Registration("web", 8080, tags=("lb",), check_http="/health", deregister_critical_after="1m").payload(
        "10.0.0.7"
    )
    assert body["Address"] == "10.0.0.7" and body["Tags"] == ["lb"]
    assert body["Check"] == {
        "HTTP": "http://10.0.0.7:8080/health",
        "Interval": "2s",
        "Timeout": "1s",
        "DeregisterCriticalServiceAfter": "1m",
    }


def test_an_ipv6_address_is_bracketed_in_the_check_url() -> None:
    body = Registration("web", 80, address="2001:db8::5", check_http="/ready").payload("unused")
    assert body["Check"]["HTTP"] == "http://[2001:db8::5]:80/ready"


def test_meta_needs_key_equals_value() -> None:
    assert parse_meta(["weight=5", "zone=a=b"]) == {"weight": "5", "zone": "a=b"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_meta(["weight"])


def test_a_child_killed_by_a_signal_reports_as_a_shell_would() -> None:
    assert (child_exit_status(-15), child_exit_status(3)) == (143, 3)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "169.254.10.1"])
def test_a_local_address_is_warned_about_as_load_balancers_refuse_it(address: str) -> None:
    from renderer.registration.register import local_address_warning

    warning = local_address_warning("web-1", address)
    assert warning is not None and f"web-1 is registered at {address}" in warning
    assert "--address" in warning and "allow_local_addresses" in warning


@pytest.mark.parametrize("address", ["10.0.0.7", "2001:db8::5", "192.168.1.4"])
def test_a_routable_address_is_not_warned_about(address: str) -> None:
    from renderer.registration.register import local_address_warning

    assert local_address_warning("web-1", address) is None


def test_an_agent_answer_nested_too_deep_is_a_consul_error_not_a_crash() -> None:
    """An attacker's review: `[` × 200,000 from /v1/agent/services raised RecursionError (no
    ValueError) out of the registrar, and the registrator exited."""
    from types import SimpleNamespace

    from renderer.errors import ConsulError
    from renderer.registration.register import _checked

    with pytest.raises(ConsulError, match="not JSON"):
        _checked("/v1/agent/services")(SimpleNamespace(code=200, body="[" * 200_000))
