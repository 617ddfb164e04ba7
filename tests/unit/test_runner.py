"""The loop end to end within one process, where no Consul answer is needed (or none comes)."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest

from lab.processes import free_port
from renderer.config import Config, ConsulSettings, TemplateSpec
from renderer.errors import ConsulError
from renderer.runner import Runner, held_wait


def test_dry_output_redacts_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole --dry --once run of a template that prints the token, passed by mistake as a
    variable (env() never shows it), needing no Consul data."""
    (tmp_path / "t.j2").write_text("token={{ leaked }}\n")
    out = io.StringIO()
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "o")
    config = Config(
        consul=ConsulSettings(token="s3cr3t-token"), templates=(spec,), dry=True, once=True,
        vars={"leaked": "s3cr3t-token"},
    )  # fmt: skip
    assert asyncio.run(Runner(config, out=out).run()) == 0
    assert out.getvalue() == f"> {tmp_path / 'o'}\ntoken=[redacted]\n"


def test_once_gives_up_after_once_timeout_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("{% for s in service('web') %}{{ s.address }}\n{% endfor %}")
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "o")
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = Config(consul=ConsulSettings(addr=closed), templates=(spec,), once=True, once_timeout=1.0)
    with pytest.raises(ConsulError, match=r"--once: no complete render within 1s \(once_timeout\)"):
        asyncio.run(asyncio.wait_for(Runner(config).run(), 30))
    assert not (tmp_path / "o").exists()


def test_a_block_wait_past_ten_minutes_holds_over_http2_and_is_lowered_over_http11(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over HTTP/1.1 nothing checks a held connection (no PING): a wait past Consul's default
    ceiling is lowered to it, with a line that says why and what to do instead."""
    assert held_wait(7200.0, over_http2=True) == 7200.0
    assert (held_wait(0.0, over_http2=True), held_wait(0.0, over_http2=False)) == (600.0, 60.0)  # the defaults
    assert held_wait(300.0, over_http2=False) == 300.0
    with caplog.at_level(logging.WARNING):
        assert held_wait(7200.0, over_http2=False) == 600.0
    assert "block_wait 7200 s lowered to 600 s over HTTP/1.1" in caplog.text and "HTTPS" in caplog.text
