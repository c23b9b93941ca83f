"""Several hosts behind one name (issue 14): every edge relays acme-tls/1,
with a PROXY v2 header, to the issuing host's side port, where alpnd
--accept-proxy answers from the certificate directory dehydrated fills.

Topology (one bridge, every host a network namespace, addresses per run):

  ca   10.207.0.100 fd00:a7::64   pebble (ACME, validates on port 443) and
                                  pebble-challtestsrv (its DNS); the HTTPS
                                  and acme-tls/1 probes run here too
  iss  10.207.0.1   fd00:a7::1    the issuing host: dehydrated, alpnd
                                  --accept-proxy --certs on the side ports
                                  8444 (listening-socket mode) and 8445 (per
                                  connection), nftables keeping them to the
                                  edges (contrib/alpnd-side.nft); and an edge
                                  of its own: nginx, alpnd on 443 per
                                  connection with --certs (no relay there)
  e1   10.207.0.11  fd00:a7::b    nginx; alpnd on 443, listening-socket mode,
                                  --acme [fd00:a7::1]:8444
  e2   10.207.0.12  fd00:a7::c    nginx; alpnd on 443 per connection
                                  (systemd-socket-activate --accept --inetd),
                                  --acme 10.207.0.1:8445
  e3   10.207.0.13  fd00:a7::d    nginx; alpnd per connection: tcpserver on
                                  IPv4, systemd-socket-activate --accept
                                  (LISTEN_FDS) on IPv6;
                                  --acme [fd00:a7::1]:8444

pebble (va/va.go, 2.4 as in Debian and still so upstream) resolves the name
for each of its 3 concurrent validations, AAAA first then A, and dials only
addrs[0]: the first AAAA record if there is one, else the first A record;
no fallback to the other addresses or to IPv4.  challtestsrv answers records
in the order they were set.  So several records for one name send every
validation to the first one; the DNS below gives each edge names of its
own, and www.example.test several AAAA and A records (asserted: all its
validations land on the first AAAA).
"""
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from acmelib import parse_log as parse_respond_log
from conftest import ALPND, RESPOND, PY, parse_logs, wait_for, wait_log
from multihost import ACME_PROBE, HTTPS_PROBE, Lan, start_pebble
from test_deploy import (CONTRIB, NO_REBUILD, ROOT, ROOT_ONLY, UNITS,
                         Container, make_sbin, nginx_conf, run, self_signed,
                         subst, unit_entries, wait_listen)

SIDE = 8444            # the issuing host's side port, listening-socket mode
SIDE_INETD = 8445      # and one per connection (e2 relays there)
TOOLS = ("pebble", "pebble-challtestsrv", "dehydrated", "nginx", "nft",
         "tcpserver", "systemd-socket-activate", "curl")


@pytest.fixture
def lan():
    if os.geteuid() != 0:
        pytest.skip(ROOT_ONLY)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail("not installed: %s (tests/deps check)" % " ".join(missing))
    n = Lan()
    yield n
    n.close()


def edge_nginx(lan, host, procs, tmp, cert):
    """nginx on 127.0.0.1:8443 behind alpnd (PROXY v2 from alpnd's
    --send-proxy), answering "HOSTNAME CLIENT-ADDRESS"."""
    d = tmp / ("nginx-" + host.name)
    d.mkdir()
    conf = nginx_conf(d, cert[0], cert[1],
                      ["127.0.0.1:8443 ssl proxy_protocol"],
                      "%s $remote_addr" % host.name,
                      extra="set_real_ip_from 127.0.0.1; "
                            "real_ip_header proxy_protocol;")
    p = procs.start(lan.cmd(host, ["nginx", "-c", conf, "-p", d, "-e",
                                   d / "nginx-error.log"]))
    wait_listen(8443, host.ns, p)


