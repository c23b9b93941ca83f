"""alpnd-respond: challenge certificate checks, SNI validation, --make,
real TLS clients standalone, under systemd-socket-activate and through alpnd.

Every key and certificate is generated during the run.
"""

import base64
import concurrent.futures
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import acmelib as A

pytestmark = pytest.mark.skipif(not os.access(A.RESPOND, os.X_OK),
                                reason="alpnd-respond not built")

KEYAUTH = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
DIGEST = hashlib.sha256(KEYAUTH.encode()).digest()


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "alpn-certs"
    d.mkdir()
    return str(d)


@pytest.fixture
def responder(certs):
    servers = []

    def start(binary=A.RESPOND, timeout=10, env=None):
        s = A.Inetd([binary, "--certs", certs, "--hello-timeout",
                     str(timeout)], env=env)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def make(certs, name, auth=KEYAUTH, binary=A.RESPOND):
    return A.run([binary, "--certs", certs, "--make", "--", name, auth])


def check(certs, name):
    return A.run([A.RESPOND, "--certs", certs, "--check", name])


# ------------------------------------------------------------------ --make

def load(certs, fname):
    with open(os.path.join(certs, fname + ".crt.pem"), "rb") as f:
        crt = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(certs, fname + ".key.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    return crt, key


def assert_rfc8737(crt, key, san):
    """RFC 8737 section 3 / RFC 8738 section 6, field by field."""
    assert crt.version == x509.Version.v3
    # self-signed: issuer == subject and the signature verifies with its key
    assert crt.issuer == crt.subject
    crt.public_key().verify(crt.signature, crt.tbs_certificate_bytes,
                            ec.ECDSA(crt.signature_hash_algorithm))
    # ECDSA P-256, and the key file holds the certificate's key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == \
        crt.public_key().public_numbers()
    # exactly one subjectAltName entry, the identifier
    sans = crt.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert list(sans) == [san]
    # acmeIdentifier: critical, OCTET STRING (SIZE (32)) = SHA-256(keyauth)
    ext = crt.extensions.get_extension_for_oid(A.ACME_OID)
    assert ext.critical is True
    assert ext.value.value == b"\x04\x20" + DIGEST
    # short validity, currently valid, positive serial
    life = crt.not_valid_after - crt.not_valid_before
    assert life.days <= 8
    now = __import__("datetime").datetime.utcnow()
    assert crt.not_valid_before < now < crt.not_valid_after
    assert crt.serial_number > 0


def test_make_dns_name_rfc8737_fields(certs):
    r = make(certs, "Www.Example.ORG.")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(certs)) == ["www.example.org.crt.pem",
                                         "www.example.org.key.pem"]
    crt, key = load(certs, "www.example.org")
    assert_rfc8737(crt, key, x509.DNSName("www.example.org"))
    st = os.stat(os.path.join(certs, "www.example.org.key.pem"))
    assert stat.S_IMODE(st.st_mode) == 0o640
    # certtool, an independent parser, agrees on the extension
    out = A.run(["certtool", "-i", "--infile",
                 os.path.join(certs, "www.example.org.crt.pem")]).stdout
    assert "Unknown extension 1.3.6.1.5.5.7.1.31 (critical)" in out
    assert "Hexdump: 0420" + DIGEST.hex() in out
    assert "DNSname: www.example.org" in out


@pytest.mark.parametrize("addr", ["192.0.2.7", "2001:db8::1:7"])
def test_make_ip_address_rfc8738(certs, addr):
    r = make(certs, addr)
    assert r.returncode == 0, r.stderr
    rev = A.reverse_name(addr)
    assert sorted(os.listdir(certs)) == [rev + ".crt.pem", rev + ".key.pem"]
    crt, key = load(certs, rev)
    assert_rfc8737(crt, key, x509.IPAddress(ipaddress.ip_address(addr)))


def test_make_auth_forms_give_the_same_digest(certs):
    b64 = base64.urlsafe_b64encode(DIGEST).rstrip(b"=").decode()
    forms = [KEYAUTH, b64, DIGEST.hex(), DIGEST.hex().upper(),
             ":".join("%02x" % b for b in DIGEST)]
    for i, auth in enumerate(forms):
        r = make(certs, "f%d.example.org" % i, auth)
        assert r.returncode == 0, (auth, r.stderr)
        crt, _ = load(certs, "f%d.example.org" % i)
        ext = crt.extensions.get_extension_for_oid(A.ACME_OID)
        assert ext.value.value == b"\x04\x20" + DIGEST, auth


