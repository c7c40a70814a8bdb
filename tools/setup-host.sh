#!/usr/bin/env bash
# Idempotent host set-up for building and testing compute-agent on Debian 12:
# the apt packages pip needs to build libvirt-python, and the local services the
# functional tests talk to, started if installed but stopped.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(libvirt-dev pkg-config gcc python3-dev python3-venv)

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