def socket_activate(lan, host, procs, log, listen, mode, args):
    """alpnd under systemd-socket-activate in host: mode "listen" (no
    --accept: listening-socket mode), "inetd" (--accept --inetd: fd 0) or
    "fds" (--accept: LISTEN_FDS)."""
    argv = ["systemd-socket-activate", "-l", listen]
    argv += {"listen": [], "inetd": ["--accept", "--inetd"],
             "fds": ["--accept"]}[mode]
    p = procs.start(lan.cmd(host, argv + [ALPND] + list(args)),
                    stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    wait_log(log, r"^Listening on ")
    return p


def acme_probe(lan, ca, host_addr, name):
    """One acme-tls/1 handshake from the CA's namespace:
    ("ok", seconds, cert sha256) or ("fail", seconds, reason)."""
    r = run(lan.cmd(ca, [PY, "-c", ACME_PROBE, host_addr, name]), timeout=60)
    kind, secs, rest = r.stdout.strip().split(" ", 2)
    return kind, float(secs), rest


def tcp_open(lan, host, addr, port):
    r = run(lan.cmd(host, [PY, "-c",
                           "import socket,sys\n"
                           "try:\n"
                           "    socket.create_connection((sys.argv[1], "
                           "int(sys.argv[2])), timeout=5).close()\n"
                           "    print('open')\n"
                           "except OSError as e:\n"
                           "    print(type(e).__name__)\n",
                           addr, port]))
    return r.stdout.strip()


def acme_lines(text):
    return [l for l in parse_logs(text) if l["route"] == "acme"]


def bare(client):
    """The address of a log's client field: 10.0.0.1:5 / [fd00::1]:5."""
    m = re.fullmatch(r"\[?([0-9a-fA-F:.]+?)\]?:\d+", client)
    return m.group(1) if m else client


@pytest.mark.timeout(900)
def test_several_hosts(tmp_path, lan, procs):
    t_begin = time.monotonic()
    iss = lan.add("iss", 1)
    edges = [lan.add("e%d" % i, 10 + i) for i in (1, 2, 3)]
    e1, e2, e3 = edges
    ca = lan.add("ca", 100)
    cert = self_signed(tmp_path, "www.example.test")
    certs = tmp_path / "alpn-certs"
    certs.mkdir()
    for h in [iss] + edges:
        edge_nginx(lan, h, procs, tmp_path, cert)
    logs = {}

    # The issuing host: side ports trusting PROXY headers, one in each
    # mode; and its own port 443, answering with --certs.
    side_args = ["--accept-proxy", "--certs", certs, "--respond", RESPOND,
                 "--fallback", "127.0.0.1:8443", "--send-proxy", "v2"]
    logs["side"] = tmp_path / "iss-side.log"
    socket_activate(lan, iss, procs, logs["side"], str(SIDE), "listen",
                    side_args)
    logs["side2"] = tmp_path / "iss-side-inetd.log"
    socket_activate(lan, iss, procs, logs["side2"], str(SIDE_INETD),
                    "inetd", side_args)
    logs["iss"] = tmp_path / "iss-443.log"
    socket_activate(lan, iss, procs, logs["iss"], "443", "inetd", [
        "--certs", certs, "--respond", RESPOND,
        "--fallback", "127.0.0.1:8443", "--send-proxy", "v2"])
    # contrib's firewall rule, the edges' addresses put in
    nft = (CONTRIB / "alpnd-side.nft").read_text()
    for i, e in enumerate(edges, 1):
        nft = nft.replace("192.0.2.1%d" % i, e.v4)
        nft = nft.replace("2001:db8::1%d" % i, e.v6)
    nft = nft.replace("tcp dport %d " % SIDE,
                      "tcp dport { %d, %d } " % (SIDE, SIDE_INETD))
    (tmp_path / "side.nft").write_text(nft)
    for _ in range(2):  # loading it twice leaves one copy
        lan.sh(iss, "nft -f %s" % (tmp_path / "side.nft"))
    assert lan.sh(iss, "nft list ruleset").stdout.count("reject") == 1

    # The edges: web traffic to their own nginx (PROXY v2), acme-tls/1 to
    # the side port (PROXY v2), connect deadline 3 s (--hello-timeout).
    def edge_args(acme):
        return ["--fallback", "127.0.0.1:8443", "--send-proxy", "v2",
                "--acme", acme, "--acme-send-proxy", "v2",
                "--hello-timeout", "3"]
    side6 = "[%s]:%d" % (iss.v6, SIDE)
    side4 = "%s:%d" % (iss.v4, SIDE_INETD)
    logs["e1"] = tmp_path / "e1.log"
    socket_activate(lan, e1, procs, logs["e1"], "443", "listen",
                    edge_args(side6))
    logs["e2"] = tmp_path / "e2.log"
    socket_activate(lan, e2, procs, logs["e2"], "443", "inetd",
                    edge_args(side4))
    # e3: tcpserver (IPv4 only in Debian) and, IPv6-only beside it, a
    # systemd-socket-activate --accept passing LISTEN_FDS
    lan.sh(e3, "sysctl -qw net.ipv6.bindv6only=1")
    logs["e3"] = tmp_path / "e3-tcpserver.log"
    ts = procs.start(lan.cmd(e3, ["tcpserver", "-v", "-R", "-H", "-l", "0",
                                  "-D", e3.v4, "443", ALPND]
                             + edge_args(side6)),
                     stdout=subprocess.DEVNULL, stderr=open(logs["e3"], "w"))
    wait_log(logs["e3"], r"tcpserver: status: 0/")
    logs["e3v6"] = tmp_path / "e3-v6.log"
    socket_activate(lan, e3, procs, logs["e3v6"], "[::]:443", "fds",
                    edge_args(side6))

    # The side port: open to the edges, reset for anyone else.
    for port in (SIDE, SIDE_INETD):
        for e in edges:
            assert tcp_open(lan, e, iss.v4, port) == "open"
            assert tcp_open(lan, e, iss.v6, port) == "open"
        assert tcp_open(lan, ca, iss.v4, port) == "ConnectionRefusedError"
        assert tcp_open(lan, ca, iss.v6, port) == "ConnectionRefusedError"

    # HTTPS to every host, both families, from now until the end.
    stop = tmp_path / "probe.stop"
    targets = [a for h in [iss] + edges for a in (h.v4, h.v6)]
    probe_log = tmp_path / "https-probe.log"
    prober = procs.start(lan.cmd(ca, [PY, "-c", HTTPS_PROBE, stop]
                                 + targets),
                         stdout=open(probe_log, "w"),
                         stderr=subprocess.STDOUT)
    wait_for(lambda: probe_log.read_text().count("\n") >= len(targets),
             20, "a first round of HTTPS probes")

    # pebble; names: one per host, and www with several records of each
    # family (pebble takes the first AAAA: e3's).
    peb = start_pebble(lan, ca, procs, tmp_path)
    peb.set_aaaa("iss.example.test", [iss.v6])
    peb.set_a("iss.example.test", [iss.v4])
    peb.set_aaaa("e1.example.test", [e1.v6])
    peb.set_a("e1.example.test", [e1.v4])
    peb.set_a("e2.example.test", [e2.v4])          # IPv4 only
    peb.set_a("e3.example.test", [e3.v4])          # IPv4 only: tcpserver
    peb.set_aaaa("www.example.test", [e3.v6, e2.v6, e1.v6])
    peb.set_a("www.example.test", [e1.v4, e2.v4, e3.v4])

    base = tmp_path / "dehydrated"
    base.mkdir()
    cfg = base / "config"
    cfg.write_text(
        'CA="%s"\nCHALLENGETYPE="tls-alpn-01"\nALPNCERTDIR="%s"\n'
        'BASEDIR="%s"\nCURL_OPTS="--cacert %s"\nKEY_ALGO=prime256v1\n'
        'KEYSIZE=2048\n'
        % (peb.directory, certs, base, peb.ca))
    run(lan.cmd(iss, ["dehydrated", "-f", cfg, "--register",
                      "--accept-terms"]), timeout=60)
    orders = [["www.example.test", "e1.example.test", "iss.example.test"],
              ["e2.example.test", "e3.example.test"]]
    took = []
    for names in orders:
        t0, wall0 = time.monotonic(), time.time()
        argv = ["dehydrated", "-f", cfg, "-c"]
        for n in names:
            argv += ["-d", n]
        r = run(lan.cmd(iss, argv), timeout=300, check=False)
        took.append((names, t0, time.monotonic(), wall0))
        assert r.returncode == 0 and r.stdout.count(
            "Challenge is valid!") == len(names), \
            r.stdout + r.stderr + peb.log.read_text()[-3000:]
        leaf = run(["openssl", "x509", "-noout", "-issuer", "-ext",
                    "subjectAltName", "-in",
                    base / "certs" / names[0] / "cert.pem"]).stdout
        assert "Pebble" in leaf and all("DNS:" + n in leaf
                                        for n in names), leaf
    assert os.listdir(certs) == []  # dehydrated cleaned its challenges

    # Who relayed what: every validation of a name reached the edge its
    # DNS pointed at, over that family, and was relayed with success.
    pebble_addrs = {ca.v4, ca.v6}
    relayed = {}
    for key in ("e1", "e2", "e3", "e3v6"):
        relayed[key] = acme_lines(open(logs[key]).read())
        for l in relayed[key]:
            assert l["result"] == "ok", (key, l)
            assert bare(l["client"]) in pebble_addrs, (key, l)
    by = lambda key: sorted({l["sni"] for l in relayed[key]})
    assert by("e1") == ["e1.example.test"], relayed["e1"]
    assert by("e2") == ["e2.example.test"], relayed["e2"]
    assert by("e3") == ["e3.example.test"], relayed["e3"]
    assert by("e3v6") == ["www.example.test"], relayed["e3v6"]
    assert all(bare(l["client"]) == ca.v4 for k in ("e2", "e3")
               for l in relayed[k])
    assert all(bare(l["client"]) == ca.v6 for k in ("e1", "e3v6")
               for l in relayed[k])
    # the issuing host's own port 443 answered its name itself
    direct = parse_respond_log(open(logs["iss"]).read())
    assert direct and {d["sni"] for d in direct} == {"iss.example.test"}
    assert all(d["result"] == "ok" and bare(d["client"]) == ca.v6
               for d in direct), direct
    # The side port's alpnd and responder saw pebble's addresses (from the
    # PROXY headers), never an edge's, once for every relayed validation.
    side_text = open(logs["side"]).read() + open(logs["side2"]).read()
    side = parse_respond_log(side_text)
    n_relayed = sum(len(v) for v in relayed.values())
    assert len(side) == n_relayed, side_text
    assert all(s["result"] == "ok" for s in side), side_text
    assert {bare(s["client"]) for s in side} == pebble_addrs, side_text
    side_routed = [l for l in parse_logs(side_text) if l["route"] != "-"]
    assert len(side_routed) == n_relayed, side_text
    assert {bare(l["client"]) for l in side_routed} == pebble_addrs, \
        side_text
    # e2's went to the per-connection side port, the others' to the
    # listening one
    assert sorted(s["sni"] for s in parse_respond_log(
        open(logs["side2"]).read())) == [l["sni"] for l in relayed["e2"]]

    # Cut two edges off the issuing host: e3 by an unreachable route
    # (connect fails at once), e1 by an nftables drop (connect hangs until
    # alpnd's deadline, --hello-timeout 3).  Meanwhile e2 keeps relaying.
    run([RESPOND, "--certs", certs, "--make", "probe.example.test",
         "tok.thumb"])
    der_sha = run(["sh", "-c", "openssl x509 -outform der -in %s | "
                   "sha256sum" % (certs / "probe.example.test.crt.pem")]
                  ).stdout.split()[0]
    assert acme_probe(lan, ca, e2.v4, "probe.example.test")[::2] == \
        ("ok", der_sha)
    t_cut = time.monotonic()
    lan.sh(e3, "ip -6 route add unreachable %s/128" % iss.v6)
    lan.sh(e1, "nft add table inet cut")
    lan.sh(e1, "nft add chain inet cut out { type filter hook output "
               "priority filter ; }")
    lan.sh(e1, "nft add rule inet cut out ip6 daddr %s tcp dport %d drop"
           % (iss.v6, SIDE))
    cut = {}
    for key, host, addr in (("e3", e3, e3.v4), ("e3v6", e3, e3.v6),
                            ("e1", e1, e1.v6)):
        before = len(acme_lines(open(logs[key]).read()))
        cut[key] = acme_probe(lan, ca, addr, "probe.example.test")
        assert cut[key][0] == "fail", (key, cut[key])
        line = wait_for(lambda: acme_lines(open(logs[key]).read())[before:],
                        30, "the %s log line" % key)[0]
        assert line["result"].startswith("backend %s: " % side6), line
        cut[key] += (line["result"], float(line["secs"]))
    # e3: no route, refused at once; e1: the SYN dropped, given up at the
    # connect deadline (3 s).  Both well under a validator's 10 s dial.
    # (Bounds with room for a loaded machine; the figures are printed.)
    for key in ("e3", "e3v6"):
        assert cut[key][1] < 2.5 and cut[key][4] < 2.0, cut[key]
        assert "unreachable" in cut[key][3].lower() or \
            "no route" in cut[key][3].lower(), cut[key]
    assert 2.9 <= cut["e1"][4] < 5.0 and cut["e1"][1] < 7.0, cut["e1"]
    assert "timed out" in cut["e1"][3].lower(), cut["e1"]
    # tcpserver saw alpnd exit 69 (EX_UNAVAILABLE): wait status 69 << 8
    wait_log(logs["e3"], r"tcpserver: end \d+ status %d$" % (69 << 8))
    assert acme_probe(lan, ca, e2.v6, "probe.example.test")[::2] == \
        ("ok", der_sha)
    t_restore = time.monotonic()
    lan.sh(e3, "ip -6 route del unreachable %s/128" % iss.v6)
    lan.sh(e1, "nft delete table inet cut")
    for addr in (e1.v6, e3.v4, e3.v6):
        assert acme_probe(lan, ca, addr, "probe.example.test")[::2] == \
            ("ok", der_sha), addr

    # HTTPS went to each host's own nginx all along, with the client's
    # address from the fallback's PROXY header.
    stop.write_text("")
    prober.wait(30)
    rounds = [l.split(" ", 3) for l in probe_log.read_text().splitlines()]
    name_of = {a: h.name for h in [iss] + edges for a in (h.v4, h.v6)}
    for t, addr, kind, rest in rounds:
        fam_src = ca.v6 if ":" in addr else ca.v4
        assert (kind, rest) == ("ok", "%s %s" % (name_of[addr], fam_src)), \
            (t, addr, kind, rest)
    stamps = sorted(float(r[0]) for r in rounds)
    for a, b, what in [(took[0][1], took[-1][2], "issuance"),
                       (t_cut, t_restore, "the cut")]:
        assert any(a <= s <= b for s in stamps), "no HTTPS probe during " \
            + what

    # The figures for the report
    print("\nvalidations relayed: e1 %d (IPv6), e2 %d (IPv4), "
          "e3 %d (IPv4, tcpserver) + %d (IPv6, LISTEN_FDS); "
          "answered on iss:443 itself %d; side-port responses %d"
          % (len(relayed["e1"]), len(relayed["e2"]), len(relayed["e3"]),
             len(relayed["e3v6"]), len(direct), len(side)))
    # pebble's log: when it took each validation (whole seconds)
    tasks = {m.group(2): time.mktime(time.strptime(m.group(1),
                                                   "%Y/%m/%d %H:%M:%S"))
             for m in re.finditer(r"^Pebble (\S+ \S+) Pulled a task .*?"
                                  r'Value:"([^"]+)"', peb.log.read_text(),
                                  re.M)}
    for names, a, b, wall in took:
        print("issuance %s: %.2f s (validations started at %s s)"
              % (" ".join(names), b - a, ", ".join(
                  "+%.0f" % (tasks[n] - wall) for n in names if n in tasks)))
    print("cut: e3 unreachable route %.3f s client / %.3f s alpnd (%s); "
          "e1 nft drop %.3f s client / %.3f s alpnd (%s)"
          % (cut["e3"][1], cut["e3"][4], cut["e3"][3], cut["e1"][1],
             cut["e1"][4], cut["e1"][3]))
    print("HTTPS probes: %d, all to the host's own nginx; whole test %.1f s"
          % (len(rounds), time.monotonic() - t_begin))


def test_side_units(tmp_path):
    """contrib's units for the issuing host's side port: systemd-analyze
    verify passes, and the service is alpnd-listen.service but for its
    options (so a hardening change there is not forgotten here)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing (tests/deps check)")
    sbin = make_sbin(tmp_path)
    for u in ("alpnd-side.socket", "alpnd-side.service"):
        (tmp_path / u).write_text(subst((CONTRIB / u).read_text(), sbin,
                                        tmp_path / "etc"))
    man8 = tmp_path / "man" / "man8"
    man8.mkdir(parents=True)
    shutil.copy(ROOT / "alpnd.8", man8)
    man = "--man=yes" if shutil.which("man") else "--man=no"
    for u in ("alpnd-side.socket", "alpnd-side.service"):
        r = run(["systemd-analyze", "verify", man, u], cwd=tmp_path,
                check=False, env=dict(os.environ,
                                      MANPATH=str(tmp_path / "man")))
        assert r.returncode == 0 and r.stderr.strip() == "", (u, r.stderr)

    def service(path):
        return [(k, v) for sec, k, v in unit_entries(path)
                if sec == "Service" and k not in ("Environment",
                                                  "ExecStart")]
    assert service(CONTRIB / "alpnd-side.service") == \
        service(UNITS / "alpnd-listen.service")
    side = dict((k, v) for sec, k, v in
                unit_entries(CONTRIB / "alpnd-side.service")
                if k == "ExecStart")
    assert "$ALPND_SIDE_OPTS" in side["ExecStart"]
    opts = [v for sec, k, v in unit_entries(CONTRIB / "alpnd-side.service")
            if k == "Environment" and "ALPND_SIDE_OPTS" in v][0]
    assert "--accept-proxy" in opts and "--certs" in opts
    sock = [(k, v) for sec, k, v in
            unit_entries(CONTRIB / "alpnd-side.socket") if sec == "Socket"]
    assert ("Accept", "no") in sock and ("IPAddressDeny", "any") in sock
    port = dict(sock)["ListenStream"]
    assert "tcp dport %s " % port in (CONTRIB / "alpnd-side.nft").read_text()


# Run inside the machine: one host that is both an edge (port 443 relays
# acme-tls/1 to the side port at its own address) and the issuing host
# (contrib's side units and nftables rule, itself as the only edge).
CT_SETUP = r"""
set -e
groupadd --system alpnd-certs
install -d -m 2750 -g alpnd-certs /var/lib/dehydrated/alpn-certs
alpnd-respond --certs /var/lib/dehydrated/alpn-certs \
    --make www.example.test token.thumbprint
ex=/usr/local/share/doc/alpnd/examples
acme="--acme [fd00:a3::2]:8444 --acme-send-proxy v2"
echo "ALPND_OPTS=\"--fallback 127.0.0.1:8443 $acme --hello-timeout 3\"" \
    > /etc/default/alpnd
sed 's/2001:db8::11/fd00:a3::2/' $ex/alpnd-side.socket \
    > /etc/systemd/system/alpnd-side.socket
cp $ex/alpnd-side.service /etc/systemd/system/
sed 's/2001:db8::11/fd00:a3::2/' $ex/alpnd-side.nft > /root/side.nft
nft -f /root/side.nft
systemctl daemon-reload
systemctl start alpnd-listen.socket alpnd-side.socket
"""

CT_DROPIN = r"""
set -e
d=/etc/systemd/system/alpnd-listen.service.d
mkdir -p $d
sed 's/2001:db8::1 192.0.2.1/fd00:a3::2/' \
    /usr/local/share/doc/alpnd/examples/alpnd-edge.conf > $d/edge.conf
systemctl daemon-reload
systemctl stop alpnd-listen.service
"""

TCP_OPEN = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])),
                             timeout=4).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""


def cgroup2():
    """Is the unified cgroup hierarchy mounted (what systemd's IP access
    lists need)?"""
    return run(["stat", "-fc", "%T", "/sys/fs/cgroup"],
               check=False).stdout.strip() == "cgroup2fs"


@pytest.mark.parametrize("firewall", [False, True],
                         ids=["units", "ip-firewall"])
def test_several_hosts_units(tmp_path, procs, firewall):
    """contrib's units and drop-in under a real systemd (systemd-nspawn,
    test_deploy's Container), the validator outside the machine: the edge
    relays with the drop-in in place, the side port's responder logs the
    validator, nftables resets the outside.  ip-firewall: also what the
    units' IPAddressAllow=/IPAddressDeny= do (systemd needs the unified
    cgroup hierarchy for them): without the edge drop-in the sandbox
    refuses the relay's connect and the edge logs it; with the nftables
    table gone, the side socket unit still drops the outside."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_ONLY)
    if firewall and not cgroup2():
        pytest.skip("IPAddressAllow=/IPAddressDeny= need cgroup v2 (the "
                    "unified hierarchy); /sys/fs/cgroup here is not cgroup2fs")
    for tool in ("systemd-nspawn", "nsenter", "unshare", "nft"):
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (tests/deps check)" % tool)
    dest = tmp_path / "dest"
    run(["make", "-s"] + NO_REBUILD + ["install", "DESTDIR=%s" % dest,
         "SYSTEMDUNITDIR=/etc/systemd/system", "PREFIX=/usr/local"],
        cwd=ROOT, timeout=120)
    ct = Container(tmp_path, procs, dest)
    try:
        _several_hosts_units(ct, tmp_path, firewall)
    finally:
        ct.close()