@pytest.mark.parametrize("name,auth", [
    ("*.example.org", KEYAUTH),
    ("a/b.example.org", KEYAUTH),
    ("a..example.org", KEYAUTH),
    ("../x.example.org", KEYAUTH),
    ("exa_mple.org", KEYAUTH),
    ("-a.example.org", KEYAUTH),
    ("x" * 64 + ".example.org", KEYAUTH),
    ("ok.example.org", "nodot"),
    ("ok.example.org", "tok.thumb.extra"),
    ("ok.example.org", "tok en.thumb"),
    ("ok.example.org", DIGEST.hex()[:-2]),
    ("ok.example.org", DIGEST.hex() + "00"),
    ("ok.example.org", "zz" + DIGEST.hex()[2:]),
    ("ok.example.org", ":" + ":".join("%02x" % b for b in DIGEST)),
    ("ok.example.org", base64.urlsafe_b64encode(DIGEST).decode()),  # pad
    ("ok.example.org", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB"),
])
def test_make_rejects_bad_input(certs, name, auth):
    r = make(certs, name, auth)
    assert r.returncode == 65, (r.returncode, r.stderr)
    assert r.stderr.strip()
    assert os.listdir(certs) == []


def test_make_replaces_atomically_and_clean_removes(certs):
    assert make(certs, "a.example.org").returncode == 0
    ino = os.stat(os.path.join(certs, "a.example.org.crt.pem")).st_ino
    assert make(certs, "a.example.org", DIGEST.hex()).returncode == 0
    assert os.stat(os.path.join(certs, "a.example.org.crt.pem")).st_ino \
        != ino                                  # renamed over, not rewritten
    assert sorted(os.listdir(certs)) == ["a.example.org.crt.pem",
                                         "a.example.org.key.pem"]
    r = A.run([A.RESPOND, "--certs", certs, "--clean", "A.Example.org."])
    assert r.returncode == 0, r.stderr
    assert os.listdir(certs) == []
    # cleaning what is not there is fine; a hostile name is not
    assert A.run([A.RESPOND, "--certs", certs, "--clean",
                  "a.example.org"]).returncode == 0
    assert A.run([A.RESPOND, "--certs", certs, "--clean",
                  "../etc"]).returncode == 65


def test_usage_errors(certs, tmp_path):
    assert A.run([A.RESPOND]).returncode == 64
    assert A.run([A.RESPOND, "--certs", certs, "--make", "x"]).returncode \
        == 64
    assert A.run([A.RESPOND, "--certs", certs, "--hello-timeout",
                  "0"]).returncode == 64
    assert A.run([A.RESPOND, "--certs", str(tmp_path / "nope"), "--check",
                  "a.example.org"]).returncode == 69
    # stdin a regular file / a listening socket: not a connection
    f = tmp_path / "file"
    f.write_text("x")
    with open(f) as fh:
        r = subprocess.run([A.RESPOND, "--certs", certs], stdin=fh,
                           stderr=subprocess.PIPE, text=True, timeout=10)
    assert r.returncode == 64 and "not a socket" in r.stderr
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        r = subprocess.run([A.RESPOND, "--certs", certs], stdin=ls,
                           stderr=subprocess.PIPE, text=True, timeout=10)
    assert r.returncode == 64 and "listening socket" in r.stderr


def test_make_failing_certificate_leaves_no_new_key(certs):
    """If the certificate cannot be put in place, the new key does not stay
    behind (it would not match), and no temporary file remains."""
    os.mkdir(os.path.join(certs, "x.example.org.crt.pem"))
    r = make(certs, "x.example.org")
    assert r.returncode == 74, r.stderr
    assert sorted(os.listdir(certs)) == ["x.example.org.crt.pem"], os.listdir(certs)


def test_make_ipv4_mapped_address_is_the_ipv4_identifier(certs):
    r = make(certs, "::ffff:192.0.2.1")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(certs)) == ["1.2.0.192.in-addr.arpa.crt.pem",
                                         "1.2.0.192.in-addr.arpa.key.pem"]


# ---------------------------------------------------- certificate checks

NAME = "v.example.org"


def fault_table():
    """(label, builder(certs) writing NAME's pair, expected reason)."""
    other = A.key("ec", 1)

    def pair(**kw):
        def build(d):
            k = kw.pop("pkey", A.key("ec"))
            keyfile = kw.pop("keyfile", k)
            extra = kw.pop("extra_certs", ())
            c = A.challenge_cert(NAME, DIGEST, k, **kw)
            A.write_pair(d, NAME, c, keyfile, extra)
        return build

    def ip_pair(d):
        c = A.challenge_cert("1.0.0.127.in-addr.arpa", DIGEST, A.key("ec"),
                             san="ip", san_value="127.0.0.1")
        A.write_pair(d, NAME, c, A.key("ec"))

    def symlink(d):
        os.makedirs(d + "/../elsewhere", exist_ok=True)
        c = A.challenge_cert(NAME, DIGEST, A.key("ec"))
        A.write_pair(d + "/../elsewhere", NAME, c, A.key("ec"))
        os.symlink("../elsewhere/%s.crt.pem" % NAME,
                   "%s/%s.crt.pem" % (d, NAME))
        os.symlink("../elsewhere/%s.key.pem" % NAME,
                   "%s/%s.key.pem" % (d, NAME))

    def garbage(d):
        with open("%s/%s.crt.pem" % (d, NAME), "w") as f:
            f.write("not a certificate\n")
        A.write_pair(d, "x", A.challenge_cert(NAME, DIGEST, A.key("ec")),
                     A.key("ec"))
        os.rename(d + "/x.key.pem", "%s/%s.key.pem" % (d, NAME))

    def huge(d):
        pair()(d)
        with open("%s/%s.crt.pem" % (d, NAME), "ab") as f:
            f.write(b"#" * 70000)

    return [
        ("good-ecdsa", pair(), None),
        ("good-rsa", pair(pkey=A.key("rsa")), None),
        ("good-ecdsa-p384", pair(pkey=A.key("ec384")), None),
        ("no-file", lambda d: None, "No such file or directory"),
        ("wrong-san", pair(san_value="w.example.org"), "is not " + NAME),
        ("san-missing", pair(san="none"), "0 subjectAltName entries"),
        ("two-sans", pair(extra_san=[x509.DNSName("x.example.org")]),
         "2 subjectAltName entries"),
        ("ip-san-for-dns-name", pair(san="ip", san_value="192.0.2.1"),
         "not a dNSName"),
        ("ext-missing", pair(ext="missing"), "no acmeIdentifier"),
        ("ext-not-critical", pair(ext="noncritical"), "not critical"),
        ("ext-31-bytes", pair(ext="raw", ext_value=A.octet_string(
            DIGEST[:31])), "not a 32-byte OCTET STRING"),
        ("ext-33-bytes", pair(ext="raw", ext_value=A.octet_string(
            DIGEST + b"\x00")), "not a 32-byte OCTET STRING"),
        ("ext-not-octet-string", pair(ext="raw", ext_value=b"\x0c\x20"
                                      + DIGEST), "not a 32-byte OCTET"),
        ("not-self-signed-issuer", pair(signer=other, issuer_cn="Some CA"),
         "not self-signed: issuer"),
        ("not-self-signed-signature", pair(signer=other),
         "not self-signed: signature"),
        ("key-mismatch", pair(keyfile=other), "key does not match"),
        ("rsa-key-mismatch", pair(pkey=A.key("rsa"), keyfile=other),
         "key does not match"),
        ("two-certs", pair(extra_certs=[A.challenge_cert(
            NAME, DIGEST, other)]), "holds 2 certificates"),
        ("symlink", symlink, "symbolic link"),
        ("garbage", garbage, NAME + ".crt.pem: "),
        ("huge", huge, "has size"),
        ("ip-cert-under-dns-name", ip_pair, "not a dNSName"),
    ]


