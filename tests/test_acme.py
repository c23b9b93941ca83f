"""Real ACME end to end: Debian's pebble validates tls-alpn-01 through alpnd
and real clients get real certificates.

  dehydrated -t tls-alpn-01   writes the challenge pair -> alpnd --certs
  uacme + contrib/uacme-hook  -> alpnd-respond --make / --clean
  lego --tls --tls.port       its own listener -> alpnd --acme

pebble gets a test CA and an API certificate made during the run; names are
resolved by pebble-challtestsrv (A 127.0.0.1, AAAA ::1 - pebble's validator
tries IPv6 first), so alpnd listens dual-stack on pebble's tlsPort.  uacme
(Debian's reads only the system CA bundle) runs in a private mount namespace
where a bundle with the test CA is bind-mounted over the system one; the
machine's trust store is never touched.
"""

import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import acmelib as A

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

for tool in ("pebble", "pebble-challtestsrv"):
    if shutil.which(tool) is None:
        pytestmark = pytest.mark.skip(reason="%s not installed" % tool)
if not (os.access(A.RESPOND, os.X_OK) and os.access(A.ALPND, os.X_OK)):
    pytestmark = pytest.mark.skip(reason="alpnd/alpnd-respond not built")

TIMINGS = []        # (client, name, issuance seconds, validation handshakes)


