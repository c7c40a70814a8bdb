"""The log file survives logrotate and SIGHUP; the level can change at run time."""

import logging
import logging.handlers
import time

import pytest

from compute_agent import log

LOG = logging.getLogger("compute_agent.test_log_files")


@pytest.fixture
def root_restored():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved:
            root.removeHandler(handler)
            handler.close()
    for handler in saved:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def _wait_for(path, text: str, timeout: float = 10) -> str:
    """The file's content once it holds ``text`` (the writer is a native thread)."""
    end = time.monotonic() + timeout
    content = ""
    while time.monotonic() < end:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in {path}: {content!r}")


@pytest.mark.parametrize("background", [False, True])
def test_a_renamed_log_file_is_replaced_by_a_new_one(conf, tmp_path, root_restored, background):
    path = tmp_path / "agent.log"
    conf.set_override("log_file", str(path))
    log.setup(conf, background=background)
    LOG.info("before rotation")
    _wait_for(path, "before rotation")
    path.rename(tmp_path / "agent.log.1")  # what logrotate does, without copytruncate
    LOG.info("after rotation")
    assert "after rotation" in _wait_for(path, "after rotation")
    assert "after rotation" not in (tmp_path / "agent.log.1").read_text()


def test_reopen_starts_a_new_file_in_order_with_the_queued_lines(conf, tmp_path, root_restored):
    path = tmp_path / "agent.log"
    conf.set_override("log_file", str(path))
    log.setup(conf, background=True)
    LOG.info("line one")
    _wait_for(path, "line one")
    # Moved, then a new file put in place (create mode of logrotate): the
    # handler keeps writing to the file at the path, the old one is left alone.
    path.rename(tmp_path / "agent.log.1")
    path.write_text("")
    LOG.info("line two")
    log.reopen()
    LOG.info("line three")
    content = _wait_for(path, "line three")
    assert content.index("line two") < content.index("line three")
    assert (tmp_path / "agent.log.1").read_text().count("line") == 1


def test_set_level_switches_debug_on_and_off(root_restored):
    log.set_level(True)
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("kombu").level == logging.WARNING
    log.set_level(False)
    assert logging.getLogger().level == logging.INFO


def test_syslog_handler_is_used_when_asked(conf, tmp_path, monkeypatch, root_restored):
    import socket

    address = str(tmp_path / "dev-log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    monkeypatch.setattr(log, "SYSLOG_ADDRESS", address)
    conf.set_override("use_syslog", True)
    conf.set_override("syslog_log_facility", "local3")
    conf.set_override("transport_url", "rabbit://u:Secret12345@127.0.0.1:5672/")
    log.setup(conf)
    assert isinstance(logging.getLogger().handlers[0], logging.handlers.SysLogHandler)
    LOG.warning("to syslog, password Secret12345")
    datagram = server.recv(4096).decode()
    server.close()
    # <facility local3 (19) * 8 + warning (4)>, the program and pid, the secret masked.
    assert datagram.startswith("<156>compute-agent[")
    assert datagram.rstrip("\x00").endswith("to syslog, password ***")
