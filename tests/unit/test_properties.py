"""Property tests over what Consul may return: never an injected config line, never a crashed watcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import TemplateSpec
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import CatalogServices, HealthService, ServiceInstance

# Any text, with a bias towards what breaks config files.
nasty = (
    st.text(alphabet=st.sampled_from(list("ab-_.:/ #\n\r\t\x00\u2028{}%\"'\\")), max_size=12)
    | st.text(max_size=12)
    | st.sampled_from(["web", "lb", "x\nbackend evil", "1\r\nserver z 1.2.3.4:80"])
)
instance = st.fixed_dictionaries(
    {
        "node": nasty,
        "id": nasty,
        "address": nasty | st.sampled_from(["10.0.0.1", "::1", "host.example"]),
        "port": st.integers(min_value=-5, max_value=70000),
        "tags": st.lists(nasty, max_size=3),
        "meta": st.dictionaries(nasty, nasty, max_size=3),
    }
)


class Data:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> tuple[bool, Any]:
        return key in self.values, self.values.get(key)


def entries(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "Node": {"Node": i["node"], "Address": "10.9.9.9"},
            "Service": {"ID": i["id"], "Service": "web", "Address": i["address"], "Port": i["port"],
                        "Tags": i["tags"], "Meta": i["meta"]},
            "Checks": [{"Status": "passing"}],
        }
        for i in items
    ]  # fmt: skip


def render(items: list[dict[str, Any]], tmp: Path) -> Any:
    values = {
        CatalogServices().key: CatalogServices().parse({"web": ["lb"]}),
        HealthService("web").key: HealthService("web").parse(entries(items)),
    }
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, tmp / "haproxy.cfg"), {})
    return renderer.render(Data(values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(instance, max_size=4))
def test_catalog_data_never_adds_a_line(items: list[dict[str, Any]], tmp_path: Path) -> None:
    result = render(items, tmp_path)
    benign = [dict(i, node="n", id=f"i{k}", address="10.0.0.1", port=80, tags=[], meta={}) for k, i in enumerate(items)]
    baseline = render(benign, tmp_path)
    assert baseline.content is not None
    assert result.content is not None, result.error  # an unsafe instance is left out, the rest renders
    # Never a line more than the same catalog with harmless values (an unsafe instance is left out,
    # which can only take its server line away).
    assert len(result.content.splitlines()) <= len(baseline.content.splitlines())
    for line in result.content.splitlines():
        assert "\r" not in line and "\x00" not in line


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(data=json_values)
def test_parsing_any_answer_fails_only_in_ways_the_watcher_handles(data: Any) -> None:
    """Property: any JSON answer either parses into the shape templates rely on, or fails with one
    of the four errors the watcher catches (it keeps the last data and goes on); never anything else."""
    for dep in (HealthService("web"), CatalogServices()):
        try:
            parsed = dep.parse(data)
        except (TypeError, ValueError, AttributeError, KeyError):
            continue
        if isinstance(dep, HealthService):
            assert isinstance(parsed, tuple) and all(isinstance(i, ServiceInstance) for i in parsed)
        else:
            assert isinstance(parsed, dict) and all(isinstance(tags, tuple) for tags in parsed.values())
