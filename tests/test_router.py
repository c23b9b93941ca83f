"""alpnd, the router: launch modes, routing, relay exactness, PROXY protocol,
slow and broken peers, listening-socket mode.  Real processes throughout:
systemd-socket-activate, tcpserver, xinetd, nginx, curl, openssl, gnutls-cli.
"""
import contextlib
import json
import re
import shutil
import signal
import os
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import (ALPND, PY, ROOT, client_hello, free_port, parse_logs,
                      relayed_sums, sha256, wait_for, wait_log, wait_port)

HELLOS = os.path.join(ROOT, "tests", "hellos")
V2SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def recv_all(s, timeout=15):
    s.settimeout(timeout)
    out = bytearray()
    while True:
        b = s.recv(1 << 20)
        if not b:
            return bytes(out)
        out += b


def exchange(port, data, host="127.0.0.1", family=socket.AF_INET,
             source=None, timeout=15):
    """Connect, send data, half-close, read until EOF."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s, timeout)
    finally:
        s.close()


def curl(url, port, *extra):
    r = subprocess.run(["curl", "-sS", "-k", "--max-time", "10",
                        "--resolve", "localhost:%d:127.0.0.1" % port]
                       + list(extra) + [url],
                       capture_output=True, timeout=20)
    return r


@pytest.fixture
def recorder(tmp_path):
    """A stand-in responder: records argv, env and what it finds on the
    connection (which must still start with the ClientHello)."""
    out = tmp_path / "respond.json"
    script = tmp_path / "respond-recorder"
    script.write_text("""#!%s
import json, os, socket, stat, sys
pid = os.getpid()
fd = 3 if (os.environ.get("LISTEN_FDS") == "1"
           and os.environ.get("LISTEN_PID") == str(pid)) else 0
st = os.fstat(fd)
s = socket.socket(fileno=fd)
blocking = s.getblocking()
s.settimeout(5)
head = s.recv(5)
info = {"argv": sys.argv, "pid": pid, "fd": fd,
        "issock": stat.S_ISSOCK(st.st_mode), "blocking": blocking,
        "env": {k: v for k, v in os.environ.items()
                if k.startswith("LISTEN_") or k == "ALPND_CLIENT"},
        "head": head.hex()}