def _ca_and_server_cert(d):
    """A throw-away CA and a localhost certificate for pebble's API."""
    now = datetime.datetime.utcnow()
    day = datetime.timedelta(days=1)
    cakey = ec.generate_private_key(ec.SECP256R1())
    caname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                           "alpnd test CA %s" % uuid.uuid4())])
    ca = (x509.CertificateBuilder().subject_name(caname).issuer_name(caname)
          .public_key(cakey.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
          .add_extension(x509.KeyUsage(False, False, False, False, False,
                                       True, True, False, False), True)
          .sign(cakey, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    crt = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                       "localhost")]))
           .issuer_name(caname).public_key(key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - day).not_valid_after(now + day)
           .add_extension(x509.SubjectAlternativeName([
               x509.DNSName("localhost"),
               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
           .add_extension(x509.ExtendedKeyUsage(
               [ExtendedKeyUsageOID.SERVER_AUTH]), False)
           .sign(cakey, hashes.SHA256()))
    paths = {k: os.path.join(d, k) for k in ("ca.pem", "cert.pem", "key.pem",
                                             "bundle.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(crt.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    # the bundle uacme sees in its namespace: the system's plus ours
    with open(paths["bundle.pem"], "wb") as f:
        if os.path.exists(SYSTEM_BUNDLE):
            with open(SYSTEM_BUNDLE, "rb") as g:
                f.write(g.read())
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    return paths


class Pebble:
    def __init__(self, d):
        self.d = d
        self.procs = []
        self.tls = _ca_and_server_cert(d)
        # alpnd's listener first, then pebble with it as tlsPort: no race
        self.front = Front(d)
        self.tls_port = self.front.port
        dns = A.free_port(socket.AF_INET)
        mgmt = A.free_port(socket.AF_INET)
        self.port = A.free_port(socket.AF_INET)
        self.chall = self._start("challtestsrv", [
            "pebble-challtestsrv", "-dns01", "127.0.0.1:%d" % dns,
            "-management", "127.0.0.1:%d" % mgmt, "-http01", "",
            "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "127.0.0.1",
            "-defaultIPv6", "::1"])
        cfg = {"pebble": {
            "listenAddress": "127.0.0.1:%d" % self.port,
            "managementListenAddress": "127.0.0.1:%d"
            % A.free_port(socket.AF_INET),
            "certificate": self.tls["cert.pem"],
            "privateKey": self.tls["key.pem"],
            "httpPort": A.free_port(socket.AF_INET),
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        cfgpath = os.path.join(d, "pebble-config.json")
        with open(cfgpath, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                   PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self.pebble = self._start("pebble", [
            "pebble", "-config", cfgpath, "-dnsserver", "127.0.0.1:%d" % dns,
            "-strict=false"], env=env)
        A.wait_port(dns, proc=self.chall.proc)
        A.wait_port(self.port, proc=self.pebble.proc)
        self.url = "https://127.0.0.1:%d/dir" % self.port
        ctx = ssl.create_default_context(cafile=self.tls["ca.pem"])
        with urllib.request.urlopen(self.url, context=ctx, timeout=10) as r:
            assert "newOrder" in json.load(r)

    class Proc:
        def __init__(self, proc, log):
            self.proc = proc
            self.logpath = log

        def text(self):
            with open(self.logpath, errors="replace") as f:
                return f.read()

    def _start(self, name, argv, env=None):
        log = os.path.join(self.d, name + ".log")
        fh = open(log, "wb")
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env)
        fh.close()
        pr = self.Proc(p, log)
        self.procs.append(pr)
        return pr

    def close(self):
        self.front.close()
        for pr in self.procs:
            if pr.proc.poll() is None:
                pr.proc.terminate()
                try:
                    pr.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pr.proc.kill()
                    pr.proc.wait()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    p = Pebble(str(tmp_path_factory.mktemp("pebble")))
    yield p
    p.close()
    if TIMINGS:
        lines = ["ACME issuance through alpnd (pebble, %s):"
                 % time.strftime("%Y-%m-%d %H:%M:%S")]
        for client, name, secs, hs in TIMINGS:
            lines.append("  %-10s %-36s issued in %5.2fs; validations: %s"
                         % (client, name, secs, ", ".join(hs) or "-"))
        print("\n" + "\n".join(lines))
        try:
            os.makedirs(os.path.join(A.ROOT, "build"), exist_ok=True)
            with open(os.path.join(A.ROOT, "build", "acme-timings.txt"),
                      "w") as f:
                f.write("\n".join(lines) + "\n")
        except OSError:
            pass


FRONT_SH = """#!/bin/sh
# one connection: exec the command line the current test wrote, one
# argument a line (alpnd then execs alpnd-respond in this same process)
set -f
IFS='
'
exec $(cat "$1")
"""


class Front:
    """alpnd on pebble's tlsPort the way a host runs it: a socket unit with
    Accept=yes (systemd-socket-activate --accept, [::] dual-stack), one alpnd
    per connection, which execs alpnd-respond for acme-tls/1.  The listener
    stays up for the module (pebble's tlsPort is fixed); each test sets the
    alpnd command line (use) and reads only its own log lines."""

    def __init__(self, d):
        self.argsfile = os.path.join(d, "front.args")
        self.logpath = os.path.join(d, "front.log")
        script = os.path.join(d, "front.sh")
        with open(script, "w") as f:
            f.write(FRONT_SH)
        os.chmod(script, 0o755)
        self.use(["/bin/true"])
        self.port = A.free_port(socket.AF_INET6)
        fh = open(self.logpath, "wb")
        self.p = subprocess.Popen(
            ["systemd-socket-activate", "-l", "[::]:%d" % self.port,
             "--accept", script, self.argsfile],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh,
            start_new_session=True)
        fh.close()
        self.since = 0
        try:
            A.wait_port(self.port, host="::1", proc=self.p)
            A.wait_port(self.port, host="127.0.0.1", proc=self.p)
        except Exception:
            self.close()
            raise

    def use(self, argv):
        tmp = self.argsfile + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(str(a) for a in argv) + "\n")
        os.rename(tmp, self.argsfile)
        if hasattr(self, "p"):
            self.since = os.path.getsize(self.logpath)

    def text(self):
        with open(self.logpath, errors="replace") as f:
            f.seek(self.since)
            return f.read()

    def responder_logs(self, name, n=1, timeout=10):
        """alpnd-respond's lines for SNI name: at least n, or whatever
        arrived within the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            logs = [l for l in A.parse_log(self.text()) if l["sni"] == name]
            if len(logs) >= n or time.monotonic() > deadline:
                return logs
            time.sleep(0.05)

    def router_logs(self, route):
        from conftest import parse_logs
        return [l for l in parse_logs(self.text()) if l["route"] == route]

    def close(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)


@pytest.fixture
def front(pebble, tmp_path):
    """Per test: a fresh challenge directory; start(args) puts alpnd with
    those arguments on pebble's tlsPort (default --certs DIR)."""
    certs = tmp_path / "alpn-certs"
    certs.mkdir()

    def start(*args):
        pebble.front.use([A.ALPND, "--fallback", "127.0.0.1:9",
                          "--hello-timeout", "10"] + list(args or (
                              "--certs", str(certs), "--respond",
                              A.RESPOND)))
        return pebble.front
    start.certs = str(certs)
    yield start
    pebble.front.use(["/bin/true"])


def validations(f, name):
    """Pebble dials each challenge three times (tries IPv6 first): wait for
    three responder lines, accept at least one."""
    logs = f.responder_logs(name, n=3, timeout=3)
    return logs or f.responder_logs(name, n=1, timeout=7)


def fresh(prefix):
    return "%s-%s.example.test" % (prefix, uuid.uuid4().hex[:8])


def check_issued(pem_path, name, pebble):
    with open(pem_path, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read()) \
            if hasattr(x509, "load_pem_x509_certificates") else \
            [x509.load_pem_x509_certificate(f.read())]
    leaf = chain[0]
    sans = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert name in sans.get_values_for_type(x509.DNSName)
    assert leaf.issuer != leaf.subject          # issued by pebble's CA
    assert "Pebble" in leaf.issuer.rfc4514_string()
    return leaf


def record(client, name, t0, logs):
    TIMINGS.append((client, name, time.monotonic() - t0,
                    [l if isinstance(l, str) else
                     "%s %s %.1fms" % (l["client"].rsplit(":", 1)[0],
                                       l["result"], l["ms"]) for l in logs]))


def test_dehydrated(pebble, front, tmp_path):
    if shutil.which("dehydrated") is None:
        pytest.skip("dehydrated not installed")
    base = tmp_path / "dehydrated"
    base.mkdir()
    cfg = base / "config"
    cfg.write_text(
        'CA="%s"\nCHALLENGETYPE="tls-alpn-01"\nALPNCERTDIR="%s"\n'
        'BASEDIR="%s"\nCURL_OPTS="--cacert %s"\nKEYSIZE=2048\n'
        % (pebble.url, front.certs, base, pebble.tls["ca.pem"]))
    r = A.run(["dehydrated", "-f", str(cfg), "--register", "--accept-terms"],
              timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    f = front()
    name = fresh("dehydrated")
    t0 = time.monotonic()
    r = A.run(["dehydrated", "-f", str(cfg), "-c", "-d", name, "-t",
               "tls-alpn-01"], timeout=60)
    logs = validations(f, name)
    record("dehydrated", name, t0, logs)
    assert r.returncode == 0, r.stdout + r.stderr
    check_issued(str(base / "certs" / name / "fullchain.pem"), name, pebble)
    assert any(l["sni"] == name and l["result"] == "ok" for l in logs), logs
    # the validator resolved AAAA ::1 and came over IPv6 (dual-stack alpnd)
    assert any(l["client"].startswith("[::1]:") for l in logs), logs
    # dehydrated removed its challenge pair afterwards
    assert os.listdir(front.certs) == []


def uacme(pebble, tmp_path, args, hook, env, timeout=60):
    """uacme in a private mount namespace with the test CA in the bundle."""
    confdir = tmp_path / "uacme"
    confdir.mkdir(exist_ok=True)
    script = ('mount --bind "$1" %s && shift && exec "$@"' % SYSTEM_BUNDLE)
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
            "sh", pebble.tls["bundle.pem"], "uacme", "-v", "-c",
            str(confdir), "-a", pebble.url, "-y", "-t", "EC"]
    if hook:
        argv += ["-h", hook]
    return A.run(argv + args, timeout=timeout, env=dict(os.environ, **env))


@pytest.fixture
def uacme_account(pebble, tmp_path):
    r = uacme(pebble, tmp_path, ["new"], None, {})
    if r.returncode != 0 and "unshare" in r.stderr:
        pytest.skip("no mount namespaces here: " + r.stderr.strip())
    assert r.returncode == 0, r.stdout + r.stderr


def test_uacme_with_contrib_hook(pebble, front, tmp_path, uacme_account):
    f = front()
    name = fresh("uacme")
    env = {"ALPND_CERTS": front.certs, "ALPND_RESPOND": A.RESPOND}
    t0 = time.monotonic()
    r = uacme(pebble, tmp_path, ["issue", name], A.UACME_HOOK, env)
    logs = validations(f, name)
    record("uacme", name, t0, logs)
    assert r.returncode == 0, r.stdout + r.stderr
    check_issued(str(tmp_path / "uacme" / name / "cert.pem"), name, pebble)
    assert any(l["sni"] == name and l["result"] == "ok" for l in logs), logs
    # the hook cleaned up after itself; the machine's bundle is untouched
    assert os.listdir(front.certs) == []
    with open(SYSTEM_BUNDLE, "rb") as f:
        assert b"alpnd test CA" not in f.read()


def test_uacme_ip_identifier(pebble, front, tmp_path, uacme_account):
    """RFC 8738: an IP identifier, validated through its reverse name."""
    f = front()
    env = {"ALPND_CERTS": front.certs, "ALPND_RESPOND": A.RESPOND}
    t0 = time.monotonic()
    r = uacme(pebble, tmp_path, ["issue", "127.0.0.1"], A.UACME_HOOK, env)
    logs = validations(f, "1.0.0.127.in-addr.arpa")
    record("uacme-ip", "127.0.0.1", t0, logs)
    if r.returncode != 0 and re.search(r"(?i)unsupported|rejectedIdentifier|"
                                       r"malformed", r.stderr) and not logs:
        pytest.skip("this pebble/uacme does not do IP identifiers: "
                    + r.stderr[-300:])
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(l["sni"] == "1.0.0.127.in-addr.arpa" and l["result"] == "ok"
               for l in logs), logs
    with open(str(tmp_path / "uacme" / "127.0.0.1" / "cert.pem"), "rb") as f:
        leaf = x509.load_pem_x509_certificate(f.read())
    import ipaddress
    assert ipaddress.ip_address("127.0.0.1") in leaf.extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.IPAddress)


def test_wrong_key_authorization_is_invalid(pebble, front, tmp_path,
                                            uacme_account):
    """A hook that serves the wrong digest: the handshake succeeds, pebble
    compares the acmeIdentifier and marks the challenge invalid."""
    hook = tmp_path / "wrong-hook"
    hook.write_text(
        '#!/bin/sh\n[ "$2" = tls-alpn-01 ] || exit 1\n'
        'case $1 in begin) exec "$ALPND_RESPOND" --certs "$ALPND_CERTS" '
        '--make -- "$3" "wrong.$5" ;; *) exec "$ALPND_RESPOND" --certs '
        '"$ALPND_CERTS" --clean -- "$3" ;; esac\n')
    hook.chmod(0o755)
    f = front()
    name = fresh("wrong")
    env = {"ALPND_CERTS": front.certs, "ALPND_RESPOND": A.RESPOND}
    r = uacme(pebble, tmp_path, ["issue", name], str(hook), env)
    logs = f.responder_logs(name)
    assert r.returncode != 0
    assert not (tmp_path / "uacme" / name / "cert.pem").exists()
    # alpnd served it (so the refusal is about the digest) ...
    assert any(l["sni"] == name and l["result"] == "ok" for l in logs), logs
    # ... and pebble said why
    out = r.stdout + r.stderr + pebble.pebble.text()
    assert re.search(r'failed with status invalid|"status":\s*"invalid"',
                     out), r.stderr[-2000:]
    assert re.search(r"(?i)incorrect validation certificate|"
                     r"acmeValidationV1|expected acmeValidationV1", out), \
        r.stderr[-2000:]


def test_lego_behind_alpnd_acme(pebble, front, tmp_path):
    if shutil.which("lego") is None:
        pytest.skip("lego not installed")
    port = A.free_port(socket.AF_INET)
    f = front("--acme", "127.0.0.1:%d" % port)
    name = fresh("lego")
    env = dict(os.environ, LEGO_CA_CERTIFICATES=pebble.tls["ca.pem"])
    t0 = time.monotonic()
    r = A.run(["lego", "--server", pebble.url, "--accept-tos", "--email",
               "admin@example.test", "--domains", name, "--tls",
               "--tls.port", "127.0.0.1:%d" % port, "--path",
               str(tmp_path / "lego"), "run"], timeout=90, env=env)
    relayed = f.router_logs("acme")
    record("lego", name, t0, [
        "%s relayed %s %.1fms" % (l["client"].rsplit(":", 1)[0], l["result"],
                                  float(l["secs"]) * 1e3) for l in relayed])
    assert r.returncode == 0, r.stdout + r.stderr
    check_issued(str(tmp_path / "lego" / "certificates" / (name + ".crt")),
                 name, pebble)
    # the validation went through alpnd's --acme relay (no responder here)
    assert relayed, f.text()
    assert A.parse_log(f.text()) == []
