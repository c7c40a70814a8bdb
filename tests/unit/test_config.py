"""Configuration: defaults, validation, clear errors, and a sample that is never stale."""

import pathlib
import subprocess
import sys

import pytest
from oslo_config import cfg

from compute_agent import exception
from compute_agent.conf import loader, register_all

REPO = pathlib.Path(__file__).resolve().parents[2]


def fresh() -> cfg.ConfigOpts:
    c = cfg.ConfigOpts()
    register_all(c)
    return c


def load_file(tmp_path, text: str) -> cfg.ConfigOpts:
    path = tmp_path / "agent.conf"
    path.write_text(text)
    c = fresh()
    loader.load(c, ["--config-file", str(path)], "test")
    return c


def test_defaults(tmp_path):
    c = load_file(tmp_path, "")
    assert c.report_interval == 10
    assert c.service_down_time == 60
    assert c.compute.sync_power_state_interval == 600
    assert c.libvirt.connection_uri == "test:///default"
    assert c.database.connection == f"sqlite:///{c.state_path}/compute-agent.sqlite"
    name = loader.render_domain_name(
        c.compute.instance_name_template, "6f1c2f0e-58c5-4bd6-9e8b-6b2d3e9b1a77"
    )
    assert name == "instance-6f1c2f0e-58c5-4bd6-9e8b-6b2d3e9b1a77"


def test_values_from_file(tmp_path):
    c = load_file(
        tmp_path, "[DEFAULT]\nreport_interval = 3\n[compute]\nsync_power_state_interval = -1\n"
    )
    assert c.report_interval == 3
    assert c.compute.sync_power_state_interval == -1


@pytest.mark.parametrize(
    "text, message",
    [
        ("[DEFAULT]\nreport_interval = often\n", "report_interval"),
        ("[DEFAULT]\nreport_interval = 0\n", "report_interval"),
        ("[compute]\nsync_power_state_concurrency = 0\n", "sync_power_state_concurrency"),
        ("[compute]\ninstance_name_template = vm\n", "must use %(uuid)s"),
        ("[compute]\ninstance_name_template = vm-%(name)s\n", "not a valid template"),
        ("[compute]\ninstance_name_template = vm <%(uuid)s>\n", "not a valid domain name"),
        ("[DEFAULT\nhost = x\n", "malformed"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(exception.ConfigError, match=None) as info:
        load_file(tmp_path, text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(exception.ConfigError, match="not found"):
        loader.load(fresh(), ["--config-file", str(tmp_path / "nope.conf")], "t")
    with pytest.raises(exception.ConfigError, match="cannot be read"):
        loader.load(fresh(), ["--config-file", str(tmp_path)], "t")


def test_unknown_options_are_reported(tmp_path):
    c = load_file(
        tmp_path,
        "[DEFAULT]\nreport_intervall = 5\n[compute]\nsync_power = 1\n[other]\nwhatever = 1\n",
    )
    assert loader.unknown_options(c) == ["DEFAULT.report_intervall", "compute.sync_power"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config-file", "/nonexistent/agent.conf"], "config file not found"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_entry_point_exits_2_with_one_line(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "compute_agent.cmd.agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_entry_point_bad_value(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("[DEFAULT]\nservice_down_time = soon\n")
    proc = subprocess.run(
        [sys.executable, "-m", "compute_agent.cmd.agent", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compute-agent: error: ")
    assert "service_down_time" in lines[0]


def test_sample_config_is_not_stale(tmp_path):
    out = tmp_path / "sample.conf"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "oslo_config.generator",
            "--namespace",
            "compute_agent",
            "--wrap-width",
            "79",
            "--output-file",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    committed = (REPO / "etc" / "compute-agent.conf").read_text()
    assert out.read_text() == committed, "etc/compute-agent.conf is stale: run `make genconfig`"


def test_stats_thresholds_that_defeat_each_other_are_warned_of(conf):
    assert loader.doubtful_settings(conf) == []  # the defaults: 300 > 60 + 30
    conf.set_override("stats_interval", 1, group="compute")
    conf.set_override("stats_call_timeout", 2, group="compute")
    conf.set_override("stats_unresponsive_after", 3, group="compute")
    (doubt,) = loader.doubtful_settings(conf)
    assert "stats_unresponsive_after (3 s)" in doubt and "1 + 2 s" in doubt
    conf.set_override("stats_interval", 0, group="compute")  # sampling off: nothing to say
    assert loader.doubtful_settings(conf) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        ("debug = notabool\n", "Unexpected boolean value 'notabool'"),
        ("garbage [[[\n", "Failed to parse"),
    ],
)
def test_a_reload_with_a_bad_edit_keeps_the_values_in_force(tmp_path, edit, message):
    """SIGHUP after ``debug = notabool``: every later read of ``debug`` raised."""
    c = load_file(tmp_path, "[DEFAULT]\ndebug = true\n")
    path = tmp_path / "agent.conf"
    path.write_text("[DEFAULT]\ndebug = false\n")
    loader.mutate(c)
    assert c.debug is False
    path.write_text("[DEFAULT]\n" + edit)
    with pytest.raises(ValueError, match=message):
        loader.mutate(c)
    assert c.debug is False  # as before the bad edit, and readable
    path.write_text("[DEFAULT]\ndebug = true\n")
    loader.mutate(c)  # a fixed file is taken by the next reload
    assert c.debug is True
