#!/usr/bin/python3
"""close-race.py ALPND [N] - how often a relayed exchange shaped like an
acme-tls/1 validation ends in "reset" rather than "ok" (see
relay-copy-first.diff).

Through ALPND per connection (systemd-socket-activate --accept, LISTEN_FDS,
as test_multihost's edge e3v6), N times: the client sends 300 bytes (the
ClientHello), reads the 1382 the backend answers (the server's flight),
sends 45 + 24 bytes (Finished, close_notify) and closes without reading
on, as pebble's validator does.  The backend, like alpnd-respond, answers
the client's 45 bytes with 24 (its close_notify) at once, half-closes and
reads until EOF (0.5 s at most).  When the backend's 24 bytes reach the
client before its close(2), the kernel resets the connection instead of
sending a FIN, and alpnd logs "reset".  Prints the count of each result.
"""
import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time


def recvn(s, k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            break
        b += c
    return b


def serve(c):
    try:
        c.settimeout(5)
        hdr = recvn(c, 16)                      # PROXY v2: 16 + length
        recvn(c, int.from_bytes(hdr[14:16], "big"))
        recvn(c, 300)
        c.sendall(b"S" * 1382)
        recvn(c, 45)
        c.sendall(b"C" * 24)
        c.shutdown(socket.SHUT_WR)
        c.settimeout(0.5)
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()


def main():
    alpnd = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    be = socket.socket()
    be.bind(("127.0.0.1", 0))
    be.listen(64)

    def backend():
        while True:
            c, _ = be.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=backend, daemon=True).start()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    logpath = "/tmp/close-race.%d.log" % os.getpid()
    log = open(logpath, "w")
    p = subprocess.Popen(["systemd-socket-activate", "-l", "127.0.0.1:%d" % port,
                          "--accept", alpnd, "--fallback",
                          "127.0.0.1:%d" % be.getsockname()[1], "--send-proxy", "v2",
                          "--acme", "127.0.0.1:9"], stderr=log)
    try:
        for _ in range(100):                    # listening (5 s at most)
            if "Listening on" in open(logpath).read():
                break
            time.sleep(0.05)
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"H" * 300)
            recvn(s, 1382)
            s.sendall(b"F" * 45)
            s.sendall(b"A" * 24)
            s.close()
            time.sleep(0.01)
        end = time.time() + 10                  # every line written
        while time.time() < end and \
                len(re.findall(r"^alpnd\[", open(logpath).read(), re.M)) < n:
            time.sleep(0.05)
    finally:
        p.terminate()
        p.wait(10)
        log.close()
    text = open(logpath).read()
    os.unlink(logpath)
    print(alpnd, dict(collections.Counter(
        re.findall(r"^alpnd\[\d+\]: .* (\S+)$", text, re.M))))


if __name__ == "__main__":
    main()