FAULTS = fault_table()


@pytest.mark.parametrize("label,build,reason", FAULTS,
                         ids=[f[0] for f in FAULTS])
def test_certificate_checks(certs, responder, label, build, reason):
    build(certs)
    # --check says the same thing the server will log
    r = check(certs, NAME)
    if reason is None:
        assert r.returncode == 0, r.stdout
        assert r.stdout.startswith(NAME + ": ok: ")
        assert DIGEST.hex() in r.stdout
    else:
        assert r.returncode == 65, r.stdout
        assert reason in r.stdout, r.stdout
    srv = responder()
    if reason is None:
        der, alpn, _ = A.py_tls(srv.port, NAME)
        with open(os.path.join(certs, NAME + ".crt.pem"), "rb") as f:
            want = x509.load_pem_x509_certificate(f.read())
        assert der == want.public_bytes(serialization.Encoding.DER)
        assert alpn == A.ACME_ALPN
        ch = srv.last()
        assert ch.rc == 0 and ch.log()["result"] == "ok", ch.stderr
    else:
        res = A.raw_exchange(srv.port, A.raw_client_hello(NAME.encode()))
        assert res == ("alert", A.ALERT_UNRECOGNIZED_NAME)
        ch = srv.last()
        log = ch.log()
        assert ch.rc == 65, ch.stderr
        assert log["result"] == "unrecognized_name"
        assert reason in log["reason"], log


# ---------------------------------------------------------- SNI validation

LONG253 = ".".join(["a" * 63] * 3 + ["b" * 61])          # 253 bytes
# NAME.crt.pem must fit NAME_MAX (255): the longest name with files is 247
LONG247 = ".".join(["a" * 63] * 3 + ["b" * 55])
SNI_TABLE = [
    # sni bytes, served?, reason fragment when refused
    (b"v.example.org", True, None),
    (b"V.EXAMPLE.ORG", True, None),
    (b"v.example.org.", True, None),
    (b"V.Example.Org.", True, None),
    (LONG247.encode(), True, None),
    (LONG247.encode().upper() + b".", True, None),
    (LONG253.encode(), False, "File name too long"),
    (LONG253.encode() + b".", False, "File name too long"),
    (b"1.0.0.127.in-addr.arpa", True, None),
    (b"1.0.0.127.IN-ADDR.ARPA.", True, None),
    (b"v.example.org..", False, ""),
    (b"v..example.org", False, ""),
    (b".v.example.org", False, ""),
    (b"../v.example.org", False, ""),
    (b"../outside.example.org", False, ""),
    (b"v.example.org/", False, ""),
    (b"a/../v.example.org", False, ""),
    (b"/etc/passwd", False, ""),
    (b"v.example.org\x00", False, ""),
    (b"v.exa\x00mple.org", False, ""),
    (b"\x00", False, ""),
    (b".", False, ""),
    (b"x" + LONG253.encode(), False, ""),                 # 254 bytes
    (b"x" + LONG253.encode() + b".", False, ""),
    (b"a" * 64 + b".example.org", False, ""),             # 64-byte label
    (b"127.0.0.1", False, ""),
    (b"::1", False, ""),
    (b"*.example.org", False, ""),
    (b"-v.example.org", False, ""),
    (b"v-.example.org", False, ""),
    (b"v_x.example.org", False, ""),
    (b"v example.org", False, ""),
    (b"\xc3\xa9.example.org", False, ""),
    (b"v.example.org\r\nX: y", False, ""),
    (b"w.example.org", False, "No such file"),
    (b"4.3.2.1.in-addr.arpa", False, "No such file"),
]


@pytest.fixture
def sni_certs(certs):
    assert make(certs, LONG247 + "x").returncode == 65    # 248: too long
    for name in ("v.example.org", LONG247, "127.0.0.1"):
        r = make(certs, name)
        assert r.returncode == 0, r.stderr
    # a perfectly good pair just outside the directory
    parent = os.path.dirname(certs)
    A.write_pair(parent, "outside.example.org",
                 A.challenge_cert("outside.example.org", DIGEST,
                                  A.key("ec")), A.key("ec"))
    return certs


def test_sni_validation_table(sni_certs, responder):
    srv = responder()
    n = 0
    for sni, served, reason in SNI_TABLE:
        res = A.raw_exchange(srv.port, A.raw_client_hello(sni))
        n += 1
        ch = srv.wait(n)[-1]
        log = ch.log()
        assert log is not None, (sni, ch.stderr)
        if served:
            assert res == ("server_hello", None), (sni, res, ch.stderr)
        else:
            assert res == ("alert", A.ALERT_UNRECOGNIZED_NAME), \
                (sni, res, ch.stderr)
            assert ch.rc == 65
            assert log["result"] == "unrecognized_name", (sni, log)
            assert reason in log["reason"], (sni, log)
            # the hostile bytes never reach the log unescaped
            assert "\x00" not in ch.stderr and "\r" not in ch.stderr
    assert n == len(SNI_TABLE)


def test_no_sni_and_no_alpn(certs, responder):
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    assert A.raw_exchange(srv.port, A.raw_client_hello(None)) == \
        ("alert", A.ALERT_UNRECOGNIZED_NAME)
    assert "no SNI" in srv.last().log()["reason"]
    for alpn in ((), (b"h2", b"http/1.1"), (b"acme-tls/2",)):
        res = A.raw_exchange(srv.port, A.raw_client_hello(b"v.example.org",
                                                          alpn=alpn))
        assert res == ("alert", A.ALERT_NO_APPLICATION_PROTOCOL), alpn
        ch = srv.last()
        assert ch.rc == 65 and ch.log()["result"] == "no_acme_alpn"
    # the same with a real client
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        A.py_tls(srv.port, "v.example.org", alpn=("h2",))
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        A.py_tls(srv.port, "v.example.org", alpn=())