with open(%r + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(%r + ".tmp", %r)
s.sendall(b"RESPONDER\\n")
s.shutdown(socket.SHUT_WR)
""" % (PY, str(out), str(out), str(out)))
    script.chmod(0o755)
    certs = tmp_path / "certs"
    certs.mkdir()

    class R:
        path = str(script)
        dir = str(certs)

        def info(self, timeout=10):
            wait_for(lambda: out.exists(), timeout, "the responder to run")
            return json.loads(out.read_text())
    return R()


# --- launch modes ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["inetd", "fds"])
def test_socket_activate_curl_h1_h2(activate, nginx, recorder, mode):
    n = nginx()
    a = activate(["--fallback", n.addr, "--certs", recorder.dir,
                  "--respond", recorder.path], mode=mode)
    r = curl("https://localhost:%d/" % a.port, a.port, "--http1.1")
    assert r.stdout == b"hello from nginx\n", r.stderr
    r = curl("https://localhost:%d/" % a.port, a.port, "--http2")
    assert r.stdout == b"hello from nginx\n", r.stderr
    lines = a.wait_lines(2)
    assert [x["route"] for x in lines] == ["fallback", "fallback"]
    assert lines[0]["sni"] == "localhost" and lines[0]["alpn"] == "http/1.1"
    assert lines[1]["alpn"] == "h2,http/1.1"
    assert all(x["result"] == "ok" for x in lines)
    assert all(x["client"].startswith("127.0.0.1:") for x in lines)
    assert int(lines[0]["up"]) > 200 and int(lines[0]["down"]) > 200
    log = wait_log(n.access_log, r"HTTP/2.0 200").string
    assert "HTTP/1.1 200" in log


def test_tcpserver(procs, nginx, tmp_path):
    n = nginx()
    port = free_port()
    log = procs.log("tcpserver")
    procs.start(["tcpserver", "-q", "-H", "-R", "127.0.0.1", port, ALPND,
                 "--fallback", n.addr, "--acme", "127.0.0.1:9"],
                stderr=open(log, "w"))
    wait_port(port)
    r = curl("https://localhost:%d/big" % port, port, "--http2", "-o",
             str(tmp_path / "big"))
    assert r.returncode == 0, r.stderr
    with open(os.path.join(n.dir, "big"), "rb") as f:
        assert (tmp_path / "big").read_bytes() == f.read()
    m = wait_log(log, r"alpnd\[\d+\]: .* localhost h2,http/1.1 fallback "
                 r"\d+ (\d+) [0-9.]+s ok")
    assert int(m.group(1)) > 1 << 20


def test_xinetd_stderr_is_the_socket(procs, echo_backend, tmp_path):
    """xinetd hands over fd 0, 1 and 2 as the socket: the log line must not
    end up in the client's byte stream (alpnd switches to syslog)."""
    b = echo_backend("echo")
    port = free_port()
    conf = tmp_path / "xinetd.conf"
    conf.write_text("""service alpnd-test
{
	type		= UNLISTED
	socket_type	= stream
	protocol	= tcp
	wait		= no
	user		= root
	bind		= 127.0.0.1
	port		= %d
	server		= %s
	server_args	= --fallback %s --acme 127.0.0.1:9
	instances	= 50
}
""" % (port, ALPND, b.addr))
    log = procs.log("xinetd")
    procs.start(["xinetd", "-dontfork", "-f", str(conf), "-pidfile",
                 str(tmp_path / "xinetd.pid"), "-filelog", log],
                stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_port(port)
    payload = b"GET / HTTP/1.0\r\n\r\n" + os.urandom(3000)
    assert exchange(port, payload) == payload
    b.wait_conns(1)


# --- peers -------------------------------------------------------------------

def test_openssl_and_gnutls_clients(inetd, nginx, recorder):
    n = nginx()
    i = inetd(["--fallback", n.addr, "--certs", recorder.dir, "--respond",
               recorder.path])
    r = subprocess.run(["openssl", "s_client", "-connect",
                        "127.0.0.1:%d" % i.port, "-servername", "localhost",
                        "-alpn", "h2"], input=b"", capture_output=True,
                       timeout=20)
    assert b"ALPN protocol: h2" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["gnutls-cli", "--insecure", "-p", str(i.port),
                        "--alpn", "http/1.1", "localhost"], input=b"",
                       capture_output=True, timeout=20)
    assert b"Handshake was completed" in r.stdout, r.stdout + r.stderr
    res = i.wait_results(2)
    assert [x.rc for x in res] == [0, 0]
    assert all("fallback" in x.stderr for x in res)
    # acme-tls/1 goes to the responder, the ClientHello still unread.
    r = subprocess.run(["openssl", "s_client", "-connect",
                        "127.0.0.1:%d" % i.port, "-servername", "example.org",
                        "-alpn", "acme-tls/1"], input=b"",
                       capture_output=True, timeout=20)
    info = recorder.info()
    assert info["head"].startswith("1603"), info
    assert info["argv"][1:4] == ["--certs", recorder.dir, "--hello-timeout"]
    assert 1 <= int(info["argv"][4]) <= 10
    assert info["fd"] == 0 and info["issock"] and info["blocking"]
    res = i.wait_results(3)
    log = parse_logs(res[2].stderr)
    assert log and log[0]["route"] == "respond"
    assert log[0]["sni"] == "example.org" and log[0]["alpn"] == "acme-tls/1"
    assert int(log[0]["pid"]) == info["pid"], "not the same process"


def test_gnutls_acme_exec_listen_fds(activate, recorder):
    """systemd Accept=yes: the responder finds the connection on fd 3 with
    LISTEN_FDS=1 and LISTEN_PID = its own pid (alpnd execve'd itself away)."""
    a = activate(["--fallback", "127.0.0.1:9", "--certs", recorder.dir,
                  "--respond", recorder.path], mode="fds")
    subprocess.run(["gnutls-cli", "--insecure", "-p", str(a.port),
                    "--alpn", "acme-tls/1", "--sni-hostname", "acme.test",
                    "localhost"], input=b"", capture_output=True, timeout=20)
    info = recorder.info()
    assert info["fd"] == 3 and info["issock"]
    assert info["env"]["LISTEN_FDS"] == "1"
    assert info["env"]["LISTEN_PID"] == str(info["pid"])
    assert info["head"].startswith("1603")
    line = a.wait_lines(1)[0]
    assert line["route"] == "respond" and line["sni"] == "acme.test"


def test_acme_relay(inetd, echo_backend):
    fb = echo_backend("record")
    ac = echo_backend("record", reply=b"ACME-LISTENER")
    i = inetd(["--fallback", fb.addr, "--acme", ac.addr])
    hello = client_hello("acme.example", ["acme-tls/1"])
    assert exchange(i.port, hello) == b"ACME-LISTENER"
    ac.wait_conns(1)
    wait_for(lambda: ac.conns[0].closed, 5, "acme backend close")
    assert bytes(ac.conns[0].data) == hello
    assert fb.conns == []
    res = i.wait_results(1)[0]
    assert res.rc == 0 and " acme " in res.stderr


# --- relay exactness -----------------------------------------------------------

def test_byte_exact_both_ways(inetd, echo_backend):
    reply = os.urandom(3 << 20)
    b = echo_backend("record", reply=reply)
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9"])
    hello = client_hello("exact.test")
    body = os.urandom(2 << 20)
    got = exchange(i.port, hello + body)
    assert sha256(got) == sha256(reply)
    wait_for(lambda: b.conns and b.conns[0].eof, 10, "backend EOF")
    assert sha256(bytes(b.conns[0].data)) == sha256(hello + body)
    res = i.wait_results(1)[0]
    line = parse_logs(res.stderr)[0]
    assert int(line["up"]) == len(hello + body)
    assert int(line["down"]) == len(reply)
    assert line["sni"] == "exact.test" and res.rc == 0


def test_hello_in_one_byte_segments(inetd, echo_backend):
    b = echo_backend("echo")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9", "-v"])
    hello = client_hello("slow.segments.test", ["h2"])
    s = socket.create_connection(("127.0.0.1", i.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for k in range(len(hello)):
        s.send(hello[k:k + 1])
        time.sleep(0.0005)
    s.sendall(b"tail")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello + b"tail"
    s.close()
    res = i.wait_results(1)[0]
    line = parse_logs(res.stderr)[0]
    assert line["sni"] == "slow.segments.test" and line["alpn"] == "h2"
    assert res.rc == 0


@pytest.mark.parametrize("name,acme", [("openssl-3records.bin", True),
                                       ("openssl-multirecord.bin", True),
                                       ("go-acme.bin", True),
                                       ("chromium.bin", False)])
def test_captured_hellos_and_records(inetd, echo_backend, name, acme):
    """Real captured hellos, some over several TLS records, sent in pieces
    that cut across the record boundaries."""
    path = os.path.join(HELLOS, name)
    if not os.path.exists(path):
        pytest.fail("missing capture %s" % path)
    data = open(path, "rb").read()
    fb = echo_backend("echo")
    ac = echo_backend("echo")
    i = inetd(["--fallback", fb.addr, "--acme", ac.addr])
    s = socket.create_connection(("127.0.0.1", i.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for k in range(0, len(data), 100):
        s.send(data[k:k + 100])
        time.sleep(0.002)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == data
    s.close()
    want = ac if acme else fb
    assert len(want.conns) == 1
    assert len((fb if acme else ac).conns) == 0
    assert i.wait_results(1)[0].rc == 0


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00"
                                  b"\x10" + bytes(37),
                                  b"x"])
def test_not_tls_goes_to_fallback_intact(inetd, echo_backend, data):
    b = echo_backend("echo")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9"])
    assert exchange(i.port, data) == data
    res = i.wait_results(1)[0]
    assert res.rc == 0 and " fallback " in res.stderr


def test_half_close_client_first(inetd, echo_backend):
    """Client: send, SHUT_WR; the backend sees EOF only after all bytes,
    and can still answer afterwards."""
    b = echo_backend("record", reply=b"")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9"])
    hello = client_hello()
    s = socket.create_connection(("127.0.0.1", i.port))
    s.sendall(hello + b"request")
    s.shutdown(socket.SHUT_WR)
    b.wait_conns(1)
    wait_for(lambda: b.conns[0].eof, 10, "EOF at the backend")
    assert bytes(b.conns[0].data) == hello + b"request"
    assert recv_all(s) == b""
    s.close()
    assert i.wait_results(1)[0].rc == 0


@pytest.mark.parametrize("mode", ["inetd", "listen"])
def test_backend_speaks_first_while_the_client_waits(activate, echo_backend, mode):
    """A backend that writes as soon as it is connected, to a client that
    sent its hello and now waits without an EOF: the relay's first step
    does not read the new backend socket, so only epoll can say it has
    data (the socket was just added).  Ten connections in a row."""
    b = echo_backend("record", reply=b"banner")
    a = activate(["--fallback", b.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30"], mode=mode)
    sent = []
    for k in range(10):
        s = socket.create_connection(("127.0.0.1", a.port))
        sent.append(client_hello("first%d.test" % k) + b"bye")
        s.sendall(sent[-1][:-3])
        s.settimeout(5)
        got = b""
        while len(got) < 6:
            d = s.recv(6 - len(got))
            assert d, "EOF before the backend's banner"
            got += d
        assert got == b"banner"
        s.sendall(b"bye")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
        s.close()
    b.wait_conns(10)
    wait_for(lambda: all(c.eof for c in b.conns), 10, "EOF at the backend")
    assert sorted(bytes(c.data) for c in b.conns) == sorted(sent)


def test_half_close_backend_first(inetd, echo_backend):
    """Backend: answers and SHUT_WRs at once; the client gets EOF yet can
    keep sending, and all of it reaches the backend."""
    b = echo_backend("early", reply=b"banner")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9"])
    hello = client_hello()
    s = socket.create_connection(("127.0.0.1", i.port))
    s.sendall(hello)
    assert recv_all(s) == b"banner"      # EOF came through
    more = os.urandom(200000)
    s.sendall(more)
    s.shutdown(socket.SHUT_WR)
    b.wait_conns(1)
    wait_for(lambda: b.conns[0].eof, 10, "EOF at the backend")
    assert bytes(b.conns[0].data) == hello + more
    s.close()
    assert i.wait_results(1)[0].rc == 0


def test_one_gib_both_ways(activate, procs, tmp_path):
    """1 GiB each way at the same time, through a C-speed echo (socat-free:
    a second alpnd is not used; the echo is Python with os.splice)."""
    echo = tmp_path / "echo.py"
    echo.write_text("""
import os, socket, sys
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
r, w = os.pipe()
fd = c.fileno()
while True:
    n = os.splice(fd, w, 1 << 20)
    if n == 0:
        break
    while n:
        n -= os.splice(r, fd, n)
c.shutdown(socket.SHUT_WR)
""")
    p = procs.start([PY, str(echo)], stdout=subprocess.PIPE)
    port = int(p.stdout.readline())
    a = activate(["--fallback", "127.0.0.1:%d" % port, "--acme",
                  "127.0.0.1:9"])
    total = 1 << 30
    block = os.urandom(16 << 20)
    hello = client_hello("gib.test")
    s = socket.create_connection(("127.0.0.1", a.port))
    sent_hash = []

    def sender():
        import hashlib
        h = hashlib.sha256()
        s.sendall(hello)
        h.update(hello)
        left, k = total, 0
        while left:
            off = (k * 1048573) % (len(block) - (1 << 20))
            chunk = block[off:off + min(1 << 20, left)]
            s.sendall(chunk)
            h.update(chunk)
            left -= len(chunk)
            k += 1
        s.shutdown(socket.SHUT_WR)
        sent_hash.append(h.hexdigest())

    t = threading.Thread(target=sender)
    t.start()
    import hashlib
    h = hashlib.sha256()
    n = 0
    s.settimeout(60)
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    t.join(60)
    s.close()
    assert n == total + len(hello)
    assert h.hexdigest() == sent_hash[0]
    line = a.wait_lines(1)[0]
    assert int(line["up"]) == n and int(line["down"]) == n
    assert line["result"] == "ok"


@pytest.mark.parametrize("mode", ["inetd", "listen"])
def test_200_concurrent_relays(activate, echo_backend, mode):
    """200 relays open at once: 200 processes, or one listening-mode
    process holding 1200 descriptors (more than a default soft limit)."""
    b = echo_backend("echo")
    a = activate(["--fallback", b.addr, "--acme", "127.0.0.1:9", "-q",
                  "--exit-idle", "30"], mode=mode,
                 prefix=["prlimit", "--nofile=1024:8192", "--"])
    socks = []
    payloads = []
    for k in range(200):
        s = socket.create_connection(("127.0.0.1", a.port), timeout=30)
        s.sendall(client_hello("c%d.test" % k))
        socks.append(s)
    b.wait_conns(200, timeout=40)
    # All 200 relays are open at once now.
    assert sum(1 for c in b.conns if not c.closed) == 200
    for k, s in enumerate(socks):
        p = os.urandom(1000 + k)
        payloads.append(p)
        s.sendall(p)
        s.shutdown(socket.SHUT_WR)
    for k, s in enumerate(socks):
        got = recv_all(s, 30)
        assert got.endswith(payloads[k])
        s.close()
    wait_for(lambda: all(c.closed for c in b.conns), 20, "backends closed")


def test_ipv6(activate, echo_backend):
    b = echo_backend("echo", family=socket.AF_INET6)
    a = activate(["--fallback", b.addr, "--acme", "[::1]:9"], host="::1")
    hello = client_hello("v6.test")
    assert exchange(a.port, hello + b"v6", host="::1",
                    family=socket.AF_INET6) == hello + b"v6"
    line = a.wait_lines(1)[0]
    assert line["client"].startswith("[::1]:")


def test_unix_fallback_nginx(activate, nginx):
    n = nginx(unix=True)
    a = activate(["--fallback", n.addr, "--acme", "127.0.0.1:9"])
    r = curl("https://localhost:%d/" % a.port, a.port, "--http2")
    assert r.stdout == b"hello from nginx\n", r.stderr
    wait_log(n.access_log, r"HTTP/2.0 200")


def test_hostname_backend_every_address(inetd, echo_backend):
    """localhost resolves to ::1 and 127.0.0.1: the backend listens on
    127.0.0.1 only, so whichever comes first, the relay must get there."""
    b = echo_backend("echo")
    i = inetd(["--fallback", "localhost:%d" % b.port, "--acme",
               "127.0.0.1:9"])
    hello = client_hello()
    assert exchange(i.port, hello) == hello
    assert i.wait_results(1)[0].rc == 0


# --- PROXY protocol ------------------------------------------------------------

def v2_header(src, dst, sport, dport, local=False):
    if local:
        return V2SIG + b"\x20\x00\x00\x00"
    if ":" in src:
        body = (socket.inet_pton(socket.AF_INET6, src)
                + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!HH", sport, dport))
        return V2SIG + b"\x21\x21" + struct.pack("!H", len(body)) + body
    body = (socket.inet_aton(src) + socket.inet_aton(dst)
            + struct.pack("!HH", sport, dport))
    return V2SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_to_nginx(activate, nginx, version):
    """nginx `listen ... proxy_protocol` logs the real client (127.0.0.2
    here), not alpnd's own address."""
    n = nginx(proxy_protocol=True)
    a = activate(["--fallback", n.addr, "--acme", "127.0.0.1:9",
                  "--send-proxy", version])
    r = subprocess.run(["curl", "-sS", "-k", "--max-time", "10",
                        "--interface", "127.0.0.2", "--resolve",
                        "localhost:%d:127.0.0.1" % a.port,
                        "https://localhost:%d/" % a.port],
                       capture_output=True, timeout=20)
    assert r.stdout == b"hello from nginx\n", r.stderr
    m = wait_log(n.access_log, r"^(\S+) HTTP/\S+ 200")
    assert m.group(1) == "127.0.0.2"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_accept_proxy_passed_on(activate, nginx, version):
    """A PROXY header from a load balancer in front: its client address is
    logged by alpnd and reaches nginx through --send-proxy."""
    n = nginx(proxy_protocol=True)
    a = activate(["--fallback", n.addr, "--acme", "127.0.0.1:9",
                  "--accept-proxy", "--send-proxy", version])
    if version == "v1":
        hdr = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n"
    else:
        hdr = v2_header("2001:db8::7", "2001:db8::1", 51234, 443)
    # openssl s_client can't prepend a header: do the TLS handshake from
    # Python over a socket that got the header first.
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    raw.sendall(hdr)
    t = ctx.wrap_socket(raw, server_hostname="localhost")
    t.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    resp = recv_all(t)
    t.close()
    assert resp.endswith(b"hello from nginx\n")
    want = "203.0.113.7" if version == "v1" else "2001:db8::7"
    m = wait_log(n.access_log, r"^(\S+) HTTP/\S+ 200")
    assert m.group(1) == want
    line = a.wait_lines(1)[0]
    assert line["client"] in ("203.0.113.7:51234", "[2001:db8::7]:51234")


@pytest.mark.parametrize("version,expect", [
    ("v1", lambda sp, dp: b"PROXY TCP4 127.0.0.2 127.0.0.1 %d %d\r\n"
     % (sp, dp)),
    ("v2", lambda sp, dp: v2_header("127.0.0.2", "127.0.0.1", sp, dp))])
def test_send_proxy_exact_bytes(inetd, echo_backend, version, expect):
    b = echo_backend("record")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9",
               "--send-proxy", version])
    hello = client_hello()
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", i.port))
    sport = s.getsockname()[1]
    s.sendall(hello)
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    s.close()
    wait_for(lambda: b.conns and b.conns[0].eof, 10, "backend EOF")
    assert bytes(b.conns[0].data) == expect(sport, i.port) + hello


def test_accept_proxy_v2_local_and_send_unknown(inetd, echo_backend,
                                                tmp_path):
    """v2 LOCAL (health check) keeps the real peer; a unix-socket client
    has no address: v1 UNKNOWN / v2 LOCAL go out."""
    b = echo_backend("record")
    path = str(tmp_path / "front.sock")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9",
               "--accept-proxy", "--send-proxy", "v1"], unix_path=path)
    hello = client_hello()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(v2_header(None, None, 0, 0, local=True) + hello)
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    s.close()
    wait_for(lambda: b.conns and b.conns[0].eof, 10, "backend EOF")
    assert bytes(b.conns[0].data) == b"PROXY UNKNOWN\r\n" + hello
    res = i.wait_results(1)[0]
    assert res.rc == 0 and parse_logs(res.stderr)[0]["client"] == "unix"


def test_bad_proxy_header_dropped(inetd, echo_backend):
    b = echo_backend("record")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9",
               "--accept-proxy"])
    got = exchange(i.port, b"PROXY TCP4 1.2.3.4 nonsense\r\n"
                   + client_hello())
    assert got == b""
    res = i.wait_results(1)[0]
    assert res.rc == 65, res
    assert b.conns == []
    got = exchange(i.port, client_hello())      # no header at all
    assert i.wait_results(2)[1].rc == 65
    assert b.conns == []


