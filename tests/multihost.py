"""Helpers for tests/test_multihost.py: hosts as network namespaces on one
bridge, pebble and its DNS on one of them, and client scripts that run in a
namespace (HTTPS probes, acme-tls/1 probes).

Lan(prefix4, prefix6)      a switch namespace with bridge br0; .add(name, n)
                           makes a host namespace with eth0 = prefix4.n/24
                           and prefix6 n/64 on the bridge; .cmd(host, argv),
                           .sh(host, line); .close() deletes every namespace.
start_pebble(lan, host, procs, tmp)
                           pebble-challtestsrv (DNS on 127.0.0.1:8053, no
                           default answers) and pebble (ACME API on the
                           host's IPv4 address, validating TLS-ALPN-01 on
                           port 443) in `host`; returns a Pebble with
                           .directory, .ca (PEM path of its API's CA),
                           .set_a(name, addrs), .set_aaaa(name, addrs).
HTTPS_PROBE, ACME_PROBE    client scripts (python3 -c) for a namespace.
"""
import json
import os
import shlex
import subprocess
import uuid

from test_deploy import openssl_ca_and_leaf, run, wait_listen


class Host:
    def __init__(self, name, ns, v4, v6):
        self.name, self.ns, self.v4, self.v6 = name, ns, v4, v6

    def __repr__(self):
        return "%s(%s, %s)" % (self.name, self.v4, self.v6)


class Lan:
    """Network namespaces on one Ethernet segment: a bridge in a namespace
    of its own (the switch), one veth pair per host.  Names are unique per
    run, so parallel runs and leftovers never collide."""

    def __init__(self, prefix4="10.207.0.", prefix6="fd00:a7::"):
        self.tag = uuid.uuid4().hex[:6]
        self.prefix4, self.prefix6 = prefix4, prefix6
        self.made = []
        self.hosts = {}
        self.switch = self._ns("lan")
        run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    def _ns(self, name):
        ns = "mh%s-%s" % (self.tag, name)
        run(["ip", "netns", "add", ns])
        self.made.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def add(self, name, n):
        ns = self._ns(name)
        a, b = "mh%s%da" % (self.tag, n), "mh%s%db" % (self.tag, n)
        run(["ip", "link", "add", a, "netns", ns, "type", "veth", "peer",
             "name", b, "netns", self.switch])
        run(["ip", "-n", ns, "link", "set", a, "name", "eth0"])
        run(["ip", "-n", self.switch, "link", "set", b, "master", "br0"])
        run(["ip", "-n", self.switch, "link", "set", b, "up"])
        h = Host(name, ns, "%s%d" % (self.prefix4, n),
                 "%s%x" % (self.prefix6, n))
        run(["ip", "-n", ns, "addr", "add", h.v4 + "/24", "dev", "eth0"])
        run(["ip", "-n", ns, "-6", "addr", "add", h.v6 + "/64", "dev",
             "eth0", "nodad"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self.hosts[name] = h
        return h

    def cmd(self, host, argv):
        return ["ip", "netns", "exec", host.ns] + [str(a) for a in argv]

    def sh(self, host, line, **kw):
        return run(self.cmd(host, shlex.split(line)), **kw)

    def close(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                           timeout=30)


class Pebble:
    def __init__(self, lan, host, directory, ca):
        self.lan, self.host = lan, host
        self.directory, self.ca = directory, ca

    def _manage(self, path, body):
        # challtestsrv's management API, from inside its namespace
        r = run(self.lan.cmd(self.host, [
            "curl", "-sS", "--fail", "--max-time", "10", "-d",
            json.dumps(body), "http://127.0.0.1:8055/" + path]))
        return r.stdout

    def set_a(self, name, addrs):
        self._manage("add-a", {"host": name, "addresses": list(addrs)})

    def set_aaaa(self, name, addrs):
        self._manage("add-aaaa", {"host": name, "addresses": list(addrs)})


def start_pebble(lan, host, procs, tmp):
    pdir = tmp / "pebble"
    pdir.mkdir()
    openssl_ca_and_leaf(pdir, host.v4)
    (pdir / "config.json").write_text(json.dumps({"pebble": {
        "listenAddress": "%s:14000" % host.v4,
        "managementListenAddress": "127.0.0.1:15000",
        "certificate": str(pdir / "cert.pem"),
        "privateKey": str(pdir / "key.pem"),
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    # No default answers: a name the test did not set does not resolve.
    dns = procs.start(lan.cmd(host, [
        "pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-management",
        "127.0.0.1:8055", "-http01", "", "-https01", "", "-tlsalpn01", "",
        "-defaultIPv4", "", "-defaultIPv6", ""]),
        stdout=open(pdir / "challtestsrv.log", "w"), stderr=subprocess.STDOUT)
    wait_listen(8055, host.ns, dns)
    peb = procs.start(lan.cmd(host, [
        "pebble", "-config", pdir / "config.json", "-dnsserver",
        "127.0.0.1:8053"]),
        env=dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                 PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0"),
        stdout=open(pdir / "pebble.log", "w"), stderr=subprocess.STDOUT)
    wait_listen(14000, host.ns, peb)
    p = Pebble(lan, host, "https://%s:14000/dir" % host.v4, pdir / "ca.pem")
    p.log = pdir / "pebble.log"
    return p


# HTTPS GET / to every target on port 443, round after round, until the
# file argv[1] exists (or 10 minutes passed); one line per request:
#   MONOTONIC TARGET ok BODY  |  MONOTONIC TARGET ERR REASON
# CLOCK_MONOTONIC is system-wide, so the test can place each line in time.
HTTPS_PROBE = r'''
import os, socket, ssl, sys, time
stop, targets = sys.argv[1], sys.argv[2:]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])

def get(host):
    with socket.create_connection((host, 443), timeout=15) as s:
        with ctx.wrap_socket(s, server_hostname="www.example.test") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while True:
                try:
                    b = t.recv(4096)
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    b = b""
                if not b:
                    break
                data += b
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head[:40])
    return body.decode().strip()

end = time.monotonic() + 600
while time.monotonic() < end and not os.path.exists(stop):
    for host in targets:
        t0 = time.monotonic()
        try:
            print("%.3f %s ok %s" % (t0, host, get(host)), flush=True)
        except Exception as e:
            print("%.3f %s ERR %s: %s" % (t0, host, type(e).__name__, e),
                  flush=True)
    time.sleep(0.2)
'''

# One acme-tls/1 handshake with HOST:443 and SNI NAME, as a validator makes
# it; prints "ok SECONDS SHA256-OF-CERT" or "fail SECONDS REASON".
ACME_PROBE = r'''
import hashlib, socket, ssl, sys, time
host, name = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["acme-tls/1"])
t0 = time.monotonic()
try:
    with socket.create_connection((host, 443), timeout=20) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            der = t.getpeercert(True)
            print("ok %.3f %s" % (time.monotonic() - t0,
                                  hashlib.sha256(der).hexdigest()))
except Exception as e:
    print("fail %.3f %s: %s" % (time.monotonic() - t0, type(e).__name__, e))
'''
