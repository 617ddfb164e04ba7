"""serve_services: the services a template's listings may serve. A registration named for another's
Host (`api.example` beside `api`) otherwise takes its traffic: the default template routes Host
`api.example.*` to the name with the most labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE
from renderer.config import TemplateSpec, load
from renderer.errors import ConfigError
from renderer.render.listing import ServedServices, build_listing
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import CatalogServices, HealthService
from tests.unit.test_service_settings import VARIABLES, Data, instance


def catalog_data(names: list[str], health: list[str]) -> Data:
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in names})}
    for name in health:
        values[HealthService(name).key] = HealthService(name).parse([instance(name, f"{name}-1")])
    return Data(values)


def test_patterns_are_read_from_file_env_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('serve_services = "web, api ,shop-*"\n')
    assert load(cfg, {}, {}).serve_services == ("web", "api", "shop-*")
    assert load(None, {}, {"CONSUL_RENDERER_SERVE_SERVICES": "a?c"}).serve_services == ("a?c",)
    assert load(None, {"serve_services": ""}, {}).serve_services == ()
    assert load(None, {}, {}).serve_services == ("*",)  # every service, as before
    array = tmp_path / "a.toml"
    array.write_text('serve_services = ["web", "api"]\n')  # a review's finding: read as "['web'", "'api']"
    assert load(array, {}, {}).serve_services == ("web", "api")
    array.write_text("serve_services = 3\n")
    with pytest.raises(ConfigError, match="serve_services: 3 is not a list of service names"):
        load(array, {}, {})
    for bad in ("web api", "web,\x1b[2J", "x" * 300):
        with pytest.raises(ConfigError, match="serve_services"):
            load(None, {"serve_services": bad}, {})


def test_names_match_case_for_case_and_wildcards_never_match_a_dot() -> None:
    """A review's findings: `shop-*` let `shop-eu.example` take Host shop-eu.example.* from `shop-eu`
    (the takeover the list is for), and `web` matched without case let `WEB` take the Host and path
    of a default service reached through `also`."""
    allowed = ServedServices(("api", "shop-*", "db?", "[ab]x", "*.example"))
    for name in ("api", "shop-eu", "shop-", "db1", "ax", "bx", "shop.example"):
        assert allowed.refusal(name) is None, name
    for name in ("API", "Api", "api.test", "shop-eu.test", "apix", "db.", "db12", ".x", "a.b.example"):
        why = allowed.refusal(name)
        assert why is not None and "serve_services (api,shop-*,db?,[ab]x,*.example)" in why, name
        assert "--serve-services" in why
    assert ServedServices(("[!a]x",)).refusal("bx") is None and ServedServices(("[!a]x",)).refusal(".x") is not None
    assert ServedServices(()).refusal("web") is not None  # none at all
    assert ServedServices().refusal("anything.at.all") is None  # the default: every service


def test_a_refused_name_takes_no_name_from_an_allowed_one() -> None:
    """A refused name is left out before names are compared: it can make no allowed one lose its
    backend name."""
    strict = build_listing({"Api.example": ["lb"], "api": ["lb"]}, "lb", (), ServedServices(("api",)))
    assert [s.name for s in strict.services] == ["api"]
    assert len(strict.left_out) == 1 and strict.left_out[0].startswith("service 'Api.example': not among")


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, ROUTES_TEMPLATE])
def test_a_service_not_allowed_gets_no_route_no_backend_and_no_watch(template: Path) -> None:
    """The review's takeover: `api.example` registered beside `api` took Host api.example.*; with
    serve_services = web,api it is left out and reported, and never read (no watch on it)."""
    renderer = TemplateRenderer(
        TemplateSpec(template, Path("/tmp/unused")), VARIABLES, environ={}, serve_services=("web", "api")
    )
    result = renderer.render(catalog_data(["api", "api.example", "web"], ["api", "web"]))
    assert result.content is not None, (result.missing, result.error)
    assert "api.example" not in result.content and "api" in result.content
    assert HealthService("api.example").key not in result.dependencies
    assert any(note.startswith("service 'api.example': not among serve_services (web,api)") for note in result.left_out)
    everything = TemplateRenderer(TemplateSpec(template, Path("/tmp/unused")), VARIABLES, environ={})
    taken = everything.render(catalog_data(["api", "api.example", "web"], ["api", "api.example", "web"]))
    assert taken.content is not None and "api.example" in taken.content  # without the list, as before


def test_patterns_read_brackets_as_fnmatch_does_but_never_match_a_dot() -> None:
    """A review's finding: a backwards range (`[z-a]`) compiled to a bad regular expression and
    ended `run` with a traceback (`check` said the configuration was valid)."""
    import fnmatch
    import itertools

    patterns = ["[z-a]x", "[!z-a]x", "[a-\\]", "[a--]", "[a&&b]", "[]x]", "[!]]", "[", "a[b", "[!a]?", "*[a-c]", "x+($"]
    names = ["".join(chars) for n in range(1, 4) for chars in itertools.product("ax-]&\\+($", repeat=n)]
    for pattern in patterns:
        served = ServedServices((pattern,))
        assert load(None, {"serve_services": pattern}, {}).serve_services == (pattern,)
        for name in names:
            assert (served.refusal(name) is None) == fnmatch.fnmatchcase(name, pattern), (pattern, name)
        assert served.refusal(".x") is not None and served.refusal("a.x") is not None  # no wildcard takes a dot