def with_extensions(hello, extra):
    """raw_client_hello's record with extra extension bytes appended to its
    extension block, every length fixed up."""
    body = bytearray(hello[9:])
    at = 2 + 32
    at += 1 + body[at]                                  # session id
    at += 2 + int.from_bytes(body[at:at + 2], "big")    # cipher suites
    at += 1 + body[at]                                  # compression
    body[at:at + 2] = (int.from_bytes(body[at:at + 2], "big")
                       + len(extra)).to_bytes(2, "big")
    body += extra
    hs = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def ext(t, body):
    return t.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


SNI_BAD = "malformed server_name extension"
ALPN_BAD = "malformed ALPN extension"
MALFORMED = [
    # (label, sni_body, alpn_body, extra extensions, reason)
    ("sni-list-too-long", b"\x00\x20\x00\x00\x0dv.example.org", None, b"",
     SNI_BAD),
    ("sni-name-overruns", b"\x00\x10\x00\x00\x0ev.example.org", None, b"",
     SNI_BAD),
    ("sni-truncated-entry", b"\x00\x02\x00\x00", None, b"", SNI_BAD),
    ("alpn-list-too-short", None, b"\x00\x05\x0aacme-tls/1", b"", ALPN_BAD),
    ("alpn-empty-name", None, b"\x00\x0c\x00\x0aacme-tls/1", b"", ALPN_BAD),
    # One ClientHello policy for alpnd and alpnd-respond (alpnparse.h):
    # respond.c's former hand-written extension reader, or GnuTLS behind it,
    # judged each of the following differently (served, or refused with
    # another alert, given in the comment).
    # another name type first was skipped, and the host_name served
    ("sni-other-type-first",
     b"\x00\x14\x01\x00\x01x\x00\x00\x0dv.example.org", None, b"", SNI_BAD),
    # an empty ServerNameList: "no SNI host_name", unrecognized_name
    ("sni-empty-list", b"\x00\x00", None, b"", SNI_BAD),
    # an empty HostName: "empty name", unrecognized_name
    ("sni-empty-name", b"\x00\x03\x00\x00\x00", None, b"", SNI_BAD),
    # two host_names: "more than one SNI host_name", unrecognized_name
    ("sni-two-host-names",
     b"\x00\x20\x00\x00\x0dv.example.org\x00\x00\x0dv.example.org", None, b"",
     SNI_BAD),
    # an empty ProtocolNameList: no_application_protocol
    ("alpn-empty-list", None, b"\x00\x00", b"", ALPN_BAD),
    # a repeated unknown extension was served
    ("duplicate-unknown-extension", None, None,
     ext(0x1234, b"") + ext(0x1234, b"x"),
     "malformed ClientHello (extension 4660)"),
    # a second ALPN extension: unsupported_extension
    ("duplicate-alpn-extension", None, None, ext(16, b"\x00\x03\x02h2"),
     ALPN_BAD),
    # pre_shared_key before another extension: illegal_parameter
    ("pre-shared-key-not-last", None, None,
     ext(41, b"\x00" * 10) + ext(0x4444, b""),
     "malformed ClientHello (extension 41)"),
]


@pytest.mark.parametrize("label,sni_body,alpn_body,extra,reason", MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed_extensions(certs, responder, label, sni_body, alpn_body,
                              extra, reason):
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    # the same hello, well formed, is served
    assert A.raw_exchange(srv.port, A.raw_client_hello(b"v.example.org")) \
        == ("server_hello", None)
    res = A.raw_exchange(srv.port, with_extensions(A.raw_client_hello(
        b"v.example.org", sni_body=sni_body, alpn_body=alpn_body), extra))
    ch = srv.last()
    assert res == ("alert", A.ALERT_DECODE_ERROR), (res, ch.stderr)
    assert ch.rc == 65
    assert ch.log()["result"] == "tls_error"
    assert ch.log()["reason"] == reason


def test_old_tls_versions_refused(certs, responder):
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    res = A.raw_exchange(srv.port, A.raw_client_hello(b"v.example.org",
                                                      version=0x0302))
    assert res == ("alert", A.ALERT_PROTOCOL_VERSION)
    ch = srv.last()
    assert ch.rc == 65 and ch.log()["result"] == "tls_error"
    r = A.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % srv.port,
               "-servername", "v.example.org", "-alpn", "acme-tls/1",
               "-tls1_1"], stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "BEGIN CERTIFICATE" not in r.stdout


