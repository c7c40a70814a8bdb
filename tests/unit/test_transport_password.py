"""A RabbitMQ password holding '/' is refused at load, and the refusal does not quote it."""

from __future__ import annotations

import uuid

import kombu.utils.url
import pytest
from oslo_config import cfg
from oslo_messaging._drivers import impl_rabbit
from oslo_messaging.transport import TransportURL

from compute_agent import exception
from compute_agent.conf import loader, register_all


def _load(tmp_path, url: str) -> cfg.ConfigOpts:
    path = tmp_path / "agent.conf"
    path.write_text(f"[DEFAULT]\nstate_path = {tmp_path}\ntransport_url = {url}\n")
    conf = cfg.ConfigOpts()
    register_all(conf)
    loader.load(conf, ["--config-file", str(path)], "compute-agent")
    return conf


def test_oslo_messaging_cannot_pass_a_slash_on_to_kombu(conf) -> None:
    """Why the check exists: the URL kombu gets back has the password cut at '/'."""
    parsed = TransportURL.parse(conf, "rabbit://u:ab%2Fcd@127.0.0.1:5672/")
    rebuilt = impl_rabbit.Connection._transform_transport_url(None, parsed, parsed.hosts[0])
    with pytest.raises(ValueError, match="Port could not be cast"):
        kombu.utils.url.parse_url(rebuilt)


def test_a_slash_in_a_rabbit_password_is_refused_without_quoting_it(tmp_path) -> None:
    token = uuid.uuid4().hex
    for url in (
        f"rabbit://u:Rq{token}%2Fx@127.0.0.1:5672/",
        f"rabbit://a:ok-{token}@h1:5672,u:Rq{token}/x@h2:5672/",  # the second host's
    ):
        with pytest.raises(exception.ConfigError, match="transport_url") as caught:
            _load(tmp_path, url)
        assert token not in str(caught.value)


def test_other_special_characters_are_accepted(tmp_path) -> None:
    url = "rabbit://u:a%23b%3Fc%40d@127.0.0.1:5672/"
    assert _load(tmp_path, url).transport_url == url