# --- slow and broken clients, broken backends -----------------------------------

@pytest.mark.parametrize("what", ["nothing", "half-hello", "half-proxy"])
def test_slow_clients_closed_by_deadline(inetd, echo_backend, what):
    b = echo_backend("echo")
    args = ["--fallback", b.addr, "--acme", "127.0.0.1:9",
            "--hello-timeout", "1"]
    data = b""
    if what == "half-hello":
        data = client_hello()[:150]
    elif what == "half-proxy":
        args.append("--accept-proxy")
        data = b"PROXY TCP4 203.0.113.7 19"
    i = inetd(args)
    s = socket.create_connection(("127.0.0.1", i.port))
    t0 = time.monotonic()
    s.sendall(data)
    s.settimeout(10)
    assert s.recv(100) == b""          # closed by alpnd, not by us
    took = time.monotonic() - t0
    s.close()
    assert 0.9 <= took < 3, took
    res = i.wait_results(1)[0]
    assert res.rc == 75, res
    assert "timeout" in res.stderr
    assert b.conns == []


def test_client_gives_up_mid_hello(inetd, echo_backend):
    """A hello cut short by the client's EOF is not alpnd's to judge: the
    web server gets the same bytes and the same EOF, and answers."""
    b = echo_backend("echo")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9"])
    part = client_hello()[:100]
    assert exchange(i.port, part) == part
    res = i.wait_results(1)[0]
    assert res.rc == 0, res
    assert parse_logs(res.stderr)[0]["route"] == "fallback", res
    assert exchange(i.port, b"") == b""
    assert i.wait_results(2)[1].rc == 0
    assert [c.data for c in b.conns] == [part]


def test_backend_refusing(inetd):
    port = free_port()          # nothing listens there
    i = inetd(["--fallback", "127.0.0.1:%d" % port, "--acme",
               "127.0.0.1:9"])
    t0 = time.monotonic()
    assert exchange(i.port, client_hello()) == b""
    assert time.monotonic() - t0 < 2
    res = i.wait_results(1)[0]
    assert res.rc == 69 and "refused" in res.stderr, res


