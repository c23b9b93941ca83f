"""Helpers for the responder and ACME suites (test_respond.py, test_acme.py).

Real processes only: alpnd-respond is spawned per connection by a tiny
inetd (Inetd below) or by systemd-socket-activate; keys and certificates are
generated during the run with python3-cryptography.
"""

import hashlib
import ipaddress
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ALPND_BUILD=asan runs everything against the sanitizer builds (as conftest)
BUILD = os.path.join(ROOT, "build", "asan") \
    if os.environ.get("ALPND_BUILD") == "asan" else ROOT
RESPOND = os.path.join(BUILD, "alpnd-respond")
RESPOND_ASAN = os.path.join(ROOT, "build", "asan", "alpnd-respond")
ALPND = os.path.join(BUILD, "alpnd")
UACME_HOOK = os.path.join(ROOT, "contrib", "uacme-hook")
ACME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACME_ALPN = "acme-tls/1"

# TLS alert descriptions (RFC 8446 section 6)
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_UNRECOGNIZED_NAME = 112
ALERT_NO_APPLICATION_PROTOCOL = 120

LOG_RE = re.compile(
    r'^alpnd-respond\[(\d+)\]: (\S+) (\S+) (\S+) "(.*)" ([0-9.]+)ms$')


def free_port(family=socket.AF_INET6):
    """An ephemeral port that was free a moment ago on both stacks."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        else:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, host="127.0.0.1", timeout=10.0, proc=None):
    """Poll until something accepts on host:port (readiness, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening"
                               % proc.returncode)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError("nothing listening on %s:%d" % (host, port))


def parse_log(text):
    """The per-connection stderr lines of alpnd-respond, parsed."""
    out = []
    for line in text.splitlines():
        m = LOG_RE.match(line)
        if m:
            out.append(dict(pid=int(m.group(1)), client=m.group(2),
                            sni=m.group(3), result=m.group(4),
                            reason=m.group(5), ms=float(m.group(6))))
    return out


class Child:
    def __init__(self, proc, started):
        self.proc = proc
        self.started = started
        self.stderr = ""
        self.rc = None
        self.done = threading.Event()

    def log(self):
        logs = parse_log(self.stderr)
        return logs[0] if logs else None


class Inetd:
    """A minimal inetd: a dual-stack listener that spawns argv for every
    accepted connection with the connection as stdin (Accept=yes style)."""

    def __init__(self, argv, env=None, host="::"):
        self.argv = argv
        self.env = env
        self.children = []
        self.cond = threading.Condition()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                p = subprocess.Popen(self.argv, stdin=conn,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=self.env,
                                     close_fds=True)
            finally:
                conn.close()
            ch = Child(p, time.monotonic())
            with self.cond:
                self.children.append(ch)
                self.cond.notify_all()
            threading.Thread(target=self._reap, args=(ch,),
                             daemon=True).start()

    def _reap(self, ch):
        err = ch.proc.stderr.read()
        ch.proc.stderr.close()
        ch.rc = ch.proc.wait()
        ch.stderr = err.decode("utf-8", "replace")
        ch.done.set()
        with self.cond:
            self.cond.notify_all()

    def wait(self, n=1, timeout=15.0):
        """Wait until n children (in total) have exited; return them."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                done = [c for c in self.children if c.done.is_set()]
                if len(done) >= n:
                    return done
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%d of %d children done"
                                       % (len(done), n))
                self.cond.wait(left)

    def last(self, timeout=15.0):
        """The child of the most recent connection, once it has exited."""
        n = len(self.children) or 1
        done = self.wait(n, timeout)
        return done[-1] if done else None

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.kill()
            try:
                c.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------- keys/certs

_KEYS = {}


def key(kind="ec", slot=0):
    """A cached private key: 'ec' (P-256), 'ec384', 'rsa' (2048)."""
    k = (kind, slot)
    if k not in _KEYS:
        if kind == "ec":
            _KEYS[k] = ec.generate_private_key(ec.SECP256R1())
        elif kind == "ec384":
            _KEYS[k] = ec.generate_private_key(ec.SECP384R1())
        elif kind == "rsa":
            _KEYS[k] = rsa.generate_private_key(65537, 2048)
        else:
            raise ValueError(kind)
    return _KEYS[k]


def key_authorization_digest(keyauth):
    return hashlib.sha256(keyauth.encode()).digest()


def octet_string(b):
    assert len(b) < 128
    return bytes([0x04, len(b)]) + b


def challenge_cert(name, digest, pkey, *, san="dns", san_value=None,
                   extra_san=None, ext="ok", ext_value=None, signer=None,
                   issuer_cn=None, days=7):
    """Build a TLS-ALPN-01 certificate for name with field-level faults.

    san: 'dns' (dNSName name), 'ip' (iPAddress san_value), 'none'.
    ext: 'ok' (critical 32-byte OCTET STRING), 'missing', 'noncritical',
         'raw' (ext_value DER as is, critical).
    signer: another private key to sign with (not self-signed);
    issuer_cn: issuer common name (default = subject).
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            name[:64])])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                           issuer_cn)]) if issuer_cn \
        else subject
    now = __import__("datetime").datetime.utcnow()
    delta = __import__("datetime").timedelta
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(pkey.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - delta(hours=1))
         .not_valid_after(now + delta(days=days)))
    names = []
    if san == "dns":
        names.append(x509.DNSName(san_value or name))
    elif san == "ip":
        names.append(x509.IPAddress(ipaddress.ip_address(san_value)))
    if extra_san:
        names.extend(extra_san)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names),
                            critical=False)
    if ext == "ok":
        b = b.add_extension(x509.UnrecognizedExtension(
            ACME_OID, octet_string(digest)), critical=True)
    elif ext == "noncritical":
        b = b.add_extension(x509.UnrecognizedExtension(
            ACME_OID, octet_string(digest)), critical=False)
    elif ext == "raw":
        b = b.add_extension(x509.UnrecognizedExtension(ACME_OID, ext_value),
                            critical=True)
    elif ext != "missing":
        raise ValueError(ext)
    return b.sign(signer or pkey, hashes.SHA256())


