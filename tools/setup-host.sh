#!/usr/bin/env bash
# Idempotent host set-up for building and testing compute-agent on Debian 12:
# the apt packages pip needs to build libvirt-python, and the local services the
# functional tests talk to, started if installed but stopped.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(libvirt-dev pkg-config gcc python3-dev python3-venv)
# PgBouncer, for the tests that run the PostgreSQL database tests through a
# transaction-pooling PgBouncer (tests/conftest.py, docs/operations.md).
if [ "${SETUP_SERVICES:-1}" = "1" ]; then APT_PACKAGES+=(pgbouncer); fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
fi

wait_port() {  # host port seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "setup-host: nothing answers on $1:$2 after $3 s" >&2
    return 1
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if [ "${SETUP_SERVICES:-1}" = "1" ]; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && ! port_open 127.0.0.1 5432; then
        echo "setup-host: starting PostgreSQL"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
        wait_port 127.0.0.1 5432 30
    fi
    if [ -x /usr/sbin/mariadbd ] && ! port_open 127.0.0.1 3306; then
        echo "setup-host: starting MariaDB"
        $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
        wait_port 127.0.0.1 3306 30
    fi
    if command -v rabbitmq-server >/dev/null && ! port_open 127.0.0.1 5672; then
        echo "setup-host: starting RabbitMQ"
        $SUDO rabbitmq-server -detached
        wait_port 127.0.0.1 5672 90
    fi
fi

# PgBouncer on 127.0.0.1:6432 in transaction pooling mode in front of the local
# PostgreSQL, for every database (the `*` entry) and every role the server
# knows: PgBouncer trusts the client as the server's pg_hba.conf does, and looks
# the role up in the server itself (auth_query as postgres). Not the packaged
# service: the daemon itself, as the other services here, with a config of its own.
PGBOUNCER_INI=/etc/pgbouncer/compute-agent-test.ini
if [ "${SETUP_SERVICES:-1}" = "1" ] && [ -x /usr/sbin/pgbouncer ]; then
    wanted=$(cat <<'INI'
; Written by compute-agent's tools/setup-host.sh: a test PgBouncer (docs/operations.md).
[databases]
* = host=127.0.0.1 port=5432 auth_user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
unix_socket_dir =
logfile = /var/log/postgresql/pgbouncer-compute-agent-test.log
pidfile = /var/run/postgresql/pgbouncer-compute-agent-test.pid
auth_type = trust
auth_file = /etc/pgbouncer/userlist.txt
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = $1
pool_mode = transaction
; Clients (agents): each holds 1 connection idle, [database] pool_size at most.
max_client_conn = 4000
; Server connections per database and role; the server's max_connections is 100.
default_pool_size = 20
reserve_pool_size = 5
max_db_connections = 40
server_idle_timeout = 60
; pg8000 sends no other startup parameter than these.
ignore_startup_parameters = extra_float_digits
INI
)
    if [ ! -f "$PGBOUNCER_INI" ] || [ "$(cat "$PGBOUNCER_INI")" != "$wanted" ]; then
        echo "setup-host: writing $PGBOUNCER_INI"
        printf '%s\n' "$wanted" | $SUDO tee "$PGBOUNCER_INI" >/dev/null
        $SUDO chown postgres:postgres "$PGBOUNCER_INI"
        if port_open 127.0.0.1 6432; then  # a changed config: restart with it
            pid=$(cat /var/run/postgresql/pgbouncer-compute-agent-test.pid 2>/dev/null || true)
            if [ -n "$pid" ]; then
                $SUDO kill "$pid" || true
                for ((i = 0; i < 100; i++)); do port_open 127.0.0.1 6432 || break; sleep 0.1; done
            fi
        fi
    fi
    if ! port_open 127.0.0.1 6432; then
        echo "setup-host: starting PgBouncer"
        $SUDO mkdir -p /var/run/postgresql
        $SUDO chown postgres:postgres /var/run/postgresql
        # As postgres (PgBouncer refuses root), with file descriptors for its clients.
        $SUDO sh -c "ulimit -n 8192; exec /usr/sbin/pgbouncer -d -u postgres $PGBOUNCER_INI"
        wait_port 127.0.0.1 6432 30
    fi
fi
