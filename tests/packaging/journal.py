"""Catch what a program sends to journald: run as root under `unshare --mount`, it puts a private
/run over the real one, listens on /run/systemd/journal/socket (journald's native protocol), runs the
command with its stderr marked as the journal stream (JOURNAL_STREAM, as systemd sets it), and prints
each entry it received as a JSON object of fields.

    unshare --mount --propagation private python3 journal.py -- COMMAND...
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys


def parse(datagram: bytes) -> dict[str, str]:
    """One entry of journald's native protocol: `KEY=value\\n`, or for values with newlines
    `KEY\\n` + 64-bit little-endian length + value + `\\n`."""
    fields, i = {}, 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key, (size,) = line, struct.unpack_from("<Q", datagram, end + 1)
            value = datagram[end + 9:end + 9 + size]
            i = end + 9 + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


def main() -> int:
    command = sys.argv[sys.argv.index("--") + 1:]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/run/systemd/journal/socket")
    sock.settimeout(10)
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    done = subprocess.run(command, stderr=write_end, stdout=subprocess.PIPE, env=env, timeout=60)
    os.close(write_end)
    entries = []
    sock.settimeout(0.5)
    while True:
        try:
            entries.append(parse(sock.recv(1 << 20)))
        except TimeoutError:
            break
    print(json.dumps({"returncode": done.returncode, "stdout": done.stdout.decode(errors="replace"),
                      "stderr": os.read(read_end, 1 << 16).decode(errors="replace"), "entries": entries}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
