"""Load with integrity: 500 concurrent connections through the router
(200 with the sanitizer build).

alpnd runs under systemd-socket-activate --accept (one process per
connection, LISTEN_FDS), --certs with a challenge certificate made by
`alpnd-respond --make`.  All 500 TCP connections are opened first and the
test waits until 500 alpnd processes exist at the same time; then every
client speaks at once:

  - 350 relays to the fallback (ClientHellos with h2, without ALPN, and
    plain non-TLS bytes), each moving its own amount of data both ways at
    the same time (0 B .. 1 MiB); SHA-256 of everything sent is compared
    with what arrived, in both directions;
  - 150 ACME TLS-ALPN-01 handshakes (Python ssl, ALPN acme-tls/1): each
    must agree on acme-tls/1 and get the challenge certificate with the
    critical acmeIdentifier carrying SHA-256(key authorization).

Then: every byte arrived, every handshake succeeded, one log line per
connection with the right route and result, and no process outlives its
connection (none carrying the test's marker is left but the activator).
"""
import asyncio
import hashlib
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostile_lib as H  # noqa: E402
from conftest import relayed_sums  # noqa: E402
from hostile_harness import (ROOT, MARK_VAR, SANITIZER_RE, fd_table, free_port,  # noqa: E402
                             marked_pids)

# 500 at once with the normal build; the sanitizer build starts each process
# in about 0.1 s of its own (shadow memory), so 650 of them on 2 cores took
# over 30 s to answer the last handshake: it runs 200, which is still every
# kind of connection many times over, at the same time.
COUNTS = {"normal": (350, 150), "asan": (140, 60)}
SIZES = [0, 1, 1500, 65536, 262144, 1 << 20]
AUTH = "load-token.abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
NAME = "load.test"
PLAIN = b"PLAIN LOAD TEST\n"           # 16 bytes of non-TLS prefix
HDR = struct.Struct("!IIII")           # id, up_len, down_off, down_len
BLOCK = os.urandom(2 << 20)



def sha(b):
    return hashlib.sha256(b).hexdigest()


class FallbackServer:
    """Reads the first bytes (a TLS record or the plain prefix), the
    header, then the upload while sending the download; records what
    arrived, by connection id."""

    def __init__(self):
        self.got = {}           # id -> (sha of everything received, length)
        self.errors = []

    async def handle(self, reader, writer):
        h = hashlib.sha256()
        n = 0
        try:
            first = await reader.readexactly(5)
            if first[0] == 0x16:
                rest = await reader.readexactly(struct.unpack("!H", first[3:5])[0])
            else:
                rest = await reader.readexactly(len(PLAIN) - 5)
            hdr = await reader.readexactly(HDR.size)
            cid, up_len, down_off, down_len = HDR.unpack(hdr)
            for b in (first, rest, hdr):
                h.update(b)
                n += len(b)

            async def send():
                mv = memoryview(BLOCK)[down_off:down_off + down_len]
                for i in range(0, down_len, 65536):
                    writer.write(mv[i:i + 65536])
                    await writer.drain()
                writer.write_eof()
            st = asyncio.ensure_future(send())
            while True:
                b = await reader.read(262144)
                if not b:
                    break
                h.update(b)
                n += len(b)
            await st
            self.got[cid] = (h.hexdigest(), n)
        except Exception as e:     # recorded, the client side will fail too
            self.errors.append(repr(e))
        finally:
            writer.close()


def check_acme_cert(der):
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    want = b"\x04\x20" + hashlib.sha256(AUTH.encode()).digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.critical and ext.value.value == want and \
        san.value.get_values_for_type(x509.DNSName) == [NAME]


async def relay_client(cid, kind, rd, wr, rng):
    up_len, down_len = rng.choice(SIZES), rng.choice(SIZES)
    up_off = rng.randrange(0, len(BLOCK) - up_len + 1)
    down_off = rng.randrange(0, len(BLOCK) - down_len + 1)
    if kind == "h2":
        first = H.hello_wire(sni=b"load.test", alpn=[b"h2", b"http/1.1"])
    elif kind == "noalpn":
        first = H.hello_wire(sni=b"load.test", alpn=None)
    else:
        first = PLAIN
    head = first + HDR.pack(cid, up_len, down_off, down_len)
    up = memoryview(BLOCK)[up_off:up_off + up_len]
    sent = hashlib.sha256(head)
    sent.update(up)

    async def send():
        wr.write(head)
        for i in range(0, up_len, 65536):
            wr.write(up[i:i + 65536])
            await wr.drain()
        await wr.drain()
        wr.write_eof()
    st = asyncio.ensure_future(send())
    h = hashlib.sha256()
    n = 0
    while True:
        b = await rd.read(262144)
        if not b:
            break
        h.update(b)
        n += len(b)
    await st
    wr.close()
    return {"id": cid, "kind": kind, "up_sha": sent.hexdigest(), "up_len": len(head) + up_len,
            "down_ok": h.hexdigest() == sha(BLOCK[down_off:down_off + down_len]) and n == down_len,
            "down_len": n, "down_want": down_len}