def test_backend_black_hole(inetd):
    """A backend whose accept queue is full drops our SYNs: the connect
    must time out (here after --hello-timeout 1)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(hole.getsockname())
        except BlockingIOError:
            pass
        fillers.append(f)
    time.sleep(0.1)
    try:
        i = inetd(["--fallback", "127.0.0.1:%d" % hole.getsockname()[1],
                   "--acme", "127.0.0.1:9", "--hello-timeout", "1"])
        t0 = time.monotonic()
        assert exchange(i.port, client_hello()) == b""
        took = time.monotonic() - t0
        res = i.wait_results(1)[0]
        assert res.rc == 69 and "timed out" in res.stderr, res
        assert 0.9 <= took < 4, took
    finally:
        for f in fillers:
            f.close()
        hole.close()


def test_idle_timeout(inetd, echo_backend):
    b = echo_backend("echo")
    i = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9",
               "--idle-timeout", "0.5"])
    s = socket.create_connection(("127.0.0.1", i.port))
    hello = client_hello()
    s.sendall(hello)
    s.settimeout(10)
    t0 = time.monotonic()
    got = recv_all(s)
    assert got == hello
    assert 0.4 < time.monotonic() - t0 < 3
    res = i.wait_results(1)[0]
    assert res.rc == 75 and "idle" in res.stderr


# --- usage ---------------------------------------------------------------------

def test_usage_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    base = [ALPND, "--fallback", "127.0.0.1:8443", "--acme", "127.0.0.1:9"]
    r = subprocess.run(base, stdin=open(str(f)), capture_output=True,
                       timeout=5)
    assert r.returncode == 64 and b"not a socket" in r.stderr
    # A terminal-like stdin (a pty): an error, never a wait.
    import pty
    m, sl = pty.openpty()
    r = subprocess.run(base, stdin=sl, capture_output=True, timeout=5)
    os.close(m)
    os.close(sl)
    assert r.returncode == 64
    for bad in (["--fallback", "nohostport"], ["--fallback", "1.2.3.4:0"],
                ["--fallback", "::1:80"], ["--fallback", "[::1]:80"],
                ["--fallback", "1.2.3.4:80", "--acme", "1:2", "--certs",
                 "/x"], ["--fallback", "1.2.3.4:80", "--certs", "/x",
                         "--send-proxy", "v3"],
                ["--fallback", "1.2.3.4:80", "--certs", "/x",
                 "--hello-timeout", "soon"]):
        r = subprocess.run([ALPND] + bad, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=5)
        assert r.returncode == 64, (bad, r)
    r = subprocess.run([ALPND, "--version"], capture_output=True, timeout=5)
    assert r.returncode == 0 and r.stdout.startswith(b"alpnd ")
    r = subprocess.run([ALPND, "--help"], capture_output=True, timeout=5)
    assert r.returncode == 0 and b"--fallback" in r.stdout


def test_quiet_and_verbose(inetd, echo_backend):
    b = echo_backend("echo")
    q = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9", "-q"])
    exchange(q.port, client_hello())
    assert q.wait_results(1)[0].stderr == ""
    v = inetd(["--fallback", b.addr, "--acme", "127.0.0.1:9", "-vv"])
    exchange(v.port, b"not tls")
    err = v.wait_results(1)[0].stderr
    assert "not a TLS ClientHello" in err and parse_logs(err)


# --- listening-socket mode ------------------------------------------------------

def test_listen_mode_serves_many_and_exits_idle(activate, echo_backend,
                                                recorder):
    b = echo_backend("echo")
    a = activate(["--fallback", b.addr, "--certs", recorder.dir,
                  "--respond", recorder.path, "--exit-idle", "1",
                  "--hello-timeout", "5"], mode="listen")
    # A client that sends nothing must not hold up the others.
    idle = socket.create_connection(("127.0.0.1", a.port))
    socks = []
    for k in range(20):
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(client_hello("l%d.test" % k))
        socks.append(s)
    b.wait_conns(20)
    for k, s in enumerate(socks):
        s.sendall(b"%d" % k)
        s.shutdown(socket.SHUT_WR)
    down = 0
    for k, s in enumerate(socks):
        got = recv_all(s)
        assert got.endswith(b"%d" % k)
        down += len(got)
        s.close()
    up = sum(len(client_hello("l%d.test" % k)) + len(b"%d" % k)
             for k in range(20))
    # ACME in listening mode: fork + exec, connection on fd 0.
    s = socket.create_connection(("127.0.0.1", a.port))
    s.sendall(client_hello("acme.test", ["acme-tls/1"]))
    assert recv_all(s) == b"RESPONDER\n"
    s.close()
    info = recorder.info()
    assert info["fd"] == 0 and info["head"] == client_hello(
        "acme.test", ["acme-tls/1"])[:5].hex()
    assert "LISTEN_FDS" not in info["env"]
    idle.close()
    a.wait_lines(2)     # the ACME one and the silent one
    # Then nothing: it exits on its own after --exit-idle.
    t0 = time.monotonic()
    rc = a.proc.wait(10)
    assert rc == 0 and time.monotonic() - t0 < 5
    # A line each for the ACME one and the silent one; the 20 clean relays
    # are summed up (at the latest on the way out), not a line each.
    text = a.text()
    lines = parse_logs(text)
    assert sorted(x["route"] for x in lines) == ["-", "respond"], text
    sums = relayed_sums(text)
    assert len({x["pid"] for x in lines + sums}) == 1, "one process served all"
    assert [sum(m[k] for m in sums) for k in ("n", "resets", "up", "down")] \
        == [20, 0, up, down], text


@pytest.mark.parametrize("flag", ["-q", "", "-v", "-vv"])
def test_listen_mode_log_levels(activate, echo_backend, flag):
    """Listening mode, relays that end cleanly: -q says nothing of them,
    the default one summary line for all, -v a line each (and no summary),
    -vv debugging detail too.  A failed relay gets its line at every level."""
    b = echo_backend("echo")
    args = ["--fallback", b.addr, "--acme", "127.0.0.1:9", "--exit-idle",
            "1"] + ([flag] if flag else [])
    t0 = time.monotonic()
    a = activate(args, mode="listen")
    for k in range(3):
        assert exchange(a.port, b"GET /%d HTTP/1.0\r\n\r\n" % k) != b""
    # acme-tls/1 to a port where nothing listens: a failure, always logged
    s = socket.create_connection(("127.0.0.1", a.port))
    s.sendall(client_hello("refused.test", ["acme-tls/1"]))
    assert recv_all(s) == b""
    s.close()
    assert a.proc.wait(10) == 0
    lived = time.monotonic() - t0
    text = a.text()
    lines = parse_logs(text)
    relays = [x for x in lines if x["route"] == "fallback"]
    sums = relayed_sums(text)
    # written at the idle exit, before 10 s were up: it says how long
    assert all(1 <= m["secs"] <= lived + 1 for m in sums), (lived, text)
    failed = [x for x in lines if x["route"] == "acme"]
    assert len(failed) == 1 and "127.0.0.1:9" in failed[0]["result"], text
    if flag == "-q":
        assert relays == [] and sums == [], text
    elif flag == "":
        assert relays == [] and [m["n"] for m in sums] == [3], text
    else:
        assert len(relays) == 3 and sums == [], text
        assert all(x["result"] == "ok" for x in relays), text
    assert ("not a TLS ClientHello" in text) == (flag == "-vv"), text


def test_listen_mode_concurrent_slow_hellos(activate, echo_backend):
    """Several clients each dribbling their hello: served concurrently, so
    the total time is about one client's, not the sum."""
    b = echo_backend("echo")
    a = activate(["--fallback", b.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "5", "-v"], mode="listen")
    hello = client_hello("dribble.test")
    socks = [socket.create_connection(("127.0.0.1", a.port))
             for _ in range(10)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    for k in range(0, len(hello), 64):
        for s in socks:
            s.send(hello[k:k + 64])
        time.sleep(0.05)
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    for s in socks:
        assert recv_all(s) == hello
        s.close()
    assert time.monotonic() - t0 < 3
    lines = a.wait_lines(10)
    assert all(x["sni"] == "dribble.test" for x in lines)


def test_closed_stderr_never_becomes_a_socket(echo_backend):
    """With fd 2 closed, a backend socket must not land on fd 2 (and get
    the log line): alpnd puts /dev/null there first."""
    b = echo_backend("record")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    c = socket.create_connection(lsock.getsockname())
    conn, _ = lsock.accept()
    hello = client_hello("closed-stderr.test")
    c.sendall(hello)

    def close2():
        os.close(2)
    p = subprocess.Popen([ALPND, "--fallback", b.addr, "--acme",
                          "127.0.0.1:9"], stdin=conn,
                         stdout=subprocess.DEVNULL, preexec_fn=close2)
    conn.close()
    try:
        b.wait_conns(1)
        fd2 = os.readlink("/proc/%d/fd/2" % p.pid)
        assert fd2 == "/dev/null", fd2
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""
        assert p.wait(10) == 0
        wait_for(lambda: b.conns[0].eof, 10, "backend EOF")
        assert bytes(b.conns[0].data) == hello
    finally:
        c.close()
        lsock.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("proxy", [False, True])
def test_waiting_for_the_hello_does_not_spin(inetd, echo_backend, proxy):
    """Half a ClientHello (after a PROXY header, or half a header) for a
    second: alpnd sleeps in epoll with SO_RCVLOWAT, it does not poll."""
    b = echo_backend("echo")
    args = ["--fallback", b.addr, "--acme", "127.0.0.1:9"]
    hello = client_hello("patience.test")
    hdr = b""
    if proxy:
        args.append("--accept-proxy")
        hdr = b"PROXY TCP4 203.0.113.9 192.0.2.1 4000 443\r\n"
    i = inetd(args)
    s = socket.create_connection(("127.0.0.1", i.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = (hdr[:20] if proxy else hello[:200])
    s.sendall(first)
    wait_for(lambda: i.procs, 5, "alpnd to start")
    pid = i.procs[0].pid
    time.sleep(0.3)                # the scenario: a slow client
    cpu0 = proc_cpu_seconds(pid)   # start-up (ASan's is not small) done
    time.sleep(1.0)
    cpu = proc_cpu_seconds(pid) - cpu0
    assert cpu < 0.05, "alpnd used %.3fs CPU while waiting" % cpu
    s.sendall((hdr + hello)[len(first):])
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello
    s.close()
    res = i.wait_results(1)[0]
    assert res.rc == 0 and "patience.test" in res.stderr


def test_listen_mode_deadline_and_reaping(activate, echo_backend, recorder):
    b = echo_backend("echo")
    a = activate(["--fallback", b.addr, "--certs", recorder.dir,
                  "--respond", recorder.path, "--hello-timeout", "1",
                  "--exit-idle", "30"], mode="listen")
    slow = socket.create_connection(("127.0.0.1", a.port))
    t0 = time.monotonic()
    # Meanwhile three ACME connections, each handed to a child.
    for k in range(3):
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(client_hello("r%d.test" % k, ["acme-tls/1"]))
        assert recv_all(s) == b"RESPONDER\n"
        s.close()
    slow.settimeout(5)
    assert slow.recv(10) == b""
    assert 0.9 < time.monotonic() - t0 < 3
    slow.close()
    pid = int(a.wait_lines(4)[0]["pid"])

    def zombies():
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % d) as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(st[1]) == pid and st[0] == "Z":
                out.append(d)
        return out
    wait_for(lambda: not zombies(), 5, "responder children reaped")
    assert a.proc.poll() is None      # still serving (exit-idle 30 s)


@pytest.mark.parametrize("mode", ["inetd", "listen"])
def test_proxy_client_passed_to_responder(activate, recorder, mode):
    """The PROXY header is consumed by alpnd: the responder learns the
    client from ALPND_CLIENT (and only then)."""
    a = activate(["--fallback", "127.0.0.1:9", "--certs", recorder.dir,
                  "--respond", recorder.path, "--accept-proxy",
                  "--exit-idle", "30"], mode=mode)
    s = socket.create_connection(("127.0.0.1", a.port))
    hello = client_hello("pp.test", ["acme-tls/1"])
    s.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n" + hello)
    assert recv_all(s) == b"RESPONDER\n"
    s.close()
    info = recorder.info()
    assert info["env"].get("ALPND_CLIENT") == "203.0.113.7:51234", info
    assert info["head"] == hello[:5].hex()


def test_missing_responder(inetd, activate, tmp_path):
    """No responder where --respond says: exit 69 with a reason in per-
    connection mode, in one log line (not an "exec" line and then a failure
    line); in listening mode the others are still served."""
    certs = tmp_path / "c"
    certs.mkdir()
    missing = str(tmp_path / "no-such-responder")
    i = inetd(["--fallback", "127.0.0.1:9", "--certs", str(certs),
               "--respond", missing])
    assert exchange(i.port, client_hello("m.test", ["acme-tls/1"])) == b""
    res = i.wait_results(1)[0]
    assert res.rc == 69 and "No such file" in res.stderr, res
    lines = res.stderr.strip().split("\n")
    assert len(lines) == 1 and len(parse_logs(res.stderr)) == 1, res
    assert parse_logs(res.stderr)[0]["route"] == "respond", res
    a = activate(["--fallback", "127.0.0.1:9", "--certs", str(certs),
                  "--respond", missing, "--exit-idle", "30"], mode="listen")
    for _ in range(2):
        assert exchange(a.port, client_hello("m.test", ["acme-tls/1"])) \
            == b""
    lines = a.wait_lines(2)
    assert all("No such file" in x["result"] for x in lines), lines
    assert a.proc.poll() is None


SPAWN_FAIL_SHIM = r"""
#include <errno.h>
#include <spawn.h>
int posix_spawnattr_init(posix_spawnattr_t *a) { (void)a; return ENOMEM; }
"""


def test_spawn_failure_frees_what_it_made(activate, recorder, tmp_path,
                                          monkeypatch):
    """posix_spawn's set-up failing half-way (posix_spawnattr_init, made to
    fail with ENOMEM by an LD_PRELOAD shim) frees the file actions made
    before it: LeakSanitizer in the sanitizer build says so at exit."""
    asan_alpnd = os.path.join(ROOT, "build", "asan", "alpnd")
    if not os.path.exists(asan_alpnd):
        pytest.fail("build/asan/alpnd missing: make asan")
    shim = tmp_path / "spawnfail.so"
    src = tmp_path / "spawnfail.c"
    src.write_text(SPAWN_FAIL_SHIM)
    import conftest
    monkeypatch.setattr(conftest, "ALPND", asan_alpnd)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(src)],
                   check=True, timeout=60)
    a = activate(["--fallback", "127.0.0.1:9", "--certs", recorder.dir,
                  "--respond", recorder.path, "--exit-idle", "0.5"],
                 mode="listen",
                 env={"LD_PRELOAD": str(shim),
                      "ASAN_OPTIONS": "verify_asan_link_order=0:"
                                      "detect_leaks=1:exitcode=66",
                      "LSAN_OPTIONS": "exitcode=66"})
    assert exchange(a.port, client_hello("leak.test", ["acme-tls/1"])) \
        == b""
    line = a.wait_lines(1)[0]
    assert "Cannot" in line["result"], line
    rc = a.proc.wait(15)
    assert rc == 0, a.text()[-3000:]