def test_hard_linked_pair_is_not_served(certs, tmp_path):
    """A hard link may stand for a file outside the directory: refused."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert make(str(other), "v.example.org").returncode == 0
    for ext_ in (".crt.pem", ".key.pem"):
        os.link(other / ("v.example.org" + ext_),
                os.path.join(certs, "v.example.org" + ext_))
    r = check(certs, "v.example.org")
    assert r.returncode == 65 and "links" in r.stdout + r.stderr, r


# ------------------------------------------------------- real TLS clients

def served_der(certs, name):
    with open(os.path.join(certs, name + ".crt.pem"), "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(
            serialization.Encoding.DER)


def test_gnutls_cli(certs, responder):
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    r = A.run(["gnutls-cli", "--insecure", "--alpn=acme-tls/1",
               "--sni-hostname=v.example.org", "--save-cert=/dev/stdout",
               "-p", str(srv.port), "127.0.0.1"], stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Handshake was completed" in r.stdout + r.stderr
    assert "Application protocol: acme-tls/1" in r.stdout
    pem = r.stdout[r.stdout.index("-----BEGIN CERTIFICATE-----"):]
    assert x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER) == served_der(certs, "v.example.org")
    ch = srv.last()
    assert ch.rc == 0 and ch.log()["result"] == "ok"


@pytest.mark.parametrize("ver,name", [("-tls1_2", "TLSv1.2"),
                                      ("-tls1_3", "TLSv1.3")])
@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_openssl_s_client(certs, responder, ver, name, kind):
    A.write_pair(certs, "v.example.org",
                 A.challenge_cert("v.example.org", DIGEST, A.key(kind)),
                 A.key(kind))
    srv = responder()
    r = A.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % srv.port,
               "-servername", "v.example.org", "-alpn", "acme-tls/1", ver],
              stdin=subprocess.DEVNULL)
    assert "ALPN protocol: acme-tls/1" in r.stdout, r.stdout + r.stderr
    assert "Protocol  : " + name in r.stdout or \
        "New, " + name in r.stdout, r.stdout
    pem = r.stdout[r.stdout.index("-----BEGIN CERTIFICATE-----"):
                   r.stdout.index("-----END CERTIFICATE-----") + 25]
    assert x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER) == served_der(certs, "v.example.org")
    ch = srv.last()
    assert ch.rc == 0, ch.stderr
    assert ch.log()["reason"].startswith(name.replace("v", "").replace(
        "TLS", "TLS"))


def test_python_ssl_both_versions_and_ipv6(certs, responder):
    assert make(certs, "v.example.org").returncode == 0
    assert make(certs, "::1").returncode == 0
    srv = responder()
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        der, alpn, got = A.py_tls(srv.port, "v.example.org", minv=v, maxv=v)
        assert der == served_der(certs, "v.example.org")
        assert alpn == "acme-tls/1"
        assert got == v.name.replace("_", ".")
    # IP identifier over IPv6: SNI is the reverse name (RFC 8738)
    rev = A.reverse_name("::1")
    der, alpn, _ = A.py_tls(srv.port, rev, host="::1")
    assert der == served_der(certs, rev)
    cert = x509.load_der_x509_certificate(der)
    assert list(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value) == \
        [x509.IPAddress(ipaddress.ip_address("::1"))]
    ch = srv.last()
    assert ch.log()["client"].startswith("[::1]:")


def test_unknown_name_openssl(certs, responder):
    srv = responder()
    r = A.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % srv.port,
               "-servername", "nobody.example.org", "-alpn", "acme-tls/1"],
              stdin=subprocess.DEVNULL)
    assert "unrecognized name" in r.stdout + r.stderr
    assert "BEGIN CERTIFICATE" not in r.stdout
    log = srv.last().log()
    assert log["sni"] == "nobody.example.org"
    assert "nobody.example.org.crt.pem: No such file" in log["reason"]


def test_handshake_deadline(certs, responder):
    srv = responder(timeout=1)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(A.raw_client_hello(b"v.example.org")[:20])   # partial
        ch = srv.last(timeout=10)
    took = time.monotonic() - t0
    assert ch.rc == 75, ch.stderr
    assert ch.log()["result"] == "timeout"
    assert 0.9 < took < 4, took


def _validate_concurrently(srv, certs, names):
    """One Python ssl validation per name, all at once; each must get its
    own challenge certificate.  Returns (seconds, the servers' children)."""
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(names)) as ex:
        res = list(ex.map(lambda n: A.py_tls(srv.port, n, timeout=30),
                          names))
    took = time.monotonic() - t0
    for n, (der, alpn, _) in zip(names, res):
        assert der == served_der(certs, n) and alpn == "acme-tls/1"
    return took, srv.wait(len(names), timeout=30)


def test_50_concurrent_validations(certs, responder):
    names = ["c%02d.example.org" % i for i in range(50)]
    for n in names:
        A.write_pair(certs, n, A.challenge_cert(n, DIGEST, A.key("ec")),
                     A.key("ec"))
    srv = responder(timeout=20)
    took, kids = _validate_concurrently(srv, certs, names)
    assert sorted(k.log()["sni"] for k in kids) == names
    assert all(k.rc == 0 for k in kids)
    print("50 concurrent validations: %.2fs wall, median handshake %.1fms"
          % (took, sorted(k.log()["ms"] for k in kids)[25]))


def test_journal_stream_mismatch_falls_back_to_stderr(certs, responder):
    assert make(certs, "v.example.org").returncode == 0
    env = dict(os.environ, JOURNAL_STREAM="1:1")
    srv = responder(env=env)
    A.py_tls(srv.port, "v.example.org")
    assert srv.last().log()["result"] == "ok"


@pytest.mark.skipif(not os.access(A.RESPOND_ASAN, os.X_OK),
                    reason="no ASan build")
def test_asan_build_tables(sni_certs, responder):
    """The SNI table and a few faults again under ASan+UBSan."""
    srv = responder(binary=A.RESPOND_ASAN)
    for i, (sni, served, _) in enumerate(SNI_TABLE):
        res = A.raw_exchange(srv.port, A.raw_client_hello(sni))
        assert res[0] == ("server_hello" if served else "alert"), sni
        ch = srv.wait(i + 1)[-1]
        assert "runtime error" not in ch.stderr
        assert "AddressSanitizer" not in ch.stderr
    r = make(sni_certs, "asan.example.org", binary=A.RESPOND_ASAN)
    assert r.returncode == 0, r.stderr
    der, _, _ = A.py_tls(srv.port, "asan.example.org")
    assert der == served_der(sni_certs, "asan.example.org")


# ----------------------------------------- systemd-socket-activate, alpnd