async def acme_client(cid, rd, wr):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["acme-tls/1"])
    res = {"id": cid, "kind": "acme", "ok": False}
    try:
        await wr.start_tls(ctx, server_hostname=NAME, ssl_handshake_timeout=60)
        so = wr.get_extra_info("ssl_object")
        res["alpn"] = so.selected_alpn_protocol()
        der = so.getpeercert(binary_form=True)
        res["ok"] = res["alpn"] == "acme-tls/1" and check_acme_cert(der)
        try:                            # the responder closes at once
            await asyncio.wait_for(rd.read(), 10)
        except (ssl.SSLError, OSError, asyncio.TimeoutError):
            pass
    except Exception as e:
        res["error"] = repr(e)
    finally:
        wr.close()
    return res


def children(mark, parent):
    return [p for p in marked_pids(mark) if p != parent]


def sockets_of(pid):
    t = fd_table(pid) or {}
    return [fd for fd, v in t.items() if v.startswith("socket:")]


async def main(port, mark, parent, report, mode, n_relay, n_acme):
    srv = FallbackServer()
    server = await asyncio.start_server(srv.handle, "127.0.0.1", report["fb_port"],
                                        backlog=1024)
    rng = random.Random(8737)
    kinds = ["acme"] * n_acme + ["h2", "noalpn", "plain"] * (n_relay // 3) + \
        ["h2"] * (n_relay - 3 * (n_relay // 3))
    rng.shuffle(kinds)
    # Phase 1: 500 connections, 500 processes, at the same time.
    t0 = time.monotonic()
    conns = []
    for i in range(0, len(kinds), 50):
        conns += await asyncio.gather(*[asyncio.open_connection("127.0.0.1", port)
                                        for _ in kinds[i:i + 50]])
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if mode == "accept":        # one process per connection
            n = len(children(mark, parent))
        else:                       # one process holds them all (+ listener)
            n = len(sockets_of(parent)) - 1
        report["peak"] = max(report.get("peak", 0), n)
        if n >= len(kinds):
            break
        await asyncio.sleep(0.1)
    report["phase1"] = time.monotonic() - t0
    # Phase 2: everybody talks at once.
    t1 = time.monotonic()
    jobs = []
    for cid, (kind, (rd, wr)) in enumerate(zip(kinds, conns)):
        if kind == "acme":
            jobs.append(acme_client(cid, rd, wr))
        else:
            jobs.append(relay_client(cid, kind, rd, wr, random.Random(cid)))
    results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 120)
    report["phase2"] = time.monotonic() - t1
    if mode == "listen":
        # every connection is done: soon only the listener is left (alpnd
        # exits 2 s after that; an empty table means it already has)
        end = time.monotonic() + 1.5
        while True:
            t = fd_table(parent) or {}
            if len(sockets_of(parent)) <= 1 or time.monotonic() > end:
                break
            await asyncio.sleep(0.02)
        report["idle_fds"] = t
    server.close()
    await server.wait_closed()
    report["results"] = results
    report["backend"] = srv
    report["bytes"] = sum(r.get("up_len", 0) + r.get("down_len", 0)
                          for r in results if isinstance(r, dict))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("build", ["normal", "asan"])
@pytest.mark.parametrize("mode", ["accept", "listen"])
def test_load_500_concurrent(tmp_path, mode, build):
    """mode accept: systemd-socket-activate --accept, one alpnd per
    connection (LISTEN_FDS=1, fd 3).  mode listen: no --accept, one alpnd in
    listening-socket mode (-x 2) serving them all and forking a responder
    per ACME handshake; it must then exit by itself, holding nothing."""
    bindir = ROOT / "build/asan" if build == "asan" else ROOT
    n_relay, n_acme = COUNTS[build]
    alpnd, respond = bindir / "alpnd", bindir / "alpnd-respond"
    assert os.access(alpnd, os.X_OK) and os.access(respond, os.X_OK), "make all first"
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run([str(ROOT / "alpnd-respond"), "--certs", str(certs), "--make", NAME, AUTH],
                   check=True, timeout=20, capture_output=True)
    port, fb_port = free_port(), free_port()
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK_VAR: mark,
                              "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"})
    for k in ("LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM"):
        env.pop(k, None)
    log = tmp_path / "activate.log"
    with open(log, "wb") as lf:
        sa = subprocess.Popen(
            ["systemd-socket-activate"] + (["--accept"] if mode == "accept" else []) +
            ["-l", "127.0.0.1:%d" % port,
             "-E", "%s=%s" % (MARK_VAR, mark), "-E", "ASAN_OPTIONS=" + env["ASAN_OPTIONS"],
             str(alpnd), "--fallback", "127.0.0.1:%d" % fb_port, "--certs", str(certs),
             "--respond", str(respond), "-t", "40"] + (["-x", "2"] if mode == "listen" else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=lf, env=env,
            start_new_session=True)
    report = {"fb_port": fb_port}
    try:
        end = time.monotonic() + 10
        while b"Listening on" not in log.read_bytes():
            assert sa.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.02)
        t0 = time.monotonic()
        asyncio.run(main(port, mark, sa.pid, report, mode, n_relay, n_acme))
        elapsed = time.monotonic() - t0
        if mode == "listen":
            # all connections done: only the listener is left, and the
            # process exits by itself after 2 s idle (nothing leaked)
            try:
                report["rc"] = sa.wait(10)
            except subprocess.TimeoutExpired:
                report["rc"] = "still running 10 s after the load"
        # no process outlives its connection (a deadline, not a delay: under
        # load a sanitizer build's exit and leak check take seconds)
        end = time.monotonic() + 30
        left = children(mark, sa.pid)
        while left and time.monotonic() < end:
            time.sleep(0.05)
            left = children(mark, sa.pid)
    finally:
        try:
            os.killpg(sa.pid, signal.SIGTERM)
            sa.wait(5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(sa.pid, signal.SIGKILL)
        sa.wait()
        for pid in children(mark, sa.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text(errors="replace")
    results = report["results"]
    srv = report["backend"]
    fails = []
    excs = [r for r in results if not isinstance(r, dict)]
    if excs:
        fails.append("%d clients raised: %r" % (len(excs), excs[:3]))
    acme = [r for r in results if isinstance(r, dict) and r["kind"] == "acme"]
    relays = [r for r in results if isinstance(r, dict) and r["kind"] != "acme"]
    bad_acme = [r for r in acme if not r["ok"]]
    if bad_acme:
        fails.append("%d of %d ACME handshakes failed: %r" % (len(bad_acme), len(acme), bad_acme[:3]))
    bad_down = [r for r in relays if not r["down_ok"]]
    if bad_down:
        fails.append("%d downloads differ: %r" % (len(bad_down), bad_down[:3]))
    bad_up = [r for r in relays if srv.got.get(r["id"]) != (r["up_sha"], r["up_len"])]
    if bad_up:
        fails.append("%d uploads differ: %r" % (len(bad_up), bad_up[:3]))
    if srv.errors:
        fails.append("backend errors: %r" % srv.errors[:3])
    if report.get("peak", 0) < n_relay + n_acme:
        fails.append("only %d processes at once, expected %d" % (report.get("peak", 0),
                                                                 n_relay + n_acme))
    if left:
        fails.append("processes outlived their connections: %r" % left)
    if mode == "listen":
        if report.get("rc") != 0:
            fails.append("listening-mode alpnd: exit %r" % report.get("rc"))
        idle = report.get("idle_fds") or {}
        socks = [fd for fd, v in idle.items() if v.startswith("socket:")]
        pipes = [v for v in idle.values() if v.startswith("pipe:")]
        # stdio, the listener, epoll, signalfd, the reserve descriptor
        # (/dev/null, for EMFILE); spare pipes: at most 64 (relay.c keeps
        # a bounded pool), each with both of its ends
        if len(socks) != 1 or len(idle) - len(pipes) > 7 or len(pipes) > 128 or \
                any(pipes.count(v) != 2 for v in pipes):
            fails.append("idle listening-mode alpnd holds %r" % idle)
    relay_ok = len(re.findall(r"^alpnd\[\d+\]: \S+ \S+ \S+ fallback \d+ \d+ \S+ ok$", text, re.M))
    if mode == "listen":
        # clean relays are summed up, not a line each (alpnd.8, Logging)
        sums = relayed_sums(text)
        if relay_ok or any(m["resets"] for m in sums):
            fails.append("listening mode: %d relay lines of their own, %r in the sums"
                         % (relay_ok, sums))
        relay_ok = sum(m["n"] for m in sums)
    acme_ok = len(re.findall(r"^alpnd-respond\[\d+\]: .* ok \"TLS1\.[23]", text, re.M))
    if relay_ok != n_relay or acme_ok != n_acme:
        fails.append("log: %d relays ok (want %d), %d handshakes ok (want %d)" % (
            relay_ok, n_relay, acme_ok, n_acme))
    if SANITIZER_RE.search(text):
        fails.append("sanitizer report in the log")
    print("load %s/%s: %d connections (%d relays, %d ACME), peak %d processes, %.1f MB relayed, "
          "phase 1 %.2fs, phase 2 %.2fs, total %.2fs" % (
              mode, build, len(results), len(relays), len(acme), report.get("peak", 0),
              report["bytes"] / 1e6, report["phase1"], report["phase2"], elapsed))
    other = [ln for ln in text.splitlines()
             if not ln.startswith(("alpnd[", "alpnd-respond[", "Child "))]
    assert not fails, "\n".join(fails) + "\n--- other log lines:\n" + "\n".join(other[:30]) + \
        "\n--- log tail:\n" + text[-2000:]
    assert elapsed < 60, "load test took %.1fs" % elapsed