@pytest.mark.parametrize("mode", ["inetd", "listen"])
def test_inherited_alpnd_client_never_reaches_the_responder(activate,
                                                            recorder, mode):
    """ALPND_CLIENT in alpnd's own environment is not a client address:
    only an accepted PROXY header may set it for the responder."""
    a = activate(["--fallback", "127.0.0.1:9", "--certs", recorder.dir,
                  "--respond", recorder.path, "--exit-idle", "30"],
                 mode=mode, env={"ALPND_CLIENT": "198.51.100.66:1"})
    s = socket.create_connection(("127.0.0.1", a.port))
    s.sendall(client_hello("env.test", ["acme-tls/1"]))
    assert recv_all(s) == b"RESPONDER\n"
    s.close()
    assert "ALPND_CLIENT" not in recorder.info()["env"]


def _full_unix_backend(path):
    """A unix-socket backend whose accept queue is full: listen(1) and two
    connections nobody accepted.  Returns (listener, the two fillers)."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    fill = []
    for _ in range(8):      # the backlog is a little more than asked
        f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        f.setblocking(False)
        try:
            f.connect(path)
        except BlockingIOError:
            f.close()
            break
        fill.append(f)
    assert fill, "could not fill the accept queue"
    return ls, fill


@pytest.mark.parametrize("mode", ["inetd", "listen"])
def test_busy_unix_backend_is_waited_for(activate, tmp_path, mode):
    """A unix-socket backend with a full accept queue says EAGAIN where
    TCP would queue the SYN: alpnd waits (until the connect deadline) as
    TCP would, instead of failing the burst."""
    path = str(tmp_path / "busy.sock")
    ls, fill = _full_unix_backend(path)
    a = activate(["--fallback", "unix:" + path, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "-vv"], mode=mode)
    n = 20
    got = [None] * n

    def client(k):
        try:
            got[k] = exchange(a.port, b"GET /%d HTTP/1.0\r\n\r\n" % k,
                              timeout=20)
        except OSError as e:
            got[k] = repr(e)
    ts = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    # every relay met the full queue before the backend moves
    wait_for(lambda: a.text().count("accept queue full, waiting") >= n, 10,
             "%d relays to find the backend's queue full" % n)
    for f in fill:
        f.close()
    served = 0
    ls.settimeout(15)
    while served < n:
        c, _ = ls.accept()
        c.settimeout(10)
        data = b""
        while not data.endswith(b"\r\n\r\n"):
            b = c.recv(4096)
            if not b:
                break
            data += b
        if data:            # not one of the fillers, closed unaccepted
            c.sendall(b"echo " + data)
            served += 1
        c.close()
    for t in ts:
        t.join(25)
    want = [b"echo GET /%d HTTP/1.0\r\n\r\n" % k for k in range(n)]
    assert got == want
    ls.close()


def _journal_run(env_stream):
    """alpnd on one end of a socketpair, stderr a pipe; JOURNAL_STREAM is
    set from env_stream(pipe_stat).  The fallback refuses: one log line."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ, JOURNAL_STREAM=env_stream(st))
    port = free_port()
    p = subprocess.Popen([ALPND, "--fallback", "127.0.0.1:%d" % port,
                          "--acme", "127.0.0.1:%d" % port],
                         stdin=b, stderr=w, env=env)
    b.close()
    os.close(w)
    a.sendall(b"GET / HTTP/1.0\r\n\r\n")
    rc = p.wait(timeout=10)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    a.close()
    return rc, text