def write_pair(d, fname, cert, pkey, extra_certs=()):
    """Write d/fname.crt.pem and d/fname.key.pem (dehydrated's layout)."""
    crt = cert.public_bytes(serialization.Encoding.PEM)
    for c in extra_certs:
        crt += c.public_bytes(serialization.Encoding.PEM)
    with open(os.path.join(d, fname + ".crt.pem"), "wb") as f:
        f.write(crt)
    kp = os.path.join(d, fname + ".key.pem")
    with open(kp, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    os.chmod(kp, 0o640)


def reverse_name(addr):
    return ipaddress.ip_address(addr).reverse_pointer


# ------------------------------------------------------------ TLS clients

def raw_client_hello(sni, alpn=(b"acme-tls/1",), version=0x0303,
                     sni_body=None, alpn_body=None):
    """A hand-built TLS 1.2 ClientHello carrying sni as raw bytes (so that
    values no TLS library would send can be tested).  sni=None: no SNI.
    sni_body / alpn_body: the extension bodies verbatim (malformed ones)."""
    def ext(t, body):
        return struct.pack("!HH", t, len(body)) + body
    exts = b""
    if sni_body is not None:
        exts += ext(0, sni_body)
    elif sni is not None:
        entry = b"\x00" + struct.pack("!H", len(sni)) + sni
        exts += ext(0, struct.pack("!H", len(entry)) + entry)
    if alpn_body is not None:
        exts += ext(16, alpn_body)
    elif alpn:
        lst = b"".join(bytes([len(p)]) + p for p in alpn)
        exts += ext(16, struct.pack("!H", len(lst)) + lst)
    exts += ext(10, b"\x00\x04\x00\x1d\x00\x17")        # x25519, P-256
    exts += ext(11, b"\x01\x00")                        # uncompressed
    exts += ext(13, b"\x00\x08\x04\x03\x08\x04\x04\x01\x05\x01")
    exts += ext(23, b"")                                # EMS
    exts += ext(0xff01, b"\x00")                        # renegotiation_info
    suites = b"\xc0\x2b\xc0\x2f\xc0\x2c\xc0\x30"
    body = (struct.pack("!H", version) + os.urandom(32) + b"\x00"
            + struct.pack("!H", len(suites)) + suites + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def raw_exchange(port, hello, host="127.0.0.1", timeout=10.0):
    """Send a ClientHello; return ('server_hello', None) or ('alert', N)
    or ('closed', None) for the first record that comes back."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(hello)
        buf = b""
        while len(buf) < 6:
            r, _, _ = select.select([s], [], [], timeout)
            if not r:
                return ("timeout", None)
            chunk = s.recv(4096)
            if not chunk:
                return ("closed", None)
            buf += chunk
        if buf[0] == 0x16 and buf[5] == 0x02:
            return ("server_hello", None)
        if buf[0] == 0x15:
            while len(buf) < 7:
                chunk = s.recv(16)
                if not chunk:
                    break
                buf += chunk
            return ("alert", buf[6] if len(buf) >= 7 else None)
        return ("other", buf[:8])


def py_tls(port, sni, host="127.0.0.1", alpn=(ACME_ALPN,), minv=None,
           maxv=None, timeout=10.0):
    """Python ssl handshake; returns (der_cert, alpn, version)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if minv:
        ctx.minimum_version = minv
    if maxv:
        ctx.maximum_version = maxv
    with socket.create_connection((host, port), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=sni) as t:
            return (t.getpeercert(binary_form=True),
                    t.selected_alpn_protocol(), t.version())


def run(argv, timeout=30, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout,
                          text=True, **kw)


HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891"
                           "c2a211167abb8c5e079e09e2c8a8339c")


def raw_client_hello13(sni, random, key_share=None, cookie=None,
                       groups=(0x001d,), shares=None, record_max=None,
                       version=b"\x03\x03", alpn=b"\x00\x0b\x0aacme-tls/1"):
    """A hand-built TLS 1.3 ClientHello (RFC 8446 4.1.2).  key_share=None
    sends an empty client_shares list, which forces a HelloRetryRequest;
    key_share=(group, public) answers it, echoing the cookie if any.
    shares: several (group, public); record_max: split the handshake
    message over records of at most that many bytes."""
    def ext(t, body):
        return struct.pack("!HH", t, len(body)) + body
    exts = b""
    if sni is not None:
        entry = b"\x00" + struct.pack("!H", len(sni)) + sni
        exts += ext(0, struct.pack("!H", len(entry)) + entry)
    if alpn is not None:
        exts += ext(16, alpn)
    gl = b"".join(struct.pack("!H", g) for g in groups)
    exts += ext(10, struct.pack("!H", len(gl)) + gl)
    exts += ext(13, b"\x00\x04\x04\x03\x08\x04")
    exts += ext(43, b"\x02\x03\x04")                    # TLS 1.3 only
    exts += ext(45, b"\x01\x01")                        # psk_dhe_ke
    ks = b""
    for g, pub in (shares or ([key_share] if key_share else [])):
        ks += struct.pack("!HH", g, len(pub)) + pub
    exts += ext(51, struct.pack("!H", len(ks)) + ks)
    if cookie is not None:
        exts += ext(44, struct.pack("!H", len(cookie)) + cookie)
    suites = b"\x13\x01\x13\x02"
    body = (version + random + b"\x20" + random + struct.pack(
        "!H", len(suites)) + suites + b"\x01\x00"
        + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    step = record_max or len(hs)
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(c)) + c
                    for c in (hs[i:i + step] for i in range(0, len(hs), step)))


