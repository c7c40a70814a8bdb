"""Passwords are masked in the log even where a library quotes them outside a URL."""

from __future__ import annotations

import logging
import uuid

import kombu.utils.url
import pytest

from compute_agent import log


def test_a_password_cut_by_a_url_parser_is_masked() -> None:
    """oslo.messaging re-quotes a rabbit password leaving '/' as is; kombu then
    reads the password up to the '/' as the port and says so in its error."""
    token = uuid.uuid4().hex
    log.register_secret_urls(f"rabbit://user:Rq{token}%2Fx@127.0.0.1:5672/")
    with pytest.raises(ValueError) as caught:
        kombu.utils.url.parse_url(f"amqp://user:Rq{token}/x@127.0.0.1:5672/")
    assert token in str(caught.value)  # the library's own message holds it
    assert token not in log.mask_secrets(str(caught.value))
    assert token not in log.mask_secrets(f"password Rq{token}/x and Rq{token}%2Fx")


def test_formatter_masks_configured_passwords_outside_urls(conf) -> None:
    token = uuid.uuid4().hex
    conf.set_override("transport_url", f"rabbit://u:Rq{token}@127.0.0.1:5672/")
    conf.set_override("connection", f"postgresql://p:Pg{token}@127.0.0.1/db", "database")
    log.setup(conf)
    try:
        handler = logging.getLogger().handlers[0]
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "got %s", (f"Pg{token}",), None)
        assert token not in handler.format(record)
        record.args = (f"'Rq{token}'",)
        assert handler.format(record).endswith("got '***'")
    finally:
        logging.getLogger().handlers.clear()


def test_short_passwords_and_pieces_are_masked_in_urls_only() -> None:
    """'guest' is a word: masking it everywhere garbled 'qemu-guests0' into 'qemu-***s0'."""
    log.register_secret_urls("rabbit://guest:guest@h:5672/", "rabbit://u:abcdefg/cd@h:5672/")
    assert log.mask_secrets("/tmp/qemu-guests0 a cd") == "/tmp/qemu-guests0 a cd"
    assert log.mask_secrets("rabbit://guest:guest@h:5672/") == "rabbit://guest:***@h:5672/"
    assert log.mask_secrets("as 'abcdefg'") == "as '***'"
