"""etc/grafana-dashboard.json: valid JSON, and a panel for every family the agent serves."""

import json
import pathlib
import re

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "etc" / "grafana-dashboard.json"

# Every compute_agent_ family of /metrics (tests/functional/test_metrics.py checks they exist).
FAMILIES = [
    "hub_lag_seconds",
    "heartbeat_age_seconds",
    "service_disabled",
    "periodic_task_duration_seconds",
    "periodic_task_failures_total",
    "power_sync_instances_total",
    "requests_total",
    "request_duration_seconds",
    "libvirt_connected",
    "libvirt_call_duration_seconds",
    "instances",
    "builds_in_progress",
    "builds_queued",
    "lifecycle_events_total",
    "instance_info",
    "instance_cpu_seconds_total",
    "instance_memory_rss_bytes",
    "instance_vcpus",
    "instance_block_read_bytes_total",
    "instance_block_write_bytes_total",
    "instance_network_receive_bytes_total",
    "instance_network_transmit_bytes_total",
    "instance_stats_unresponsive",
    "instance_stats_age_seconds",
]


def test_dashboard_is_json_with_a_panel_per_family():
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    used = {
        m
        for p in panels
        for t in p["targets"]
        for m in re.findall(r"compute_agent_[a-z_]+", t["expr"])
    }
    for family in FAMILIES:
        name = f"compute_agent_{family}"
        assert any(u == name or u.startswith(name + "_") for u in used), family
    for p in panels:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["title"]