def read_record(s, timeout=10.0):
    """One TLS record (type, body) from socket s, or (None, b'')."""
    s.settimeout(timeout)
    buf = b""
    while len(buf) < 5:
        chunk = s.recv(5 - len(buf))
        if not chunk:
            return (None, b"")
        buf += chunk
    n = struct.unpack("!H", buf[3:5])[0]
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return (None, body)
        body += chunk
    return (buf[0], body)


def hrr_exchange(port, sni1, sni2, host="127.0.0.1", version2=b"\x03\x03",
                 alpn2=b"\x00\x0b\x0aacme-tls/1"):
    """ClientHello without a usable key share -> HelloRetryRequest -> a
    second ClientHello with SNI sni2.  Returns the outcome of the second
    one like raw_exchange: ('server_hello', None) or ('alert', N).
    version2, alpn2 (None: no extension) shape the second hello."""
    random = os.urandom(32)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(raw_client_hello13(sni1, random))
        typ, body = read_record(s)
        if typ != 0x16 or body[0] != 0x02 or body[6:38] != HRR_RANDOM:
            return ("no_hrr", (typ, body[:8]))
        # find the cookie (44) and the selected group (51) in the HRR
        off = 4 + 2 + 32
        off += 1 + body[off]                    # legacy_session_id_echo
        off += 3                                # cipher_suite, compression
        end = off + 2 + struct.unpack("!H", body[off:off + 2])[0]
        off += 2
        cookie, group = None, 0x001d
        while off + 4 <= end:
            t, n = struct.unpack("!HH", body[off:off + 4])
            data = body[off + 4:off + 4 + n]
            if t == 44:
                cookie = data[2:]
            elif t == 51:
                group = struct.unpack("!H", data[:2])[0]
            off += 4 + n
        s.sendall(raw_client_hello13(sni2, random,
                                     key_share=(group, os.urandom(32)),
                                     cookie=cookie, version=version2,
                                     alpn=alpn2))
        while True:
            typ, body = read_record(s)
            if typ == 0x14:                     # change_cipher_spec compat
                continue
            if typ == 0x16 and body[:1] == b"\x02":
                return ("server_hello", None)
            if typ == 0x15:
                return ("alert", body[1] if len(body) > 1 else None)
            return ("other", typ)
