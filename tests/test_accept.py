"""tests/test_accept.py - listening-socket mode's accept path: connections
queued before alpnd starts and bursts while it runs are all served by one
process (accepts come in batches that follow the queue, without a failed
accept4(2) per wake-up), and the listening socket carries TCP_NODELAY
for the accepted ones to inherit.
"""

import shutil
import socket

import pytest

from conftest import client_hello, parse_logs, wait_for
from test_router import _listening, recv_all


def _burst(addr, n, tag):
    """n clients, each a ClientHello and a line; returns the sockets."""
    socks = []
    for k in range(n):
        s = socket.create_connection(addr)
        s.sendall(client_hello("%s%d.test" % (tag, k)) + b"%s%d\n" % (tag.encode(), k))
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
    return socks


def _check(socks, tag):
    for k, s in enumerate(socks):
        got = recv_all(s)
        assert got.endswith(b"%s%d\n" % (tag.encode(), k)), (k, got[-40:])
        s.close()


def test_queued_and_burst_connections_all_served(echo_backend, tmp_path):
    """200 connections wait in the listening socket's queue before alpnd
    starts (as at a socket-activated start), then bursts of 100 and single
    connections: all relayed, by one process, which still exits idle."""
    b = echo_backend("echo")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(512)
    addr = ls.getsockname()
    first = _burst(addr, 200, "q")
    log = tmp_path / "alpnd.log"
    # -v: a line per connection, each one checked; stderr to a file:
    # hundreds of lines would fill a pipe nobody reads yet
    with _listening(["--fallback", b.addr, "--acme", "127.0.0.1:9", "--exit-idle", "1", "-v"],
                    ls=ls, stderr=open(log, "wb")) as (ls, p):
        _check(first, "q")
        for rnd in range(3):
            _check(_burst(addr, 100, "b%d-" % rnd), "b%d-" % rnd)
            for k in range(5):
                _check(_burst(addr, 1, "s%d-%d-" % (rnd, k)), "s%d-%d-" % (rnd, k))
        assert p.wait(15) == 0
        lines = parse_logs(log.read_text())
        assert len(lines) == 200 + 3 * 105
        assert len({x["pid"] for x in lines}) == 1
        assert all(x["route"] == "fallback" and x["result"] == "ok" for x in lines), \
            [x for x in lines if x["result"] != "ok"][:3]


def test_listening_socket_gets_tcp_nodelay(echo_backend, tmp_path):
    """The relay wants TCP_NODELAY and SO_OOBINLINE on every client; set
    on the listening socket (as systemd's NoDelay=yes does for the first),
    accepted sockets inherit them."""
    b = echo_backend("echo")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    assert ls.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert ls.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 0
    with _listening(["--fallback", b.addr, "--acme", "127.0.0.1:9", "--exit-idle", "1", "-v"],
                    ls=ls, stderr=open(tmp_path / "alpnd.log", "wb")) as (ls, p):
        s = _burst(ls.getsockname(), 1, "n")
        _check(s, "n")
        wait_for(lambda: ls.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                 5, "TCP_NODELAY on the listening socket")
        assert ls.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) != 0
        assert p.wait(15) == 0


def test_one_at_a_time_costs_no_failed_accept(echo_backend, tmp_path):
    """Connections that come one at a time are accepted without a failed
    accept4(2) (EAGAIN) each: the batch limit stays at one, and the
    listener, level-triggered, says when more wait."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (tests/deps check)")
    b = echo_backend("echo")
    trace = tmp_path / "trace"
    log = tmp_path / "alpnd.log"
    with _listening(["--fallback", b.addr, "--acme", "127.0.0.1:9", "--exit-idle", "1", "-v"],
                    stderr=open(log, "wb"),
                    prefix=["strace", "-q", "-e", "trace=accept4", "-o", str(trace)]) as (ls, p):
        n = 20
        for k in range(n):
            _check(_burst(ls.getsockname(), 1, "one%d-" % k), "one%d-" % k)
        assert p.wait(15) == 0
        calls = [l for l in trace.read_text().splitlines() if l.startswith("accept4(")]
        failed = [l for l in calls if "EAGAIN" in l]
        assert len(calls) - len(failed) == n, calls
        # the one at the end: a last look at the queue before exiting idle
        assert len(failed) <= 2, calls
        assert len(parse_logs(log.read_text())) == n
