#!/usr/bin/env bash
# Idempotent set-up of a real libvirt daemon with the QEMU driver on Debian 12
# without systemd: installs the packages, prepares users, dirs and qemu.conf,
# then starts virtlogd and the monolithic libvirtd and waits until it answers.
#
# Serves qemu:///system and, through the same daemon, the libvirt test driver
# as test+unix:///abs/path/node.xml (the test driver is built into libvirt0,
# so it needs no extra package or connection-driver module). Each connection
# to a node file gets its own private copy of that file's state.
#
# Environment: LIBVIRTD_WAIT (seconds to wait for the daemon, default 30).
# Daemon logs: /var/log/libvirt/libvirtd.log, /var/log/libvirt/virtlogd.log.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

WAIT_SECONDS="${LIBVIRTD_WAIT:-30}"
QEMU_CONF=/etc/libvirt/qemu.conf
LOG_DIR=/var/log/libvirt
LIBVIRTD_SOCK=/run/libvirt/libvirt-sock
VIRTLOGD_SOCK=/run/libvirt/virtlogd-sock
APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils)

say() { echo "setup-libvirtd: $*"; }
die() { echo "setup-libvirtd: ERROR: $*" >&2; exit 1; }

# --- packages -----------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_install() {
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
    }
    # Try with the current package lists first; refresh them only if that fails.
    if ! apt_install >/tmp/setup-libvirtd-apt.log 2>&1; then
        say "apt-get install failed with the current lists, running apt-get update"
        $SUDO apt-get -o DPkg::Lock::Timeout=300 update -q >>/tmp/setup-libvirtd-apt.log 2>&1 || true
        apt_install >>/tmp/setup-libvirtd-apt.log 2>&1 \
            || die "apt-get install ${missing[*]} failed, see /tmp/setup-libvirtd-apt.log"
    fi
else
    say "packages already installed"
fi
for bin in libvirtd virtlogd virsh qemu-system-x86_64; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || die "$bin not found after install"
done

# --- users, groups, directories -----------------------------------------------
for grp in libvirt-qemu kvm; do
    getent group "$grp" >/dev/null || { say "creating group $grp"; $SUDO groupadd --system "$grp"; }
done
if ! id libvirt-qemu >/dev/null 2>&1; then
    say "creating user libvirt-qemu"
    $SUDO useradd --system --gid libvirt-qemu --groups kvm \
        --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi
$SUDO mkdir -p "$LOG_DIR/qemu" /var/lib/libvirt/qemu /var/cache/libvirt/qemu /run/libvirt

# --- qemu.conf: run guests as root (no per-guest ownership juggling) ----------
conf_changed=0
conf_ok() {
    [ -f "$QEMU_CONF" ] \
        && grep -Eq '^[[:space:]]*user[[:space:]]*=[[:space:]]*"root"' "$QEMU_CONF" \
        && grep -Eq '^[[:space:]]*group[[:space:]]*=[[:space:]]*"root"' "$QEMU_CONF" \
        && [ "$(grep -Ec '^[[:space:]]*(user|group)[[:space:]]*=' "$QEMU_CONF")" = 2 ]
}
if ! conf_ok; then
    say "setting user/group = \"root\" in $QEMU_CONF"
    $SUDO mkdir -p "$(dirname "$QEMU_CONF")"
    $SUDO touch "$QEMU_CONF"
    $SUDO sed -i -E '/^[[:space:]]*(user|group)[[:space:]]*=/d; /^# set by tools\/setup-libvirtd.sh$/d' "$QEMU_CONF"
    # keep the appended block on lines of its own
    if [ -s "$QEMU_CONF" ] && [ -n "$(tail -c1 "$QEMU_CONF")" ]; then echo | $SUDO tee -a "$QEMU_CONF" >/dev/null; fi
    printf '# set by tools/setup-libvirtd.sh\nuser = "root"\ngroup = "root"\n' | $SUDO tee -a "$QEMU_CONF" >/dev/null
    conf_changed=1
fi

# --- daemons ------------------------------------------------------------------
answers() { timeout "${1:-10}" virsh -c qemu:///system version >/dev/null 2>&1; }
# A live (non-zombie) system daemon (run by root) with this exact name? A daemon
# killed a moment ago can linger as a zombie until init reaps it, and pgrep
# alone would count it; a user's session daemon of the same name is not ours.
alive() { ps -C "$1" -o uid=,stat= 2>/dev/null | awk '$1 == 0 && $2 !~ /^Z/ { found = 1 } END { exit !found }'; }

# virtlogd collects guest stdout/stderr (qemu.conf stdio_handler = "logd");
# a privileged libvirtd does not spawn it on demand.
if alive virtlogd; then
    say "virtlogd already running"
else
    say "starting virtlogd"
    $SUDO rm -f "$VIRTLOGD_SOCK" "$VIRTLOGD_SOCK-admin"
    $SUDO env LIBVIRT_LOG_OUTPUTS="3:file:$LOG_DIR/virtlogd.log" virtlogd -d \
        || die "virtlogd -d failed, see $LOG_DIR/virtlogd.log"
fi

if [ "$conf_changed" = 1 ] && alive libvirtd; then
    say "qemu.conf changed: restarting libvirtd (running guests are kept)"
    pid="$(cat /run/libvirtd.pid 2>/dev/null || true)"
    if [ -n "$pid" ]; then $SUDO kill -TERM "$pid" 2>/dev/null || true; else $SUDO pkill -TERM -U 0 -x libvirtd || true; fi
    for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
        alive libvirtd || break
        sleep 0.1
    done
    alive libvirtd && die "old libvirtd did not exit within ${WAIT_SECONDS} s"
fi

if answers 3; then
    say "libvirtd already answering on qemu:///system"
else
    started=0
    deadline=$((SECONDS + WAIT_SECONDS))
    until answers "$(( deadline - SECONDS > 1 ? deadline - SECONDS : 1 ))"; do
        if ! alive libvirtd; then
            [ "$started" = 1 ] && die "libvirtd exited during start-up, see $LOG_DIR/libvirtd.log"
            say "starting libvirtd"
            $SUDO env LIBVIRT_LOG_OUTPUTS="3:file:$LOG_DIR/libvirtd.log" libvirtd -d \
                || die "libvirtd -d failed, see $LOG_DIR/libvirtd.log"
            started=1
        elif [ "$started" = 0 ] && [ "${said_waiting:-0}" = 0 ]; then
            say "libvirtd is running but not answering yet, waiting"
            said_waiting=1
        fi
        [ "$SECONDS" -lt "$deadline" ] \
            || die "libvirtd does not answer on qemu:///system after ${WAIT_SECONDS} s, see $LOG_DIR/libvirtd.log"
        sleep 0.2
    done
fi
for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
    [ -S "$VIRTLOGD_SOCK" ] && break
    sleep 0.1
done
[ -S "$VIRTLOGD_SOCK" ] || die "virtlogd socket $VIRTLOGD_SOCK missing after ${WAIT_SECONDS} s"

say "ready: $(virsh -c qemu:///system version 2>/dev/null | grep -i 'running hypervisor' | sed 's/^ *//')"
