"""Transparency, tested differentially against nginx.

alpnd routes one kind of connection away from the web server: a complete
ClientHello that offers acme-tls/1.  Every other connection - malformed TLS,
a hello over the size cap, a hello cut short by the client's EOF, an odd or
missing SNI, not TLS at all - is relayed to the fallback byte-exact, so its
client gets exactly the answer the web server would have given.

Here every hello of tests/hello_corpus.py (over 1,000, none offering
acme-tls/1) is sent three times: straight to nginx, through a per-connection
alpnd (inetd style: one process per connection, the connection on fd 0), and
through one listening-socket-mode alpnd.  The client sends the hello, half-
closes, and reads with a deadline.  The outcome is the first record the
server sends (its type; the handshake type or the alert description), or
the connection closed without a byte (EOF or reset: which of the two depends
on how far the server had read when it closed, a race in both paths), or the
deadline.  It must be the same through alpnd as direct, for every hello.

The responder is a script that records any run: for these hellos it must
never run (checked, with one acme-tls/1 hello at the end as the control
that proves the check can fail).

  /usr/bin/python3 -m pytest -c tests/pytest.ini tests/test_transparent.py
"""
import collections
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ALPND, ROOT, parse_logs, wait_for
import hello_corpus

WORKERS = 12            # client connections in flight at once
READ_TIMEOUT = 8.0      # per connection, connect to outcome
HELLO_TIMEOUT = 5       # alpnd --hello-timeout: below READ_TIMEOUT, so a
                        # hello alpnd wrongly waits on shows as a difference
REPORT = os.path.join(ROOT, "build", "transparent-diff.txt")

HS = {1: "client_hello", 2: "server_hello", 4: "new_session_ticket",
      8: "encrypted_extensions", 11: "certificate", 12: "server_key_exchange",
      13: "certificate_request", 14: "server_hello_done"}
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac",
          22: "record_overflow", 40: "handshake_failure", 47: "illegal_parameter",
          50: "decode_error", 51: "decrypt_error", 70: "protocol_version",
          71: "insufficient_security", 80: "internal_error",
          86: "inappropriate_fallback", 109: "missing_extension",
          110: "unsupported_extension", 112: "unrecognized_name",
          120: "no_application_protocol"}


def _wanted(buf):
    """Bytes needed to name the outcome: a record header plus the first
    byte of a handshake message or both bytes of an alert."""
    if not buf:
        return 1
    if buf[0] == 22:
        return 6
    if buf[0] == 21:
        return 7
    if buf[0] in (20, 23, 24):
        return 5
    return 16


def _classify(buf, end):
    if not buf:
        return end
    if buf[0] == 22 and len(buf) >= 6:
        return "handshake " + HS.get(buf[5], str(buf[5]))
    if buf[0] == 21 and len(buf) >= 7:
        return "alert %s%s" % ("" if buf[5] == 2 else "level%d " % buf[5],
                               ALERTS.get(buf[6], str(buf[6])))
    if buf[0] in (20, 23, 24) and len(buf) >= 5:
        return "record %d" % buf[0]
    return "bytes %s%s" % (buf[:16].hex(), "" if end is None else " then " + end)