def test_journal_stream_lines_carry_priority_not_prefix():
    """Under journald (JOURNAL_STREAM names fd 2) the journal adds
    'alpnd[PID]: ' itself: alpnd writes '<N>' priorities instead."""
    rc, text = _journal_run(lambda st: "%d:%d" % (st.st_dev, st.st_ino))
    assert rc == 69, text
    lines = text.splitlines()
    assert lines and all(re.match(r"<[0-7]>", ln) for ln in lines), text
    assert "alpnd[" not in text, text


def test_journal_stream_of_another_file_keeps_prefix():
    """A JOURNAL_STREAM inherited from elsewhere (not fd 2) changes nothing."""
    rc, text = _journal_run(lambda st: "%d:%d" % (st.st_dev, st.st_ino + 1))
    assert rc == 69, text
    assert re.match(r"alpnd\[\d+\]: ", text), text
    assert not text.startswith("<"), text


def test_hello_timeout_above_the_responders_limit_is_a_usage_error():
    """alpnd-respond takes --hello-timeout 1..3600; alpnd refuses more at
    start-up instead of failing every ACME connection later."""
    a, b = socket.socketpair()
    r = subprocess.run([ALPND, "-f", "127.0.0.1:1", "-a", "127.0.0.1:1",
                        "-t", "3601"], stdin=b, capture_output=True, timeout=10)
    a.close()
    b.close()
    assert r.returncode == 64 and b"3600" in r.stderr, r


# --- relay: several backend addresses, urgent data, resets --------------------

def _read_to_eof(s, limit=None):
    """Everything s sends until EOF (or until limit bytes)."""
    data = b""
    while limit is None or len(data) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _serve_echo_once(ls, out):
    c, _ = ls.accept()
    data = _read_to_eof(c)
    out.append(data)
    c.sendall(data)
    c.close()


def test_second_address_after_a_timed_out_first_is_relayed(tmp_path):
    """A name with two addresses: the first black-holes (connect times out
    in S_CONNECT), the second connects at once.  The second socket must
    still be watched, or the reply never comes back."""
    hole = socket.socket(socket.AF_INET6)
    hole.bind(("::1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(4):                  # fill the accept queue: SYNs dropped
        f = socket.socket(socket.AF_INET6)
        f.setblocking(False)
        f.connect_ex(("::1", port))
        fillers.append(f)
    echo = socket.socket()
    echo.bind(("127.0.0.1", port))
    echo.listen(1)
    got = []
    t = threading.Thread(target=_serve_echo_once, args=(echo, got), daemon=True)
    t.start()
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 twoaddr\n127.0.0.1 twoaddr\n")
    a, b = socket.socketpair()
    p = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
         str(hosts), ALPND, "-t", "1", "-f", "twoaddr:%d" % port,
         "-a", "twoaddr:%d" % port], stdin=b, stderr=subprocess.PIPE)
    b.close()
    try:
        a.sendall(b"ping over the second address\n")
        a.shutdown(socket.SHUT_WR)
        a.settimeout(8)
        assert _read_to_eof(a) == b"ping over the second address\n"
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for s in fillers + [hole, echo, a]:
            s.close()


@pytest.mark.parametrize("fin", [True, False])
def test_urgent_byte_is_relayed_inline_and_nothing_after_it_is_lost(inetd, echo_backend, fin):
    """splice(2) stops at the TCP urgent mark: the byte there is moved by
    hand, so the stream goes on, with a FIN right behind it (else read as
    EOF, the rest lost) or without (else stalled)."""
    be = echo_backend("echo")
    srv = inetd(["-f", be.addr, "-a", be.addr])
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"hello ")
        s.send(b"!", socket.MSG_OOB)
        s.sendall(b"world")
        if fin:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(8)
        back = _read_to_eof(s, limit=12)
        if not fin:
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    assert back == b"hello !world"
    r = srv.wait_results(1)[0]
    assert r.rc == 0, r.stderr


def test_urgent_byte_waits_for_room_in_the_pipe(tmp_path, echo_backend):
    """When the pipe cannot take the urgent byte (a pipe counts its room
    in pages: full although it holds fewer bytes than its size), the byte
    stays in the socket until it can: strace makes that one pipe write(2)
    fail with EAGAIN, as a full pipe would.  The first 64 KiB of each way
    are copied (recv/send, no pipe): 70,000 bytes go first so the byte
    meets the pipe."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (tests/deps check)")
    be = echo_backend("echo")
    trace = tmp_path / "strace.log"
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    argv = ["strace", "-qq", "-o", str(trace), "-e", "trace=write",
            "-e", "inject=write:error=EAGAIN:when=1", ALPND,
            "-f", be.addr, "-a", be.addr]
    with socket.create_connection(ls.getsockname()) as s:
        c, _ = ls.accept()
        p = subprocess.Popen(argv, stdin=c, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        c.close()
        try:
            s.settimeout(8)
            first = b"hello " * 11667
            s.sendall(first)
            assert _read_to_eof(s, limit=len(first)) == first
            s.send(b"!", socket.MSG_OOB)
            wait_for(lambda: "INJECTED" in trace.read_text(), 10,
                     "the pipe write to fail")
            s.sendall(b"world")
            s.shutdown(socket.SHUT_WR)
            back = _read_to_eof(s)
        finally:
            err = p.communicate(timeout=15)[1]
    assert back == b"!world", err
    assert p.returncode == 0, err


def test_backend_reset_reaches_the_client_as_a_reset(inetd):
    """A backend that aborts (RST) must not look like a complete response
    to the client: the relay passes the reset on."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def abort():
        c, _ = ls.accept()
        c.recv(100)
        c.sendall(b"x" * 100000)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    t = threading.Thread(target=abort, daemon=True)
    t.start()
    addr = "127.0.0.1:%d" % ls.getsockname()[1]
    srv = inetd(["-f", addr, "-a", addr])
    outcome = None
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(8)
        try:
            while s.recv(65536):
                pass
            outcome = "eof"
        except ConnectionResetError:
            outcome = "reset"
    ls.close()
    assert outcome == "reset"
    r = srv.wait_results(1)[0]
    assert r.rc == 0 and "reset" in r.stderr, r.stderr


@contextlib.contextmanager
def _listening(args, preexec=None, stdout=None, ls=None, stderr=subprocess.PIPE,
               prefix=()):
    """alpnd in listening-socket mode on ls (default: a fresh loopback
    listener), run under prefix (e.g. strace); yields (listener, process);
    the process is killed if it outlives the test, and the listener closed."""
    if ls is None:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
    p = subprocess.Popen(list(prefix) + [ALPND] + args, stdin=ls,
                         stdout=ls if stdout == "listener" else subprocess.DEVNULL,
                         stderr=stderr, preexec_fn=preexec)
    try:
        yield ls, p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ls.close()


def _one_acme_connection(addr):
    """An acme-tls/1 ClientHello, then wait (bounded) for the close."""
    with socket.create_connection(addr) as s:
        s.sendall(client_hello("a.example", ("acme-tls/1",)))
        s.settimeout(5)
        try:
            s.recv(1)
        except OSError:
            pass


# --- listening-socket mode: signals, the responder, backends at start ---------

def test_listening_mode_exits_idle_even_if_sigchld_was_ignored(tmp_path):
    """An inherited SIGCHLD=SIG_IGN would reap responders unseen and keep
    --exit-idle waiting for them forever."""
    import signal as sig
    with _listening(["-f", "127.0.0.1:1", "--certs", str(tmp_path),
                     "--respond", "/bin/true", "-x", "1"],
                    preexec=lambda: sig.signal(sig.SIGCHLD, sig.SIG_IGN)) as (ls, p):
        _one_acme_connection(ls.getsockname())
        assert p.wait(timeout=8) == 0