class SocketActivate:
    """systemd-socket-activate --accept [--inetd], stderr collected."""

    def __init__(self, args, port, inetd_mode):
        argv = ["systemd-socket-activate", "-l", "127.0.0.1:%d" % port,
                "--accept"] + (["--inetd"] if inetd_mode else []) + args
        self.lines = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            A.wait_port(port, proc=self.p)    # this probe logs io_error
        except Exception:
            self.close()
            raise

    def _read(self):
        for line in self.p.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def logs(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                logs = A.parse_log("".join(self.lines))
                if len(logs) >= n or time.monotonic() > deadline:
                    return logs
                self.cond.wait(0.1)

    def close(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.mark.parametrize("inetd_mode", [False, True],
                         ids=["LISTEN_FDS", "inetd-stdin"])
def test_systemd_socket_activate(certs, inetd_mode):
    assert make(certs, "v.example.org").returncode == 0
    port = A.free_port(socket.AF_INET)
    sa = SocketActivate([A.RESPOND, "--certs", certs], port, inetd_mode)
    try:
        der, alpn, _ = A.py_tls(port, "v.example.org")
        assert der == served_der(certs, "v.example.org")
        assert alpn == "acme-tls/1"
        with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
            A.py_tls(port, "w.example.org")
        logs = sa.logs(3)
    finally:
        sa.close()
    assert sorted(l["result"] for l in logs) == \
        ["io_error", "ok", "unrecognized_name"], sa.lines


# ------------------------------------------------ through the router (alpnd)

needs_alpnd = pytest.mark.skipif(not os.access(A.ALPND, os.X_OK),
                                 reason="alpnd not built")


@pytest.fixture
def routed(certs, echo_backend):
    """alpnd per connection (fd 0, inetd style) with --certs, the real
    responder, and an echo fallback."""
    servers = []
    backend = echo_backend()

    def start(binary=A.RESPOND):
        s = A.Inetd([A.ALPND, "--fallback", backend.addr, "--certs", certs,
                     "--respond", binary, "--hello-timeout", "5"])
        servers.append(s)
        return s
    start.backend = backend
    yield start
    for s in servers:
        s.close()


@needs_alpnd
def test_router_execs_responder(certs, routed):
    assert make(certs, "v.example.org").returncode == 0
    srv = routed()
    der, alpn, _ = A.py_tls(srv.port, "v.example.org")
    assert der == served_der(certs, "v.example.org")
    assert alpn == "acme-tls/1"
    ch = srv.last()
    assert ch.rc == 0, ch.stderr
    # one process: alpnd's line, then the responder's (same pid, execve)
    log = ch.log()
    assert log["result"] == "ok"
    assert "alpnd[%d]:" % log["pid"] in ch.stderr
    # a client that does not ask for acme-tls/1 never meets the responder
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"GET / HTTP/1.0\r\n\r\n"[:100]
    ch = srv.last()
    assert ch.log() is None and "alpnd-respond" not in ch.stderr


@needs_alpnd
def test_router_real_clients(certs, routed):
    assert make(certs, "v.example.org").returncode == 0
    srv = routed()
    for ver in ("-tls1_2", "-tls1_3"):
        r = A.run(["openssl", "s_client", "-connect",
                   "127.0.0.1:%d" % srv.port, "-servername", "v.example.org",
                   "-alpn", "acme-tls/1", ver], stdin=subprocess.DEVNULL)
        assert "ALPN protocol: acme-tls/1" in r.stdout, r.stdout + r.stderr
        assert srv.last().rc == 0
    r = A.run(["gnutls-cli", "--insecure", "--alpn=acme-tls/1",
               "--sni-hostname=v.example.org", "-p", str(srv.port),
               "127.0.0.1"], stdin=subprocess.DEVNULL)
    assert "Handshake was completed" in r.stdout, r.stdout + r.stderr
    assert srv.last().log()["result"] == "ok"
    # unknown name and hostile SNI: the responder's refusal comes through
    r = A.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % srv.port,
               "-servername", "nobody.example.org", "-alpn", "acme-tls/1"],
              stdin=subprocess.DEVNULL)
    assert "unrecognized name" in r.stdout + r.stderr
    # (alpnd's own parser may drop a hostile name before the responder runs)
    for sni in (b"../v.example.org", b"v.example.org\x00", b"127.0.0.1",
                b"x" + LONG253.encode()):
        try:
            res = A.raw_exchange(srv.port, A.raw_client_hello(sni))
        except ConnectionResetError:
            res = ("closed", None)
        ch = srv.last()
        assert ch.rc == 65, (sni, ch.stderr)
        if res == ("closed", None):
            assert ch.log() is None and "bad ClientHello" in ch.stderr
        else:
            assert res == ("alert", A.ALERT_UNRECOGNIZED_NAME), sni
            assert ch.log()["result"] == "unrecognized_name"


@needs_alpnd
def test_router_50_concurrent_validations(certs, routed):
    names = ["r%02d.example.org" % i for i in range(50)]
    for n in names:
        A.write_pair(certs, n, A.challenge_cert(n, DIGEST, A.key("ec")),
                     A.key("ec"))
    srv = routed()
    took, kids = _validate_concurrently(srv, certs, names)
    assert all(k.rc == 0 for k in kids)
    assert sorted(k.log()["sni"] for k in kids) == names
    print("50 concurrent validations through alpnd: %.2fs wall" % took)


@needs_alpnd
@pytest.mark.parametrize("mode", ["fds", "listen"])
def test_router_socket_activated(certs, activate, mode):
    """alpnd under systemd-socket-activate: Accept=yes with LISTEN_FDS (the
    responder takes over fd 3 after execve) and listening-socket mode (alpnd
    forks the responder with the connection as stdin)."""
    assert make(certs, "v.example.org").returncode == 0
    a = activate(["--fallback", "127.0.0.1:9", "--certs", certs,
                  "--respond", A.RESPOND], mode=mode)
    der, alpn, _ = A.py_tls(a.port, "v.example.org")
    assert der == served_der(certs, "v.example.org")
    with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
        A.py_tls(a.port, "w.example.org")

    def results():
        r = [l["result"] for l in A.parse_log(a.text())]
        return r if {"ok", "unrecognized_name"} <= set(r) else None
    from conftest import wait_for
    wait_for(results, 10, "responder log lines")


# ------------------------------------------------------------- journald

JOURNAL_SCRIPT = r'''
set -eu
out=$1; shift
# a private journald: nothing reaches the machine's journal
for d in /run/systemd /run/log /var/log/journal; do
	mkdir -p "$d"
	mount -t tmpfs tmpfs "$d"
done
mkdir -p /run/systemd/journal
/lib/systemd/systemd-journald & jp=$!
i=0
while [ ! -S /run/systemd/journal/stdout ] || [ ! -S /run/systemd/journal/socket ]; do
	i=$((i + 1)); [ $i -lt 200 ] || exit 70
	sleep 0.02
done
# stderr -> journal stream, JOURNAL_STREAM naming it, as systemd would do
rc=0
systemd-cat -t alpnd-respond-stderr sh -c \
    'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"' sh "$@" || rc=$?
journalctl --sync 2>/dev/null || true
journalctl --no-pager -o json > "$out"
kill $jp
exit $rc
'''


