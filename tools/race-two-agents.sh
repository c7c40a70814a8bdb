#!/bin/bash
# Two compute-agents for one host, own state_paths, one SQLite database, started at
# the same instant, N times (docs/reliability.md, "Issue 13 under attack"). Prints,
# per trial, the live pids (one expected), the service row (count, owner, ...) and
# both lock files' tokens (the row's owner is the live one's), and the loser's line.
# Run from the repository: N=4 tools/race-two-agents.sh
P=${PYTHON:-.venv/bin/python}
work=$(mktemp -d /tmp/ca-race-XXXXXX)
for i in $(seq 1 "${N:-4}"); do
  d=$work/t$i; mkdir -p "$d/a" "$d/b"
  for x in a b; do
    printf "[DEFAULT]\nstate_path = %s\nhost = race\nreport_interval = 1\nperiodic_fuzzy_delay = 0\nlog_file = %s\n[database]\nconnection = sqlite:///%s\n" \
      "$d/$x" "$d/$x.log" "$d/db.sqlite" > "$d/$x.conf"
  done
  $P -m compute_agent.cmd.manage --config-file etc/compute-agent.conf --config-file "$d/a.conf" db sync >/dev/null
  $P -m compute_agent.cmd.agent --config-file etc/compute-agent.conf --config-file "$d/a.conf" > "$d/a.out" 2>&1 & pa=$!
  $P -m compute_agent.cmd.agent --config-file etc/compute-agent.conf --config-file "$d/b.conf" > "$d/b.out" 2>&1 & pb=$!
  sleep 8
  alive=""; for p in $pa $pb; do kill -0 $p 2>/dev/null && alive="$alive $p"; done
  row=$(sqlite3 "$d/db.sqlite" "select count(*), owner, report_count, stopped_at is null from services")
  echo "trial $i: alive:$alive row:$row a:$(grep -o 'token=[0-9a-f]*' "$d/a/compute-agent.lock") b:$(grep -o 'token=[0-9a-f]*' "$d/b/compute-agent.lock")"
  tail -qn1 "$d/a.out" "$d/b.out" | cut -c1-150
  kill $pa $pb 2>/dev/null; wait
done
rm -rf "$work"