def _several_hosts_units(ct, tmp_path, firewall):
    probe = tmp_path / "acme-probe.py"
    probe.write_text(ACME_PROBE)
    opener = tmp_path / "tcp-open.py"
    opener.write_text(TCP_OPEN)

    def acme(host):
        r = ct.host("%s %s %s www.example.test" % (PY, probe, host),
                    timeout=60)
        return r.stdout.strip().split(" ", 2)

    ct.sh(CT_SETUP)
    want = ct.sh("openssl x509 -outform der -in /var/lib/dehydrated/"
                 "alpn-certs/www.example.test.crt.pem | sha256sum"
                 ).stdout.split()[0]
    if firewall:
        # No drop-in: IPAddressAllow=localhost stops the relay's connect
        kind, secs, why = acme("fd00:a3::2")
        assert kind == "fail" and float(secs) < 3, (kind, secs, why)
        j = ct.sh("journalctl --no-pager -t alpnd").stdout
        assert re.search(r"www\.example\.test acme-tls/1 acme .*backend "
                         r"\[fd00:a3::2\]:8444: ", j), j
    # contrib's drop-in, with this "issuing host's" address
    ct.sh(CT_DROPIN)
    for host in ("fd00:a3::2", "10.205.0.2"):
        kind, secs, got = acme(host)
        assert (kind, got) == ("ok", want), (host, kind, secs, got)
    # the side port's responder logged the validator, not the edge
    j = ct.sh("journalctl --no-pager -t alpnd-respond").stdout
    clients = re.findall(r"alpnd-respond\[\d+\]: (\S+) www\.example\.test "
                         r"ok ", j)
    assert sorted(bare(c) for c in clients) == ["10.205.0.1",
                                                "fd00:a3::1"], j
    # the outside cannot reach the side port
    for host in ("10.205.0.2", "fd00:a3::2"):
        r = ct.host("%s %s %s 8444" % (PY, opener, host))
        assert r.stdout.strip() == "ConnectionRefusedError", (host, r)
    if firewall:
        ct.sh("nft delete table inet alpnd_side")
        for host in ("10.205.0.2", "fd00:a3::2"):
            r = ct.host("%s %s %s 8444" % (PY, opener, host))
            assert r.stdout.strip() in ("TimeoutError", "timeout"), (host, r)
    assert ct.sh("systemctl is-active alpnd-side.socket"
                 ).stdout.strip() == "active"