@pytest.mark.skipif(not os.path.exists("/lib/systemd/systemd-journald"),
                    reason="no systemd-journald")
def test_journald_structured_fields(certs, tmp_path):
    import json
    probe = A.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                   "mount -t tmpfs tmpfs /run && true"])
    if probe.returncode != 0:
        pytest.skip("no private mount namespace: " + probe.stderr.strip())
    assert make(certs, "v.example.org").returncode == 0
    script = tmp_path / "journal.sh"
    script.write_text(JOURNAL_SCRIPT)
    outs = [str(tmp_path / "j1.json"), str(tmp_path / "j2.json")]

    srv = A.Inetd(["/bin/true"])
    try:
        for i, sni in enumerate(("v.example.org", "w.example.org")):
            srv.argv = ["unshare", "-m", "--propagation", "private", "sh",
                        str(script), outs[i], A.RESPOND, "--certs", certs]
            if i == 0:
                A.py_tls(srv.port, sni)
            else:
                with pytest.raises(ssl.SSLError):
                    A.py_tls(srv.port, sni)
            ch = srv.wait(i + 1, timeout=20)[-1]
            assert ch.rc == (0 if i == 0 else 65), ch.stderr
    finally:
        srv.close()

    def entries(path):
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    ok = [e for e in entries(outs[0]) if e.get("ALPND_RESULT")]
    bad = [e for e in entries(outs[1]) if e.get("ALPND_RESULT")]
    assert len(ok) == 1 and len(bad) == 1, (ok, bad)
    ok, bad = ok[0], bad[0]
    assert ok["SYSLOG_IDENTIFIER"] == "alpnd-respond"
    assert ok["ALPND_SNI"] == "v.example.org"
    assert ok["ALPND_RESULT"] == "ok" and ok["ALPND_EXIT"] == "0"
    assert ok["ALPND_KEY"] == "ECDSA-SECP256R1"
    assert float(ok["ALPND_DURATION_MS"]) > 0
    assert ok["ALPND_CLIENT"].startswith("127.0.0.1:")
    assert ok["PRIORITY"] == "6"
    assert bad["ALPND_SNI"] == "w.example.org"
    assert bad["ALPND_RESULT"] == "unrecognized_name"
    assert "w.example.org.crt.pem: No such file" in bad["ALPND_REASON"]
    assert bad["ALPND_EXIT"] == "65"
    # and nothing went to the stderr stream instead
    for path in outs:
        assert not any(e.get("SYSLOG_IDENTIFIER") == "alpnd-respond-stderr"
                       for e in entries(path))


def test_hello_retry_request_keeps_the_name(certs, responder):
    """TLS 1.3 HelloRetryRequest: the second ClientHello passes the same
    checks and may not switch to another name."""
    assert make(certs, "v.example.org").returncode == 0
    assert make(certs, "w.example.org").returncode == 0
    srv = responder()
    assert A.hrr_exchange(srv.port, b"v.example.org", b"V.example.org.") \
        == ("server_hello", None)
    assert A.hrr_exchange(srv.port, b"v.example.org", b"w.example.org") \
        == ("alert", A.ALERT_UNRECOGNIZED_NAME)
    kids = srv.wait(2)
    log = [k for k in kids if k.log()["result"] == "unrecognized_name"]
    assert len(log) == 1 and "SNI changed" in log[0].log()["reason"]
    assert A.hrr_exchange(srv.port, b"v.example.org", b"../w.example.org") \
        == ("alert", A.ALERT_UNRECOGNIZED_NAME)


# ------------------------------------------------------ contrib/uacme-hook

def test_uacme_hook(certs, tmp_path):
    b64 = base64.urlsafe_b64encode(DIGEST).rstrip(b"=").decode()
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text('#!/bin/sh\necho "$@" >> %s\n' % calls)
    fake.chmod(0o755)
    env = dict(os.environ, ALPND_CERTS=certs, ALPND_RESPOND=A.RESPOND)

    def hook(*args, **extra):
        return A.run([A.UACME_HOOK] + list(args), env=dict(env, **extra))

    # other challenge types are declined, so uacme tries the next one
    for t in ("http-01", "dns-01"):
        assert hook("begin", t, "v.example.org", "tok", b64).returncode == 1
    assert os.listdir(certs) == []
    assert hook("begin", "tls-alpn-01", "v.example.org").returncode == 85
    # begin -> a pair alpnd-respond would serve; done -> gone
    r = hook("begin", "tls-alpn-01", "v.example.org", "tok", b64)
    assert r.returncode == 0, r.stderr
    c = check(certs, "v.example.org")
    assert c.returncode == 0 and DIGEST.hex() in c.stdout
    assert hook("done", "tls-alpn-01", "v.example.org", "tok",
                b64).returncode == 0
    assert os.listdir(certs) == []
    # a hostile identifier is refused, nothing written
    assert hook("begin", "tls-alpn-01", "../x", "tok", b64).returncode == 65
    assert hook("begin", "tls-alpn-01", "-v.example.org", "tok",
                b64).returncode == 65
    assert os.listdir(certs) == []
    # the renewal window: the redirect unit runs only around a challenge
    u = dict(ALPND_REDIRECT_UNIT="alpnd-redirect.socket", SYSTEMCTL=str(fake))
    assert hook("begin", "tls-alpn-01", "192.0.2.1", "tok", b64,
                **u).returncode == 0
    assert check(certs, "192.0.2.1").returncode == 0
    assert hook("failed", "tls-alpn-01", "192.0.2.1", "tok", b64,
                **u).returncode == 0
    assert calls.read_text().split("\n")[:2] == \
        ["start alpnd-redirect.socket", "stop alpnd-redirect.socket"]
    assert os.listdir(certs) == []