def source(idx):
    """A loopback address of the hello's own, so that alpnd's log line for
    it is found by its client address (ports are reused: a connection
    that ends in a reset leaves no TIME_WAIT behind)."""
    return "127.%d.%d.%d" % (10 + idx // 64516, 1 + idx // 254 % 254, 1 + idx % 254)


def outcome(port, data, src="127.0.0.1"):
    """Connect from src, send data, half-close, read until the outcome is
    known."""
    end = time.monotonic() + READ_TIMEOUT
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(READ_TIMEOUT)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # the server closed early: read what it said
        buf = b""
        while len(buf) < _wanted(buf):
            left = end - time.monotonic()
            if left <= 0:
                return _classify(buf, "timeout")
            s.settimeout(left)
            try:
                b = s.recv(4096)
            except socket.timeout:
                return _classify(buf, "timeout")
            except ConnectionResetError:
                return _classify(buf, "reset")
            if not b:
                return _classify(buf, "eof")
            buf += b
        return _classify(buf, None)
    finally:
        s.close()


def same(a, b):
    """Outcomes compared with EOF and reset as one: closed, not a byte."""
    def norm(x):
        return x.replace("reset", "eof")
    return norm(a) == norm(b)


@pytest.fixture
def responder(tmp_path):
    """A --respond that records each run: it must never run here."""
    mark = tmp_path / "responder-ran"
    script = tmp_path / "respond-recorder"
    script.write_text("#!/bin/sh\necho \"$$ $*\" >> %s\nexit 1\n" % mark)
    script.chmod(0o755)
    certs = tmp_path / "certs-empty"
    certs.mkdir()

    class R:
        path = str(script)
        dir = str(certs)
        marker = mark
    return R()


def test_corpus_is_large_deterministic_and_acme_free():
    a, b = hello_corpus.corpus(), hello_corpus.corpus()
    assert len(a) >= 1000, len(a)
    assert [x.data for x in a] == [x.data for x in b], "corpus is not deterministic"
    assert len({x.how for x in a}) == len(a), "descriptions are not unique"
    groups = collections.Counter(hello_corpus.group(x) for x in a)
    for g in ("capture", "sni", "size", "split", "trunc", "mutant", "other"):
        assert groups[g] > 0, (g, groups)
    for x in a:
        assert hello_corpus.ACME not in x.data, x.how


def test_every_hello_gets_the_web_servers_answer(nginx, inetd, procs, responder):
    corpus = hello_corpus.corpus()
    n = nginx()
    args = ["--fallback", n.addr, "--certs", responder.dir,
            "--respond", responder.path, "--hello-timeout", str(HELLO_TIMEOUT)]
    per_conn = inetd(args)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(512)
    listen_log = procs.log("alpnd-listen")
    with open(listen_log, "w") as err:
        # -v: a line for each relay (listening mode sums them up otherwise)
        listener = procs.start([ALPND] + args + ["-v"], stdin=ls,
                               stdout=subprocess.DEVNULL, stderr=err)
    listen_port = ls.getsockname()[1]
    ls.close()

    targets = [("direct", n.port), ("per-connection", per_conn.port),
               ("listening", listen_port)]
    t0 = time.monotonic()
    jobs = [(it.idx, name, port, it.data) for it in corpus for name, port in targets]

    with ThreadPoolExecutor(WORKERS) as pool:
        got = list(pool.map(lambda j: (j[0], j[1], outcome(j[2], j[3], source(j[0]))),
                            jobs))
    elapsed = time.monotonic() - t0
    res = collections.defaultdict(dict)
    for idx, name, out in got:
        res[idx][name] = out

    # Every per-connection alpnd exited by itself; the listener is alive.
    per_conn.wait_results(len(corpus), timeout=120)   # 5 s when quiet
    assert listener.poll() is None, "listening-mode alpnd died: see %s" % listen_log
    rcs = collections.Counter(r.rc for r in per_conn.results)
    # Each connection's log line: which route alpnd took (by client address).
    def addr(x):
        return x["client"].rsplit(":", 1)[0]
    lines = {("per-connection", addr(x)): x for r in per_conn.results
             for x in parse_logs(r.stderr)}

    def listen_lines():
        with open(listen_log, errors="replace") as f:
            return parse_logs(f.read())
    wait_for(lambda: len(listen_lines()) >= len(corpus), 15,
             "%d log lines from the listening-mode alpnd" % len(corpus))
    lines.update({("listening", addr(x)): x for x in listen_lines()})
    for it in corpus:
        for m, _ in targets[1:]:
            x = lines.get((m, source(it.idx)))
            res[it.idx][m + " log"] = ("%s %s %s" % (x["route"], x["up"], x["result"])
                                       if x else "no log line")
    not_relayed = [(it, m) for it in corpus for m, _ in targets[1:]
                   if not res[it.idx][m + " log"].startswith("fallback ")]

    diffs = []
    for it in corpus:
        r = res[it.idx]
        bad = [m for m, _ in targets[1:] if not same(r["direct"], r[m])]
        if bad:
            diffs.append((it, r, bad))
    direct_timeouts = [it.how for it in corpus if "timeout" in res[it.idx]["direct"]]
    ran = responder.marker.read_text() if responder.marker.exists() else ""

    # The control: an acme-tls/1 hello does reach the responder.
    with open(os.path.join(hello_corpus.HELLOS, "go-acme.bin"), "rb") as f:
        acme = f.read()
    for _, port in targets[1:]:
        outcome(port, acme)
    wait_for(lambda: responder.marker.exists() and
             len(responder.marker.read_text().splitlines()) >= len(ran.splitlines()) + 2,
             10, "the responder to run for the two acme-tls/1 control hellos")

    summary = _report(corpus, res, diffs, targets, rcs, elapsed, not_relayed)
    assert not direct_timeouts, "nginx itself did not answer: %r" % direct_timeouts[:10]
    assert not ran, "the responder ran for a hello without acme-tls/1:\n" + ran
    if diffs:
        pytest.fail(summary, pytrace=False)
    # Same answer is not enough where nginx and a drop both just close:
    # alpnd's own log line must say it relayed the hello to the fallback.
    if not_relayed:
        pytest.fail("%d connections not relayed to the fallback, e.g.\n%s" % (
            len(not_relayed), "\n".join("%5d %-50s %-14s %s" % (
                it.idx, it.how, m, res[it.idx][m + " log"]) for it, m in not_relayed[:30])),
            pytrace=False)


def _report(corpus, res, diffs, targets, rcs, elapsed, not_relayed):
    """A compact table of the differing hellos; the whole table (every
    hello) goes to build/transparent-diff.txt for a closer look."""
    by_group = collections.Counter(hello_corpus.group(it) for it, _, _ in diffs)
    by_mode = collections.Counter(m for _, _, bad in diffs for m in bad)
    sizes = collections.Counter(hello_corpus.group(it) for it in corpus)
    nr = collections.Counter(m for _, m in not_relayed)
    head = ("%d of %d hellos differ (per-connection %d, listening %d) in %.1fs; "
            "by group: %s (corpus: %s); not relayed to the fallback: per-connection %d, "
            "listening %d; per-connection exit codes: %s"
            % (len(diffs), len(corpus), by_mode["per-connection"], by_mode["listening"],
               elapsed, dict(by_group), dict(sizes), nr["per-connection"], nr["listening"],
               dict(rcs)))
    fmt = "%5s  %-52.52s  %-28s  %-28s  %-28s  %s"
    rows = [fmt % ("idx", "how", "direct", "per-connection", "listening",
                   "alpnd log (per-connection): route up result")]
    for it, r, _ in diffs:
        rows.append(fmt % (it.idx, it.how, r["direct"], r["per-connection"], r["listening"],
                           r["per-connection log"]))
    try:
        os.makedirs(os.path.dirname(REPORT), exist_ok=True)
        with open(REPORT, "w") as f:
            f.write(head + "\n\n")
            f.write("\n".join(rows) + "\n\nAll outcomes:\n")
            for it in corpus:
                r = res[it.idx]
                f.write(fmt % (it.idx, it.how, r["direct"], r["per-connection"],
                               r["listening"], r["per-connection log"]) + "\n")
    except OSError:
        pass
    shown = rows[:1 + 60]
    more = len(rows) - len(shown)
    return "\n".join([head] + shown + (["... %d more in %s" % (more, REPORT)] if more else []))