def test_listening_socket_never_reaches_the_responder(tmp_path):
    """With StandardInput=socket, fd 1 (and 2) are the listening socket as
    well: they must not be handed to alpnd-respond."""
    out = tmp_path / "fds"
    script = tmp_path / "respond.sh"
    script.write_text("#!/bin/sh\nls -l /proc/$$/fd > %s\n" % out)
    script.chmod(0o755)
    with _listening(["-f", "127.0.0.1:1", "--certs", str(tmp_path),
                     "--respond", str(script), "-x", "1"],
                    stdout="listener") as (ls, p):
        ino = os.fstat(ls.fileno()).st_ino
        _one_acme_connection(ls.getsockname())
        assert p.wait(timeout=8) == 0
        wait_for(lambda: out.exists() and out.read_text(), 5, "the responder ran")
        assert "socket:[%d]" % ino not in out.read_text(), out.read_text()


def test_listening_mode_resolves_backends_at_start():
    """getaddrinfo(3) in the event loop would stall every connection: names
    are resolved at start, and one that does not resolve is an error then."""
    with _listening(["-f", "nonexistent.invalid:443", "-a", "127.0.0.1:1",
                     "-x", "1"]) as (ls, p):
        assert p.wait(timeout=30) == 69
        assert b"nonexistent.invalid" in p.stderr.read()


# --- listening-socket mode: reload and stop ----------------------------------

def _held(port):
    """A relayed connection that stays open: send a line, get it back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)

    def ask(line):
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            b = s.recv(65536)
            if not b:
                raise EOFError(got)
            got += b
        return got
    return s, ask


def test_reload_keeps_relays_takes_new_options_and_binary(activate,
                                                          echo_backend,
                                                          tmp_path):
    """alpnd --reload PID OPTIONS: same PID, the binary at the path run
    again (a new file there is the new binary), the new options for new
    connections, every established relay untouched, and no new connection
    refused or lost while it happens."""
    a_be, b_be = echo_backend("echo"), echo_backend("echo")
    binary = tmp_path / "alpnd"
    shutil.copy(ALPND, binary)
    import conftest
    old_alpnd = conftest.ALPND
    conftest.ALPND = str(binary)
    try:
        a = activate(["--fallback", a_be.addr, "--acme", "127.0.0.1:9",
                      "--exit-idle", "30"], mode="listen")
    finally:
        conftest.ALPND = old_alpnd
    pid = a.proc.pid
    s, ask = _held(a.port)
    assert ask(b"before\n") == b"before\n"
    ino = os.stat("/proc/%d/exe" % pid).st_ino
    # the new binary: a new file at the same path, as make install does
    shutil.copy(ALPND, tmp_path / "alpnd.new")
    os.rename(tmp_path / "alpnd.new", binary)
    stop = threading.Event()
    failures, done = [], [0]

    def steady():
        k = 0
        while not stop.is_set() and k < 2000:
            k += 1
            try:
                got = exchange(a.port, b"n%d" % k, timeout=5)
                if got != b"n%d" % k:
                    failures.append((k, got))
            except OSError as e:
                failures.append((k, repr(e)))
            done[0] = k
    t = threading.Thread(target=steady)
    t.start()
    try:
        wait_for(lambda: done[0] >= 5, 10, "steady connections")
        r = subprocess.run([str(binary), "--reload", str(pid), "--fallback",
                            b_be.addr, "--acme", "127.0.0.1:9",
                            "--exit-idle", "30"], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        n = done[0]
        wait_for(lambda: done[0] >= n + 5, 10, "connections after reload")
    finally:
        stop.set()
        t.join(30)
    assert failures == []
    assert ask(b"after\n") == b"after\n"     # the held relay, to a_be
    assert a_be.conns[0].data.startswith(b"before\nafter\n")
    assert exchange(a.port, b"new") == b"new"
    assert b_be.conns and b_be.conns[-1].data == b"new"
    assert a.proc.poll() is None
    assert os.stat("/proc/%d/exe" % pid).st_ino != ino
    assert os.stat("/proc/%d/exe" % pid).st_ino == os.stat(binary).st_ino
    s.close()
    wait_log(a.log, r"reload: \d+ connections stay with pid \d+")


def test_reload_with_bad_options_changes_nothing(activate, echo_backend):
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30"], mode="listen")
    r = subprocess.run([ALPND, "--reload", str(a.proc.pid), "--fallback",
                        "nonsense", "--acme", "127.0.0.1:9"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 64, r.stderr
    assert exchange(a.port, b"still") == b"still"
    assert "reload" not in a.text()


def test_stop_serves_the_queue_and_drains(activate, echo_backend):
    """SIGTERM: clients already queued are served, relays go on until
    they end or --drain passes, then one line counts what was cut."""
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "--drain", "1.5"], mode="listen")
    s, ask = _held(a.port)
    assert ask(b"x") == b"x"
    os.kill(a.proc.pid, signal.SIGSTOP)
    queued = []
    try:
        for k in range(5):      # connected, not yet accepted
            q = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            q.sendall(b"q%d" % k)
            q.shutdown(socket.SHUT_WR)
            queued.append(q)
        os.kill(a.proc.pid, signal.SIGTERM)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    for k, q in enumerate(queued):
        assert recv_all(q, 10) == b"q%d" % k
        q.close()
    assert ask(b"still relayed") == b"still relayed"
    t0 = time.monotonic()
    assert a.proc.wait(10) == 0
    assert 0.5 < time.monotonic() - t0 < 5
    assert len(re.findall(r"connections cut after the drain", a.text())) == 1
    assert re.search(r"stopping: 1 connections cut after the drain", a.text())
    s.close()


# --- listening-socket mode: bounds --------------------------------------------

def _closed_at_once(s, timeout=2):
    """The connection was closed by alpnd without waiting for anything."""
    s.settimeout(timeout)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_bounds_per_source_and_in_all(activate, echo_backend):
    """--max-per-source and --max-conn: what goes over is closed at once;
    other addresses are still served; one summary line counts them."""
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "--max-per-source", "3",
                  "--max-conn", "5", "--drain", "1"], mode="listen")
    held = [socket.create_connection(("127.0.0.1", a.port))
            for _ in range(3)]
    for s in held:      # accepted and waiting for a hello: not closed
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1)
    extra = [socket.create_connection(("127.0.0.1", a.port))
             for _ in range(2)]
    assert all(_closed_at_once(s) for s in extra)
    # another address still gets in, up to --max-conn in all
    s4 = socket.create_connection(("127.0.0.1", a.port),
                                  source_address=("127.0.0.2", 0))
    assert exchange(a.port, b"ok", source="127.0.0.3") == b"ok"
    s5 = socket.create_connection(("127.0.0.1", a.port),
                                  source_address=("127.0.0.4", 0))
    s5.settimeout(0.3)
    with pytest.raises(socket.timeout):
        s5.recv(1)
    # --max-conn reached: the one waiting longest for its hello makes room
    s6 = socket.create_connection(("127.0.0.1", a.port),
                                  source_address=("127.0.0.5", 0))
    assert _closed_at_once(held[0])
    s6.settimeout(0.3)
    with pytest.raises(socket.timeout):
        s6.recv(1)
    # no line per refused connection; one summary at the end
    assert "over the bounds" not in a.text()
    for s in held + extra + [s4, s5, s6]:
        s.close()
    os.kill(a.proc.pid, signal.SIGTERM)
    assert a.proc.wait(10) == 0
    lines = re.findall(r"over the bounds.*", a.text())
    assert len(lines) == 1, a.text()
    assert "3 closed at once (0 over --max-conn 5, 2 over " \
        "--max-per-source 3, 0 short of descriptors, 1 waiting for a " \
        "ClientHello closed for newer ones)" in lines[0], lines


def test_out_of_descriptors_sheds_without_spinning(activate, echo_backend):
    """At the descriptor limit the reserve descriptor is given up to take
    and close the next client: the queue keeps moving, nothing spins, and
    once descriptors are free again clients are served as before."""
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "--max-conn", "1000",
                  "--max-per-source", "0", "--drain", "1"], mode="listen",
                 prefix=("prlimit", "--nofile=48:48"))
    pid = a.proc.pid

    def cpu():
        with open("/proc/%d/stat" % pid) as f:
            st = f.read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    c0 = cpu()
    held = [socket.create_connection(("127.0.0.1", a.port))
            for _ in range(120)]
    shed = sum(_closed_at_once(s, 0.5) for s in held)
    assert 60 <= shed < 120, shed
    assert cpu() - c0 < 1.0
    for s in held:
        s.close()
    wait_for(lambda: exchange(a.port, b"again", timeout=5) == b"again", 10,
             "a client served again")
    os.kill(pid, signal.SIGTERM)
    assert a.proc.wait(10) == 0
    assert re.search(r"\d+ short of descriptors", a.text())


def test_early_ends_are_logged_within_a_budget(activate, echo_backend):
    """Connections that end before their ClientHello (what a flood is
    made of) get a line each up to 10 per 10 s; the rest are counted
    in one summary line, so the journal stays bounded."""
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "--max-per-source", "0",
                  "--drain", "1"], mode="listen")
    n = 200
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", a.port))
        s.close()               # silent: "closed before any data"
    assert exchange(a.port, b"real") == b"real"
    wait_for(lambda: len(a.lines()) >= 10, 10, "the budget of early lines")
    os.kill(a.proc.pid, signal.SIGTERM)
    assert a.proc.wait(10) == 0
    text = a.text()
    early = [x for x in a.lines() if x["result"] == "closed before any data"]
    assert len(early) == 10, len(early)
    m = re.search(r"(\d+) more connections that ended without a complete "
                  r"ClientHello", text)
    assert m and int(m.group(1)) == n - 10, text[-2000:]
    # the one relay that got through is in the sum of clean relays
    assert [(m["n"], m["resets"]) for m in relayed_sums(text)] == [(1, 0)], \
        text[-2000:]


def test_stop_after_reload_drains_the_reloaded_relays(activate, echo_backend):
    """A stop reaches the child a reload left with the old relays (systemd
    signals only the main process): it drains them within --drain and
    says how many it cut; the main process waits for it."""
    be = echo_backend("echo")
    a = activate(["--fallback", be.addr, "--acme", "127.0.0.1:9",
                  "--exit-idle", "30", "--drain", "1"], mode="listen")
    s, ask = _held(a.port)
    assert ask(b"x") == b"x"
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_log(a.log, r"reload: 1 connections stay with pid (\d+)")
    child = int(re.search(r"stay with pid (\d+)", a.text()).group(1))
    wait_log(a.log, r"listening-socket mode|reload")
    assert ask(b"y") == b"y"
    t0 = time.monotonic()
    os.kill(a.proc.pid, signal.SIGTERM)
    assert a.proc.wait(10) == 0
    assert 0.5 < time.monotonic() - t0 < 5
    assert re.search(r"alpnd\[%d\]: stopping: 1 connections cut after the "
                     r"drain" % child, a.text()), a.text()
    assert not os.path.exists("/proc/%d/stat" % child) or \
        open("/proc/%d/stat" % child).read().split()[2] == "Z"
    s.close()


# --- relay: big pipes for bulk flows, within the user's pipe budget -----------

BULK_UID = 54321        # no other process runs as this user: its pipe pages
BULK_BYTES = 8 << 20    # (pipe-user-pages-soft) are the test's alone


def _as_bulk_user():
    os.setgroups([])
    os.setgid(BULK_UID)
    os.setuid(BULK_UID)


@pytest.fixture
def bulk_alpnd():
    """alpnd where the bulk user may run it: the checkout may sit in a
    directory only root can enter (a clone in mktemp -d: mode 0700)."""
    d = tempfile.mkdtemp(prefix="alpnd-bulk-")
    try:
        os.chmod(d, 0o755)
        exe = os.path.join(d, "alpnd")
        shutil.copy(ALPND, exe)
        os.chmod(exe, 0o755)
        yield exe
    finally:
        shutil.rmtree(d)


def _pattern(i, n=BULK_BYTES):
    """Bytes that differ per connection and per offset."""
    block = bytes((i * 7 + k) & 0xff for k in range(251))
    return (block * (n // len(block) + 1))[:n]


def _bulk_through(port, nconn):
    """A generator: first the address of a backend that answers "GET i"
    with _pattern(i) and EOF; then, with a relay on port, the bytes each of
    nconn connections received.  Every client reads 64 KiB and then waits
    until all have (so that all flows are under way at once, more than
    the buffers between can hold still in flight), then reads to EOF."""
    be = socket.socket()
    be.bind(("127.0.0.1", 0))
    be.listen(nconn)

    def serve(c):
        with c:
            c.settimeout(60)
            i = int(c.recv(64).split()[1])
            c.sendall(_pattern(i))
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass

    def acceptor():
        for _ in range(nconn):
            c, _ = be.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=acceptor, daemon=True).start()
    yield "127.0.0.1:%d" % be.getsockname()[1]
    clients, got = [], []
    for i in range(nconn):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET %d\n" % i)
        clients.append(s)
    for s in clients:
        b = bytearray()
        while len(b) < 65536:
            chunk = s.recv(65536 - len(b))
            assert chunk, "EOF after %d bytes" % len(b)
            b += chunk
        got.append(b)

    def read(i):
        got[i] += recv_all(clients[i], timeout=30)
        clients[i].close()
    ts = [threading.Thread(target=read, args=(i,)) for i in range(nconn)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    be.close()
    yield [bytes(g) for g in got]


def test_bulk_flows_get_big_pipes_within_a_budget(tmp_path, bulk_alpnd):
    """An unprivileged alpnd grows the pipe of a flow that moves bulk data
    (fewer splices per byte), but the pages grown pipes hold are bounded
    per process (16 MiB), so that other connections keep full-size pipes
    (the kernel gives a user over pipe-user-pages-soft 2-page pipes).
    24 stalled downloads of 8 MiB: at most 17 grow, every byte intact."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (tests/deps check)")
    trace = tmp_path / "strace.log"
    trace.touch()
    os.chmod(trace, 0o666)     # opened by strace as the user, through the
    tfd = os.open(trace, os.O_WRONLY)   # descriptor: not pytest's directory
    n = 24
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    steps = _bulk_through(ls.getsockname()[1], n)
    addr = next(steps)
    p = subprocess.Popen(["strace", "-qq", "-f", "-o", "/proc/self/fd/%d" % tfd,
                          "-e", "trace=fcntl", bulk_alpnd, "-f", addr, "-a", addr,
                          "--exit-idle", "1"],
                         stdin=ls, stderr=subprocess.PIPE, pass_fds=(tfd,),
                         preexec_fn=_as_bulk_user)
    os.close(tfd)
    try:
        got = next(steps)
        err = p.communicate(timeout=30)[1]      # --exit-idle: it ends
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ls.close()
    for i, g in enumerate(got):
        assert g == _pattern(i), (i, len(g or b""), err[-500:])
    grows = re.findall(r"F_SETPIPE_SZ, (\d+)\)\s+= (-?\d+)", trace.read_text())
    up = [int(r) for a, r in grows if int(a) > 65536]
    assert up and all(r == 1 << 20 for r in up), grows
    assert len(up) * ((1 << 20) - 65536) <= 16 << 20, len(up)
    # the rest stayed at the default; grown pipes shrink before reuse
    assert len(up) < n, grows


