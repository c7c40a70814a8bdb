"""Garbage, huge lines and silent connections on a running agent's admin socket, then the CLI.

docs/reliability.md, "Issue 13 under attack". Usage, from the repository:
    .venv/bin/python tools/admin-socket-attack.py STATE_PATH CONFIG_FILE AGENT_PID
"""

import os
import socket
import subprocess
import sys
import time

state, config, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = os.path.join(state, "admin.sock")


def conn():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s


def ask(data):
    s = conn()
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            out += c
        return out[:200]
    except OSError as e:
        return repr(e)
    finally:
        s.close()


for data in [
    b"\xff\xfe\x00garbage\n",
    b"{}\n",
    b"[1,2]\n",
    b'{"method": "status", "args": []}\n',
    b'{"method": "x"*9}\n',
    b"\n",
    b'{"method":"show_instance","args":{"name":"\\u0000"}}\n',
]:
    print(data[:40], "->", ask(data))
t = time.monotonic()
print("huge no newline ->", ask(b"a" * (8 << 20)), f"{time.monotonic() - t:.1f}s")
t = time.monotonic()
print(
    "huge line ->",
    ask(b'{"method":"status","args":{"x":"' + b"a" * (4 << 20) + b'"}}\n'),
    f"{time.monotonic() - t:.1f}s",
)
half = []
for i in range(300):
    try:
        half.append(conn())
    except OSError as e:
        print("conn", i, e)
        break
print("half-open", len(half))
cmd = [
    sys.executable,
    "-m",
    "compute_agent.cmd.manage",
    "--config-file",
    "etc/compute-agent.conf",
    "--config-file",
    config,
    "status",
    "-f",
    "json",
    "--timeout",
    "20",
]
t = time.monotonic()
r = subprocess.run(cmd, capture_output=True, text=True)
print("cli rc", r.returncode, r.stderr.strip()[:200], f"{time.monotonic() - t:.1f}s")
for s in half:
    s.close()
time.sleep(2)
print("agent fds", len(os.listdir(f"/proc/{pid}/fd")))