def test_missing_certs_directory_still_answers(tmp_path):
    srv = A.Inetd([A.RESPOND, "--certs", str(tmp_path / "gone")])
    try:
        with pytest.raises(ssl.SSLError, match="(?i)unrecognized.name"):
            A.py_tls(srv.port, "v.example.org")
        ch = srv.last()
    finally:
        srv.close()
    assert ch.rc == 69
    assert ch.log()["reason"] == "certs directory %s: No such file or " \
        "directory" % (tmp_path / "gone")


# -------------------------------------------- real and validator-like hellos

HELLOS = os.path.join(A.ROOT, "tests", "hellos")


def captured_acme_hellos():
    rows = []
    try:
        with open(os.path.join(HELLOS, "INDEX")) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                fname, sni, alpn = line.split()[:3]
                if sni != "-" and "acme-tls/1" in alpn.split(","):
                    rows.append((fname, sni))
    except FileNotFoundError:
        pass
    return rows


@pytest.mark.skipif(not captured_acme_hellos(), reason="no captured hellos")
def test_captured_client_hellos(certs, responder):
    """ClientHellos captured from real clients (tests/hellos: Go crypto/tls
    as the validators use it, GnuTLS, OpenSSL incl. 2- and 3-record ones)
    replayed byte for byte: each gets a ServerHello with its certificate."""
    rows = captured_acme_hellos()
    for _, sni in rows:
        assert make(certs, sni).returncode == 0
    srv = responder()
    for i, (fname, sni) in enumerate(rows):
        with open(os.path.join(HELLOS, fname), "rb") as f:
            hello = f.read()
        assert A.raw_exchange(srv.port, hello) == ("server_hello", None), \
            fname
        ch = srv.wait(i + 1)[-1]
        assert ch.log()["sni"] == sni, ch.stderr
    assert len(rows) >= 3


def test_validator_like_post_quantum_hello(certs, responder):
    """Like Let's Encrypt's validator today: X25519MLKEM768 (0x11ec, 1216
    bytes) and X25519 key shares, > 1,200 bytes, here also split over three
    records sent as separate TCP segments.  GnuTLS 3.7 does not know the
    hybrid group and must pick X25519 - no HelloRetryRequest, no failure."""
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    hello = A.raw_client_hello13(
        b"v.example.org", os.urandom(32), groups=(0x11ec, 0x001d),
        shares=[(0x11ec, os.urandom(1216)), (0x001d, os.urandom(32))],
        record_max=512)
    assert len(hello) > 1200
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(hello), 450):
            s.sendall(hello[i:i + 450])
            time.sleep(0.02)            # separate segments, not a sync
        typ, body = A.read_record(s)
    assert typ == 0x16 and body[0] == 0x02, (typ, body[:8])
    assert body[6:38] != A.HRR_RANDOM               # a real ServerHello
    assert b"\x00\x33\x00\x24\x00\x1d\x00\x20" in body   # key_share X25519


@pytest.mark.parametrize("sni2,alpn2", [
    (b"w.example.org", b"\x00\x0b\x0aacme-tls/1"),     # another name
    (None, None),                                       # no SNI, no ALPN
    (b"w.example.org", b"\x00\x03\x02h2"),              # h2 only
])
def test_hello_retry_request_unparsable_second_hello(certs, responder, sni2, alpn2):
    """A second ClientHello that GnuTLS accepts but cannot be parsed as
    extensions (legacy_version 0x0403) is refused, not waved through the
    SNI and ALPN checks with the first hello's certificate loaded."""
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    out = A.hrr_exchange(srv.port, b"v.example.org", sni2,
                         version2=b"\x04\x03", alpn2=alpn2)
    assert out[0] == "alert", out
    log = srv.last(timeout=10).log()
    assert log["result"] != "ok", log


def test_trickled_hello_meets_the_deadline_and_logs(certs, responder):
    """One byte every 0.2 s must not stretch the handshake past
    --hello-timeout (GnuTLS's own timeout restarts with each byte), and the
    connection still gets its log line."""
    assert make(certs, "v.example.org").returncode == 0
    srv = responder(timeout=2)
    hello = A.raw_client_hello(b"v.example.org")
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        try:
            for b in hello:
                s.send(bytes([b]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 6:
                    break
        except OSError:
            pass                            # closed by the deadline
        ch = srv.last(timeout=10)
    took = time.monotonic() - t0
    assert ch.rc == 75, ch.stderr
    assert ch.log()["result"] == "timeout", ch.stderr
    assert took < 3.5, took


def _validator_like(port, name, pause):
    """An acme-tls/1 handshake shaped like Go's (pebble, Boulder): after
    the handshake the client looks at the certificate for `pause` seconds,
    sends close_notify and closes, never reading again.  Returns the
    certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([A.ACME_ALPN])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname=name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(50):                 # a handful of flights
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(out.read())
                b = s.recv(65536)
                assert b, "the server closed during the handshake"
                inc.write(b)
        s.sendall(out.read())               # Finished
        der = tls.getpeercert(binary_form=True)
        time.sleep(pause)                   # the scenario, not a wait
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        s.sendall(out.read())               # close_notify, then FIN
    return der


@needs_alpnd
def test_relayed_validation_closes_cleanly(certs, responder, echo_backend):
    """A validator that closes first sees nothing unread: an alpnd relaying
    to the responder logs "ok", not "reset".  Before the responder waited
    for the client's close, its close_notify arrived while the client was
    still looking at the certificate, so the client's close(2) reset the
    connection."""
    assert make(certs, "v.example.org").returncode == 0
    srv = responder()
    edge = A.Inetd([A.ALPND, "--fallback", echo_backend().addr,
                    "--acme", "127.0.0.1:%d" % srv.port, "--hello-timeout", "5"])
    try:
        for i in range(5):
            der = _validator_like(edge.port, "v.example.org", 0.05)
            assert der == served_der(certs, "v.example.org")
            ch = edge.wait(i + 1)[-1]
            lines = [ln for ln in ch.stderr.splitlines() if ln.startswith("alpnd[")]
            assert len(lines) == 1 and lines[0].endswith(" ok"), ch.stderr
        assert [c.log()["result"] for c in srv.wait(5)] == ["ok"] * 5
    finally:
        edge.close()