def test_bulk_relay_keeps_the_small_pipes_of_a_user_over_its_pipe_limit(tmp_path, bulk_alpnd):
    """A user over pipe-user-pages-soft gets 2-page pipes and may not grow
    them (EPERM): the relay goes on with what it has, bytes intact."""
    hog = subprocess.Popen(
        [PY, "-c", "import fcntl, os, sys\n"
         "ps = [os.pipe() for _ in range(80)]\n"
         "n = 0\n"
         "for r, w in ps:\n"
         "    try:\n"
         "        fcntl.fcntl(w, 1031, 1 << 20); n += 1\n"     # F_SETPIPE_SZ
         "    except OSError:\n"
         "        pass\n"
         "for _ in range(100):\n"        # then default pipes, over the limit
         "    r, w = os.pipe(); ps.append((r, w))\n"
         "    if fcntl.fcntl(w, 1032) <= 8192:\n"              # F_GETPIPE_SZ
         "        break\n"
         "print(n, fcntl.fcntl(w, 1032), flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_as_bulk_user)
    try:
        grown, newsize = map(int, hog.stdout.readline().split())
        if newsize > 8192:
            pytest.skip("pipe-user-pages-soft is 0 or above %d pages here: "
                        "the user never goes over it" % (grown * 256))
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        steps = _bulk_through(ls.getsockname()[1], 2)
        addr = next(steps)
        p = subprocess.Popen([bulk_alpnd, "-f", addr, "-a", addr, "--exit-idle", "1"],
                             stdin=ls, stderr=subprocess.PIPE,
                             preexec_fn=_as_bulk_user)
        try:
            got = next(steps)
            err = p.communicate(timeout=30)[1]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            ls.close()
    finally:
        hog.stdin.close()
        hog.wait(10)
    for i, g in enumerate(got):
        assert g == _pattern(i), (i, len(g or b""), err[-500:])
