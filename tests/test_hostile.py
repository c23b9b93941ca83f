"""Hostile input, faults and limits, through the running binaries.

Every case is one connection handed to a real alpnd (or alpnd-respond)
process as its stdin, inetd style, so each case has its own exit status
and its own stderr.  Each case states its expected outcome - the route
(which backend got the connection, or none), the exit code (sysexits, see
alpnd(8) EXIT STATUS), what the backend and the client received, a log line pattern
and a time bound - and the harness checks all of them, plus:

  - no sanitizer report (the asan build: ASan + UBSan, leaks on);
  - nothing left behind: no process carrying the case's marker in its
    environment, the client's and the backend's sockets see EOF once the
    process is gone, and where a relay ran, its descriptor table held
    exactly the two sockets and a splice pipe for each way past the
    copied first 64 KiB.

Each (case, build) pair is its own test.  The cases are independent, so
the selected ones run in a thread pool the first time a test asks for a
result; each test then checks its own.

  /usr/bin/python3 -m pytest -c tests/pytest.ini tests/test_hostile.py
  ALPND_VALGRIND=1 ... -k valgrind      (`make valgrind`: the main paths
                                          under valgrind memcheck)
"""
import errno
import hashlib
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostile_lib as H  # noqa: E402
from conftest import relayed_sums  # noqa: E402
from hostile_harness import (  # noqa: E402
    EX_DATAERR, EX_IOERR, EX_OK, EX_OSERR, EX_TEMPFAIL, EX_UNAVAILABLE,
    EX_USAGE, MARK_VAR, ROOT, SANITIZER_RE, VALGRIND_RE, Backend, Run,
    builds, drain, fd_table, marked_pids, run_connection, sanitizer_env,
    spawn, wait_epoll)

BUILDS = builds()
# strerror(EMFILE): glibc "Too many open files", musl "No file descriptors available".
EMFILE_RE = r"(?i)(too many open files|no file descriptors available)"
HT = 1                      # --hello-timeout for the deadline cases (seconds)
AUTH = "hostile-token.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
DIGEST = hashlib.sha256(AUTH.encode()).digest()
NAME = "example.test"
LONG253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])   # 253 bytes
LONG254 = LONG253 + "e"
IP6REV = ".".join(reversed("0" * 31 + "1")) + ".ip6.arpa"      # ::1, RFC 8738
REPLY = b"backend-reply\n"
H2 = [b"h2", b"http/1.1"]

# Router outcomes (alpnd(8) EXIT STATUS: sysexits).  Anything that is not a complete
# ClientHello offering acme-tls/1 (malformed, oversized, truncated by EOF,
# odd SNI) is relayed to the fallback intact (0); a malformed PROXY header
# is dropped (65) without touching any backend; a deadline is 75; a
# backend that cannot be reached is 69.
RC_BAD, RC_TIMEOUT, RC_UNAVAIL = EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE
# A relay whose peer broke the connection ends either way, but promptly.
RC_RELAY_BROKEN = (EX_OK, EX_IOERR)


@dataclass
class Case:
    name: str
    payload: bytes = b""            # what the default script sends
    script: object = None           # list of client actions, or f(ctx) -> list
    mode: str = "acme"              # acme | certs | respond
    args: tuple = ()                # extra command line arguments
    fallback: dict = field(default_factory=dict)   # Backend(**fallback)
    acme: dict = field(default_factory=dict)
    rc: object = EX_OK              # int or tuple of ints
    route: str = None               # fallback | acme | None (no backend),
                                    # or a tuple of those (any one of them)
    consumed: int = 0               # leading bytes the router eats (PROXY)
    up: object = "default"          # bytes the routed backend must get
    down: object = "default"        # bytes the client must get
    log: tuple = ()                 # regexes that must match stderr
    nolog: tuple = ()               # regexes that must not
    lines: int = None               # exact number of stderr lines
    tmin: float = 0.0
    tmax: float = 3.0               # wall time bound, start to exit (the
                                    # router's own deadline is 8 s here, so
                                    # "prompt" and "waited" stay apart)
    check: object = None            # f(run, ctx) -> [failures]
    vg: bool = False                # part of the valgrind pass
    family: str = "tcp4"
    stdio: str = "pipe"             # see run_connection
    xfail: str = None               # a known bug, reported: strict xfail
    presend: bytes = b""            # sent before the process starts
    custom: object = None           # f(build, ctx) -> (run, failures)
    alert: int = None               # expected TLS alert from the server
    served: str = None              # the certificate NAME must be served
    send_proxy: dict = None         # expected --send-proxy header fields

    def __post_init__(self):
        if self.script is None:
            self.script = [("send", self.payload), ("shut",), ("read", self.tmax + 1)]


CASES = []


def case(*a, **kw):
    c = Case(*a, **kw)
    assert c.name not in [x.name for x in CASES], c.name
    CASES.append(c)
    return c


def hello(**kw):
    return H.hello_wire(**kw)


def acme_hello(**kw):
    kw.setdefault("alpn", (H.ACME,))
    return H.hello_wire(**kw)


def h2_hello(**kw):
    kw.setdefault("alpn", H2)
    return H.hello_wire(**kw)


def bad(name, payload, **kw):
    """A malformed, oversized or truncated hello, or an odd SNI: not a
    ClientHello offering acme-tls/1, so relayed to the fallback intact and
    the web server answers it (transparency), exit 0."""
    kw.setdefault("route", "fallback")
    return case(name, payload, **kw)


def dropped(name, payload, log=(r"bad PROXY|truncated PROXY",), **kw):
    """A malformed PROXY header: dropped at once, no backend, exit 65."""
    kw.setdefault("rc", RC_BAD)
    kw.setdefault("route", None)
    kw.setdefault("tmax", 1.5)
    return case(name, payload, log=log, **kw)


def odd_sni(name, sni, **kw):
    """A well-formed acme-tls/1 hello whose SNI is no host name: alpnd does
    not judge names (alpnd-respond does, where a name becomes a file name,
    see the respond_sni_* cases), so it takes the ACME route."""
    kw.setdefault("route", "acme")
    return case(name, acme_hello(sni=sni), **kw)


# === routing of well-formed hellos ==============================================
case("acme_route", acme_hello(), route="acme", vg=True)
case("fallback_h2", h2_hello(), route="fallback", vg=True)
case("fallback_no_alpn", hello(alpn=None), route="fallback")
case("acme_among_others", hello(alpn=[b"h2", H.ACME, b"http/1.1"]), route="acme")
case("acme_lookalike_upper", hello(alpn=[b"ACME-TLS/1"]), route="fallback")
case("acme_lookalike_prefix", hello(alpn=[b"acme-tls/10", b"acme-tls/", b"acme-tls"]),
     route="fallback")
case("acme_lookalike_nul", hello(alpn=[b"acme-tls/1\0"]), route="fallback")
case("hello_in_7_byte_records", acme_hello(size=7), route="acme")
case("hello_in_1_byte_records", acme_hello(size=1), route="acme")
case("hello_1_byte_segments", script=[("drip", acme_hello(key_share=False), 0.002),
                                      ("shut",), ("read", 3)], route="acme",
     up=None, tmax=3.0)
case("hello_pq_sized_2_segments",
     script=lambda c: [("send", c.p[:700]), ("sleep", 0.1), ("send", c.p[700:]),
                       ("shut",), ("read", 3)],
     payload=H.records(H.pad_hello_to(1250, alpn=(H.ACME,))), route="acme")
case("hello_exactly_16384", H.records(H.pad_hello_to(16384, alpn=(H.ACME,))), route="acme")
bad("hello_16385", H.records(H.pad_hello_to(16385, alpn=(H.ACME,))), vg=True)
bad("hello_wire_over_32k", H.records(H.pad_hello_to(6000, alpn=(H.ACME,)), size=1))
case("no_extensions_tls12", hello(no_extensions=True, alpn=None), route="fallback")
case("ech_outer_acme", acme_hello(extra=[H.ext(H.EXT_ECH, b"\x00" + os.urandom(40))]),
     route="acme")
case("grease_extensions", acme_hello(extra=[H.ext(0x0a0a, b""), H.ext(0xfafa, b"\x00")]),
     route="acme")

# === record layer ==============================================================
bad("record_len_zero", H.record(b"", rlen=0) + acme_hello())
bad("record_len_16385", H.record(b"\x01" + b"\x00" * 20, rlen=16385))
bad("record_len_ffff", H.record(b"\x01\x00\x01\x00", rlen=0xffff))
bad("record_version_3_9", H.records(H.client_hello(), version=0x0309))
case("record_major_2_not_tls", H.records(H.client_hello(), version=0x0203),
     route="fallback")
case("ct_application_data_first", H.record(b"hello", ctype=H.CT_APPDATA), route="fallback")
case("ct_alert_first", H.record(b"\x02\x28", ctype=H.CT_ALERT), route="fallback")
case("ct_ccs_first", H.record(b"\x01", ctype=H.CT_CCS), route="fallback")
case("ct_heartbeat_first", H.record(b"\x01\x00\x10" + b"x" * 16, ctype=24),
     route="fallback")
_ch = H.client_hello()
bad("ct_alert_interleaved", H.record(_ch[:50]) + H.record(b"\x02\x28", ctype=H.CT_ALERT) +
    H.record(_ch[50:]))
bad("ct_appdata_after_partial", H.record(_ch[:50]) + H.record(_ch[50:], ctype=H.CT_APPDATA))
bad("hs_type_server_hello", H.records(H.client_hello(hs_type=H.HS_SERVER_HELLO)))
bad("hs_len_over_16k", H.record(b"\x01\x01\x00\x00" + b"\x00" * 100))
bad("hs_trailing_byte_in_record", H.record(H.client_hello() + b"\x00"))
bad("hs_len_short", H.records(H.client_hello(hs_len=len(H.client_hello()) - 4 - 10)))
bad("hs_body_short_by_one", H.records(H.handshake(H.client_hello_body()[:-1])))
bad("ext_block_len_overrun", H.records(H.handshake(
    H.client_hello_body(extensions=[H.ext(H.EXT_ALPN, H.alpn_data(H.ACME))], ext_len=500))))
bad("ext_block_len_underrun", H.records(H.handshake(
    H.client_hello_body(extensions=[H.ext(H.EXT_ALPN, H.alpn_data(H.ACME))], ext_len=3))))
bad("ext_data_len_lies", H.records(H.handshake(H.client_hello_body(
    extra=[H.ext(H.EXT_ALPN, H.alpn_data(H.ACME), length=40)], alpn=None))))
bad("dup_alpn", acme_hello(extra=[H.ext(H.EXT_ALPN, H.alpn_data(b"h2"))]), vg=True)
bad("dup_alpn_contradictory", hello(alpn=[b"h2"], extra=[H.ext(H.EXT_ALPN, H.alpn_data(H.ACME))]))
bad("dup_sni", acme_hello(extra=[H.ext(H.EXT_SNI, H.sni_data(b"other.test"))]))
bad("dup_unknown_ext", acme_hello(extra=[H.ext(0x1234, b""), H.ext(0x1234, b"x")]))
bad("dup_supported_versions", acme_hello(extra=[H.ext(H.EXT_VERSIONS, H.versions_data(H.TLS12))]))
bad("psk_not_last", acme_hello(extra=[H.ext(H.EXT_PSK, b"\x00" * 10), H.ext(0x4444, b"")]))
bad("versions_odd_len", acme_hello(versions=None, extra=[H.ext(H.EXT_VERSIONS, H.vec8(b"\x03\x04\x03"))]))
bad("versions_empty", acme_hello(versions=None, extra=[H.ext(H.EXT_VERSIONS, H.vec8(b""))]))
bad("legacy_version_2_0", acme_hello(legacy_version=0x0200))
bad("session_id_33", acme_hello(session_id=b"\x00" * 33))
bad("cipher_suites_empty", acme_hello(suites=[]))
bad("compression_empty", acme_hello(compression=b""))
bad("body_truncated_in_random", H.records(H.handshake(b"\x03\x03" + b"\x00" * 10)))

# === SNI at the router: not alpnd's to judge; malformed lists go to the fallback ===
odd_sni("sni_nul", b"exa\x00mple.test", vg=True)
odd_sni("sni_slash_traversal", b"../../etc/passwd")
odd_sni("sni_slash", b"a/b.test")
odd_sni("sni_dotdot", b"example..test")
odd_sni("sni_254_bytes", LONG254.encode())
odd_sni("sni_two_trailing_dots", b"example.test..")
odd_sni("sni_space", b"exa mple.test")
odd_sni("sni_utf8", "ex\u00e4mple.test".encode())
odd_sni("sni_wildcard", b"*.example.test")
odd_sni("sni_leading_hyphen", b"-example.test")
odd_sni("sni_label_64", (b"a" * 64) + b".test")
odd_sni("sni_log_injection", b"a.test\nalpnd[1]: forged line", lines=1)
bad("sni_empty_name", acme_hello(sni=None, extra=[H.ext(H.EXT_SNI, H.sni_data(b""))]))
bad("sni_empty_list", acme_hello(sni=None, extra=[H.ext(H.EXT_SNI, H.u16(0))]))
bad("sni_two_host_names", acme_hello(sni=None, extra=[H.ext(H.EXT_SNI, H.sni_data(b"a.test", b"b.test"))]))
bad("sni_name_type_1", acme_hello(sni=None, extra=[H.ext(H.EXT_SNI, H.sni_data(b"a.test", name_type=1))]))
bad("sni_list_len_lies", acme_hello(sni=None, extra=[H.ext(H.EXT_SNI, H.sni_data(b"a.test", list_len=3))]))

# === seeded mutants of a valid hello: routed intact (0), never dropped ===
def _mutants(n, seed=8737):
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = bytearray(acme_hello(size=rng.choice([16384, 100, 7]), random=b"\x01" * 32,
                                    session_id=b"\x02" * 32, key_share=b"\x03" * 32))
        how = rng.choice(["flip", "flip3", "truncate", "insert", "dup", "len", "zero"])
        if how.startswith("flip"):
            for _ in range(1 if how == "flip" else 3):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            del base[rng.randrange(1, len(base)):]
        elif how == "insert":
            at = rng.randrange(len(base))
            base[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif how == "dup":
            a_ = rng.randrange(len(base))
            b_ = rng.randrange(a_, min(len(base), a_ + 40) + 1)
            base[b_:b_] = base[a_:b_]
        elif how == "len":
            at = rng.randrange(len(base) - 1)
            base[at:at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x40\x01"])
        else:
            at = rng.randrange(len(base))
            base[at:at + rng.randrange(1, 16)] = bytes(16)
        out.append(("mutant_%02d_%s" % (i, how), bytes(base)))
    return out


for _name, _p in _mutants(40):
    case(_name, _p, route="any", rc=EX_OK)

# === ALPN ======================================================================
bad("alpn_empty_list", hello(alpn=None, extra=[H.ext(H.EXT_ALPN, H.u16(0))]))
bad("alpn_empty_extension", hello(alpn=None, extra=[H.ext(H.EXT_ALPN, b"")]))
bad("alpn_zero_length_name", hello(alpn=[b"", H.ACME]))
bad("alpn_list_len_lies", hello(alpn=None, extra=[H.ext(H.EXT_ALPN, H.alpn_data(H.ACME, list_len=20))]))
case("alpn_log_injection", hello(alpn=[b"h2\nalpnd[1]: forged \x1b[31mred"]),
     route="fallback", lines=1, nolog=(r"\x1b",))
case("alpn_255_byte_name", hello(alpn=[b"x" * 255, H.ACME]), route="acme")

# === not TLS at all: relayed intact ===============================================
case("sslv2_hello", H.sslv2_hello(), route="fallback")
case("plain_http", b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", route="fallback", vg=True)
case("one_nul_byte", b"\x00", route="fallback")
case("binary_garbage_64k", b"\x42" + os.urandom(65535), route="fallback")

# === slow and silent clients: the hello deadline covers everything ===================
T = ("-t", str(HT))
DL = dict(rc=RC_TIMEOUT, route=None, args=T, tmin=HT - 0.05, tmax=HT + 2.5,
          log=(r"timeout waiting for the (ClientHello|PROXY header)",))
case("silent_client", script=[("sleep", HT + 3)], **dict(DL, vg=True))
case("stall_after_1_byte", script=[("send", b"\x16"), ("sleep", HT + 3)], **DL)
case("stall_in_record_header", script=[("send", acme_hello()[:3]), ("sleep", HT + 3)], **DL)
case("stall_in_hello_body", script=[("send", acme_hello()[:100]), ("sleep", HT + 3)], **DL)
case("stall_between_records", script=[("send", acme_hello(size=64)[:69]), ("sleep", HT + 3)], **DL)
case("slowloris_drip", script=[("drip", acme_hello(), 0.05)], **DL)
_t = acme_hello()[:100]
bad("truncated_hello_then_eof", _t, script=[("send", _t), ("shut",), ("read", 3)], args=T)
case("client_closes_silently", script=[("shut",), ("read", 3)], rc=EX_OK, route=None, args=T,
     log=(r"closed before any data",), tmax=3.0)
case("client_resets_silently", script=[("rst",)], rc=EX_OK, route=None, args=T, tmax=3.0)
# The client is gone: relaying what it sent before the reset, or not, is
# the same to everyone.
case("client_resets_during_peek", script=[("send", acme_hello()[:100]), ("sleep", 0.1), ("rst",)],
     rc=(EX_OK, EX_DATAERR, EX_IOERR), route=(None, "fallback"), args=T, tmax=3.0)

# === PROXY protocol in (--accept-proxy) ===============================================
P = ("--accept-proxy",)
_h = h2_hello()


def proxied(name, header, route="fallback", log=(), **kw):
    kw.setdefault("args", P)
    return case(name, header + _h, route=route, consumed=len(header), log=log, **kw)


def proxy_bad(name, header, **kw):
    kw.setdefault("args", P)
    return dropped(name, header + _h, **kw)


proxied("proxy_v1_tcp4", H.proxy_v1(), log=(r"192\.0\.2\.1",), vg=True)
proxied("proxy_v1_tcp6", H.proxy_v1("TCP6", "2001:db8::1", "2001:db8::2"), log=(r"2001:db8::1",))
proxied("proxy_v1_unknown", H.proxy_v1("UNKNOWN"), log=(r"127\.0\.0\.1",))
proxied("proxy_v1_max_107", H.proxy_v1("TCP6", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535, 65535))
proxy_bad("proxy_v1_garbage", b"PROXY FOO bar baz\r\n")
proxy_bad("proxy_v1_no_crlf", b"PROXY TCP4 " + b"1" * 200)
proxy_bad("proxy_v1_lf_only", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n")
proxy_bad("proxy_v1_bad_ip", H.proxy_v1(src="999.0.2.1"))
proxy_bad("proxy_v1_port_65536", H.proxy_v1(sport=65536))
proxy_bad("proxy_v1_wrong_family", H.proxy_v1("TCP4", "2001:db8::1", "2001:db8::2"))
proxy_bad("proxy_v1_tcp6_with_ipv4", H.proxy_v1("TCP6"))
proxy_bad("proxy_v2_tcp4_with_tcp6_block",
          H.proxy_v2(fam=H.V2_TCP4, addr=H.proxy_v2(fam=H.V2_TCP6, src="2001:db8::1",
                                                     dst="2001:db8::2")[16:]))
proxy_bad("proxy_v1_nul", b"PROXY TCP4 192.0.2.1\x00 198.51.100.2 1 2\r\n")
proxy_bad("proxy_v1_truncated_eof", b"PROXY TCP4 192.0.2.1 ", script=[
    ("send", b"PROXY TCP4 192.0.2.1 "), ("shut",), ("read", 3)])
case("proxy_v1_truncated_stall", script=[("send", b"PROXY TCP4 192.0.2.1 "),
                                         ("sleep", HT + 3)], **dict(DL, args=P + T))
proxied("proxy_v2_tcp4", H.proxy_v2(), log=(r"192\.0\.2\.1",), vg=True)
proxied("proxy_v2_tcp6", H.proxy_v2(fam=H.V2_TCP6, src="2001:db8::7", dst="2001:db8::8"),
        log=(r"2001:db8::7",))
proxied("proxy_v2_local", H.proxy_v2(cmd=H.V2_LOCAL, fam=H.V2_UNSPEC), log=(r"127\.0\.0\.1",))
proxied("proxy_v2_unspec", H.proxy_v2(fam=H.V2_UNSPEC, addr=b"ignored"))
proxied("proxy_v2_unix", H.proxy_v2(fam=H.V2_UNIX))
proxied("proxy_v2_tlvs", H.proxy_v2(tlvs=[(0x01, b"h2"), (0x02, b"example.test"), (0xee, b"")]),
        log=(r"192\.0\.2\.1",))
proxied("proxy_v2_4080_bytes", H.proxy_v2(tlvs=[(0xee, b"t" * (4096 - 16 - 12 - 3))]))
proxy_bad("proxy_v2_len_ffff", H.proxy_v2(length=0xffff)[:16], vg=True)
proxy_bad("proxy_v2_len_4081", H.proxy_v2(tlvs=[(0xee, b"t" * (4097 - 16 - 12 - 3))]))
proxy_bad("proxy_v2_short_for_family", H.proxy_v2(addr=b"\xc0\x00\x02\x01"))
proxy_bad("proxy_v2_version_1", H.proxy_v2(version=1))
proxy_bad("proxy_v2_command_2", H.proxy_v2(cmd=2))
proxy_bad("proxy_v2_family_4", H.proxy_v2(fam=0x41, addr=b"x" * 12))
proxy_bad("proxy_v2_dgram", H.proxy_v2(fam=0x12))
proxy_bad("proxy_v2_tlv_overrun", H.proxy_v2(addr=H.proxy_v2()[16:] + b"\x01\x00\x09ab"))
proxy_bad("proxy_v2_bad_signature", b"\r\n\r\n\x00\r\nQUIX\n" + H.proxy_v2()[12:])
proxy_bad("proxy_missing", b"")
proxy_bad("proxy_v2_truncated_eof", H.proxy_v2()[:20], script=[
    ("send", H.proxy_v2()[:20]), ("shut",), ("read", 3)])
case("proxy_v2_truncated_stall", script=[("send", H.proxy_v2()[:14]), ("sleep", HT + 3)],
     **dict(DL, args=P + T))
case("proxy_ok_then_slow_hello", script=[("send", H.proxy_v2()), ("drip", _h, 0.05)],
     **dict(DL, args=P + T))
case("proxy_acme_route", H.proxy_v2() + acme_hello(), route="acme", args=P,
    consumed=len(H.proxy_v2()))
_twice = H.proxy_v1(src="192.0.2.9") + H.proxy_v1(src="203.0.113.66")
case("proxy_header_twice", _twice + _h, route="fallback", args=P + ("--send-proxy", "v1"),
     consumed=len(H.proxy_v1(src="192.0.2.9")),
     send_proxy=dict(version=1, family="TCP4", src="192.0.2.9"))

# === PROXY protocol out (--send-proxy) ================================================
case("send_proxy_v1_tcp4", _h, route="fallback", args=("--send-proxy", "v1"),
     send_proxy=dict(version=1, family="TCP4", src="127.0.0.1"), vg=True)
case("send_proxy_v2_tcp4", _h, route="fallback", args=("--send-proxy", "v2"),
     send_proxy=dict(version=2, family="TCP4", src="127.0.0.1"))
case("send_proxy_v1_tcp6", _h, route="fallback", args=("--send-proxy", "v1"), family="tcp6",
     send_proxy=dict(version=1, family="TCP6", src="::1"))
case("send_proxy_v2_tcp6", _h, route="fallback", args=("--send-proxy", "v2"), family="tcp6",
     send_proxy=dict(version=2, family="TCP6", src="::1"))
case("accept_v2_send_v1", H.proxy_v2(src="192.0.2.44", sport=5555) + _h, route="fallback",
     args=P + ("--send-proxy", "v1"), consumed=len(H.proxy_v2()),
     send_proxy=dict(version=1, family="TCP4", src="192.0.2.44", sport=5555))
case("accept_v1_tcp6_send_v2", H.proxy_v1("TCP6", "2001:db8::5", "2001:db8::6", 7, 443) + _h,
     route="fallback", args=P + ("--send-proxy", "v2"),
     consumed=len(H.proxy_v1("TCP6", "2001:db8::5", "2001:db8::6", 7, 443)),
     send_proxy=dict(version=2, family="TCP6", src="2001:db8::5", sport=7))
case("accept_v2_local_send_v2", H.proxy_v2(cmd=H.V2_LOCAL, fam=H.V2_UNSPEC) + _h,
     route="fallback", args=P + ("--send-proxy", "v2"),
     consumed=len(H.proxy_v2(cmd=H.V2_LOCAL, fam=H.V2_UNSPEC)),
     send_proxy=dict(version=2, family="TCP4", src="127.0.0.1"))
case("send_proxy_v1_unix_client", _h, route="fallback", args=("--send-proxy", "v1"), family="unix",
     send_proxy=dict(version=1, family="UNKNOWN"))
case("send_proxy_v2_unix_client", _h, route="fallback", args=("--send-proxy", "v2"), family="unix",
     send_proxy=dict(version=2, cmd=H.V2_LOCAL, family="UNKNOWN"))
case("send_proxy_v1_mapped_ipv4", _h, route="fallback", args=("--send-proxy", "v1"),
     family="mapped", send_proxy=dict(version=1, family="TCP4", src="127.0.0.1"),
     log=(r"alpnd\[\d+\]: 127\.0\.0\.1:",))
case("send_proxy_v2_mapped_ipv4", _h, route="fallback", args=("--send-proxy", "v2"),
     family="mapped", send_proxy=dict(version=2, family="TCP4", src="127.0.0.1"))
case("accept_proxy_from_unix_client", H.proxy_v1(src="192.0.2.8") + _h, route="fallback",
     args=P + ("--send-proxy", "v2"), family="unix", consumed=len(H.proxy_v1(src="192.0.2.8")),
     send_proxy=dict(version=2, family="TCP4", src="192.0.2.8"))
case("send_proxy_not_to_acme", acme_hello(), route="acme", args=("--send-proxy", "v2"))

# === backends that refuse, reset, black-hole, close early =============================
case("fallback_refuses", _h, fallback=dict(behaviour="refuse"), rc=RC_UNAVAIL, route=None,
     tmax=3.0, vg=True)
case("fallback_syn_blackhole", _h, fallback=dict(behaviour="synblock"), rc=RC_UNAVAIL,
     route=None, args=T, tmin=HT - 0.05, tmax=HT + 2.5, log=(r"timed out",))
case("acme_backend_refuses", acme_hello(), acme=dict(behaviour="refuse"), rc=RC_UNAVAIL,
     route=None, tmax=3.0)
case("acme_backend_syn_blackhole", acme_hello(), acme=dict(behaviour="synblock"),
     rc=RC_UNAVAIL, route=None, args=T, tmin=HT - 0.05, tmax=HT + 2.5, log=(r"timed out",))
case("acme_backend_resets", acme_hello(), acme=dict(behaviour="reset"),
     rc=RC_RELAY_BROKEN + (EX_UNAVAILABLE,), route="acme", up=None, down=b"")
case("acme_backend_closes_early", acme_hello(), acme=dict(behaviour="close"),
     rc=RC_RELAY_BROKEN + (EX_UNAVAILABLE,), route="acme", up=None, down=b"")
case("unix_fallback_missing", _h, fallback=dict(behaviour="refuse", unix=True), rc=RC_UNAVAIL,
     route=None, tmax=3.0)
case("unix_fallback", _h, fallback=dict(unix=True), route="fallback")
case("fallback_resets_at_once", _h, fallback=dict(behaviour="reset"),
     rc=RC_RELAY_BROKEN + (EX_UNAVAILABLE,),         # the RST may beat the connect
     route="fallback", up=None, down=b"", tmax=3.0)
case("fallback_resets_mid_upload",
     script=[("send", _h + os.urandom(1 << 20)), ("read", 3)],
     fallback=dict(behaviour="reset", after=4096), rc=RC_RELAY_BROKEN, route="fallback",
     up=None, down=b"", tmax=3.0)
case("fallback_closes_early", _h, fallback=dict(behaviour="close"), rc=RC_RELAY_BROKEN,
     route="fallback", up=None, down=b"", tmax=3.0)
case("fallback_half_closes_first",
     script=lambda c: [("send", _h), ("readn", len(REPLY), 2), ("send", c.big), ("shut",),
                       ("read", 3)],
     fallback=dict(behaviour="halfclose", reply=REPLY), route="fallback",
     up=lambda c: _h + c.big, down=REPLY)
case("fallback_speaks_first", fallback=dict(behaviour="first", reply=REPLY * 1000),
     payload=_h, route="fallback", down=REPLY * 1000)
case("fallback_blackhole_idle_timeout", script=[("send", _h), ("sleep", 4)],
     fallback=dict(behaviour="blackhole"), args=("-i", "1"), rc=(EX_OK, EX_TEMPFAIL),
     route="fallback", up=None, down=b"", tmin=0.9, tmax=3.0)
case("client_idle_timeout", script=[("send", _h), ("sleep", 4)], args=("-i", "1"),
     rc=(EX_OK, EX_TEMPFAIL), route="fallback", up=None, down=b"", tmin=0.9, tmax=3.0)
case("client_never_reads_flood", script=[("send", _h), ("sleep", 4)],
     fallback=dict(behaviour="flood", size=32 << 20), args=("-i", "1"),
     rc=(EX_OK, EX_TEMPFAIL, EX_IOERR), route="fallback", up=None, down=None, tmin=0.9,
     tmax=3.5)
case("client_resets_mid_relay",
     script=lambda c: [("send", _h + c.big), ("wait_backend", c.fb, 2), ("sleep", 0.2),
                       ("rst",)],
     fallback=dict(behaviour="blackhole"), rc=RC_RELAY_BROKEN, route="fallback", up=None,
     down=None, tmax=3.0)
case("client_resets_mid_download",
     script=[("send", _h), ("readn", 100000, 2), ("rst",)],
     fallback=dict(behaviour="flood", size=32 << 20), rc=RC_RELAY_BROKEN, route="fallback",
     up=None, down=None, tmax=3.0)
case("relay_4mib_both_ways",
     script=lambda c: [("send", _h + c.big4), ("shut",), ("read", 5)],
     fallback=dict(behaviour="echo"), route="fallback",
     up=lambda c: _h + c.big4, down=lambda c: _h + c.big4, tmax=5.0, vg=True)
case("relay_ipv6_client", _h, route="fallback", family="tcp6", log=(r"::1",))
case("inetd_stdout_is_socket", _h, route="fallback", stdio="stdout")
# inetd without an error stream: fd 2 is the client's socket.  Not one log
# byte may reach the client (alpnd logs to syslog then).
case("inetd_stderr_is_socket", _h, route="fallback", stdio="socket")
case("inetd_stderr_is_socket_respond", acme_hello(sni=b"nosuch.test"), mode="certs",
     stdio="socket", rc=EX_DATAERR, route=None,
     down=H.record(b"\x02\x70", ctype=H.CT_ALERT, version=H.TLS12))
# The log reader died (multilog, a logger pipe): writing the log line must
# not kill the process with SIGPIPE, in any outcome.
case("stderr_broken_pipe_relay", _h, route="fallback", stdio="brokenpipe")
bad("stderr_broken_pipe_bad_hello", acme_hello(extra=[H.ext(H.EXT_ALPN, H.alpn_data(b"h2"))]),
    stdio="brokenpipe", log=())
case("stderr_broken_pipe_timeout", script=[("sleep", HT + 3)], stdio="brokenpipe",
     **dict(DL, log=()))
case("stderr_broken_pipe_respond", acme_hello(sni=b"nosuch.test"), mode="certs",
     stdio="brokenpipe", rc=EX_DATAERR, route=None,
     down=H.record(b"\x02\x70", ctype=H.CT_ALERT, version=H.TLS12))
case("respond_broken_pipe", acme_hello(sni=b"nosuch.test"), mode="respond",
     stdio="brokenpipe", rc=EX_DATAERR, route=None,
     down=H.record(b"\x02\x70", ctype=H.CT_ALERT, version=H.TLS12))
# A launcher that leaves fd 2 closed: the first socket alpnd opens becomes
# fd 2, and log lines must not be written into it (here: the backend's).
case("stderr_closed_log_not_relayed", presend=_h,
     script=lambda c: [("wait_backend", c.fb, 2), ("sleep", 0.2), ("rst",)],
     payload=_h, fallback=dict(behaviour="record"), stdio="closed", rc=RC_RELAY_BROKEN,
     route="fallback", down=None, tmax=3.0)

# === the ACME responder behind the router (--certs) ===================================
C = dict(mode="certs")
case("certs_served", script=[("tls", NAME, ["acme-tls/1"])], served=NAME, route=None,
     log=(r"\bok\b",), vg=True, **C)
case("certs_served_upper_case", script=[("tls", NAME.upper(), ["acme-tls/1"])], served=NAME,
     route=None, **C)
case("certs_served_trailing_dot", script=[("tls", NAME + ".", ["acme-tls/1"])], served=NAME,
     route=None, **C)
case("certs_served_ip_reverse_name",
     script=[("tls", "1.0.0.127.in-addr.arpa", ["acme-tls/1"])],
     served="1.0.0.127.in-addr.arpa", route=None, **C)
case("certs_acme_with_h2", script=[("tls", NAME, ["h2", "acme-tls/1"])], served=NAME,
     route=None, **C)
_rej = dict(rc=EX_DATAERR, route=None, alert=H.ALERT_UNRECOGNIZED_NAME, **C)


def rejected(name, payload, why, **kw):
    kw = dict(_rej, **kw)
    kw.setdefault("script", [("send", payload), ("flight", 3), ("shut",), ("read", 3)])
    return case(name, payload, log=(why,), **kw)


rejected("certs_unknown_name", acme_hello(sni=b"nosuch.test"), r"unrecognized_name", vg=True)
rejected("certs_ip_literal_sni", acme_hello(sni=b"127.0.0.1"), r"unrecognized_name")
rejected("certs_253_byte_name", acme_hello(sni=LONG253.encode()), r"unrecognized_name")
rejected("certs_not_a_challenge_cert", acme_hello(sni=b"plain.test"), r"unrecognized_name",
         vg=True)
rejected("certs_acmeid_not_critical", acme_hello(sni=b"noncrit.test"), r"unrecognized_name")
rejected("certs_san_mismatch", acme_hello(sni=b"wrongsan.test"), r"unrecognized_name")
rejected("certs_no_sni", acme_hello(sni=None), r"unrecognized_name")
rejected("certs_tls10_only", acme_hello(versions=None, legacy_version=H.TLS10),
         r"tls_error|protocol", alert=H.ALERT_PROTOCOL_VERSION)
case("certs_served_ipv6_reverse_name",
     script=[("tls", IP6REV, ["acme-tls/1"])], served=IP6REV, route=None, **C)
case("certs_hello_dripped_then_exec",
     script=[("drip", acme_hello(versions=(H.TLS12,), key_share=False), 0.002), ("flight", 5),
             ("shut",), ("read", 3)],
     served=NAME, rc=(EX_IOERR, EX_DATAERR), route=None, tmax=5.0, **C)

# Hostile certificate directory content: alpnd-respond opens NAME.crt.pem
# and NAME.key.pem inside the directory only (O_NOFOLLOW, regular files,
# bounded size) and never blocks on them.
E_ = dict(mode="evil", rc=EX_DATAERR, route=None, alert=H.ALERT_UNRECOGNIZED_NAME)
for _l, _n, _why in (("symlink", "example.test", r"(?i)symbolic link|symlink|too many levels"),
                     ("fifo", "fifo.test", r"(?i)not a regular file|fifo"),
                     ("directory", "dir.test", r"(?i)not a regular file|directory"),
                     ("64mib_file", "huge.test", r"(?i)size|large|bytes"),
                     ("empty_file", "empty.test", r"(?i)size|empty|bytes")):
    rejected("certs_dir_%s_refused" % _l, acme_hello(sni=_n.encode()), _why, **E_)
# PROXY header, then a real validation: the header is consumed before the
# exec, and the responder's log line names the client from the header.
case("proxy_then_certs_served", script=[("send", H.proxy_v2(src="192.0.2.77")),
                                        ("tls", NAME, ["acme-tls/1"])],
     served=NAME, route=None, args=P, log=(r"alpnd-respond\[\d+\]: 192\.0\.2\.77",), **C)
case("certs_client_stalls_mid_handshake",
     script=[("send", acme_hello(versions=(H.TLS12,))), ("flight", 3), ("fds",),
             ("sleep", HT + 3)],
     rc=EX_TEMPFAIL, route=None, args=T, tmin=HT - 0.05, tmax=HT + 2.5,
     log=(r"timeout",), **C)
case("certs_client_resets_mid_handshake",
     script=[("send", acme_hello(versions=(H.TLS12,))), ("flight", 3), ("rst",)],
     rc=(EX_IOERR, EX_DATAERR), route=None, tmax=3.0, **C)
case("certs_plain_http_goes_to_fallback", b"GET / HTTP/1.0\r\n\r\n", route="fallback", **C)

# === alpnd-respond alone (inetd-style ACME-only port): its own SNI checks ================
R = dict(mode="respond")
_rr = dict(_rej, mode="respond")


def r_rejected(name, payload, why, **kw):
    return rejected(name, payload, why, **dict(_rr, **kw))


r_rejected("respond_sni_nul", acme_hello(sni=b"example\x00.test"), r"NUL", vg=True)
r_rejected("respond_sni_traversal", acme_hello(sni=b"../../../etc/passwd"), r"unrecognized_name")
r_rejected("respond_sni_slash", acme_hello(sni=b"example.test/x"), r"unrecognized_name")
r_rejected("respond_sni_dotdot", acme_hello(sni=b"example..test"), r"unrecognized_name")
r_rejected("respond_sni_254", acme_hello(sni=LONG254.encode()), r"unrecognized_name")
r_rejected("respond_sni_two_trailing_dots", acme_hello(sni=b"example.test.."),
           r"unrecognized_name")
r_rejected("respond_sni_log_injection", acme_hello(sni=b"x.test\nalpnd-respond[1]: forged"),
           r"unrecognized_name", lines=1)
r_rejected("respond_no_acme_alpn", hello(alpn=[b"h2"]), r"no_acme_alpn",
           alert=H.ALERT_NO_APPLICATION_PROTOCOL)
r_rejected("respond_no_alpn", hello(alpn=None), r"no_acme_alpn",
           alert=H.ALERT_NO_APPLICATION_PROTOCOL)
case("respond_upper_trailing_dot_tls12",
     script=[("send", acme_hello(sni=b"EXAMPLE.Test.", versions=(H.TLS12,))), ("flight", 3),
             ("shut",), ("read", 3)],
     served=NAME, rc=(EX_IOERR, EX_DATAERR), route=None, **R)
case("respond_plain_http", b"GET / HTTP/1.1\r\n\r\n", rc=(EX_DATAERR, EX_IOERR), route=None,
     down=None, **R)
case("respond_sslv2", H.sslv2_hello(), rc=(EX_DATAERR, EX_IOERR), route=None, down=None, **R)
case("respond_empty_alpn_list", hello(alpn=None, extra=[H.ext(H.EXT_ALPN, H.u16(0))]),
     rc=(EX_DATAERR,), route=None, down=None, **R)
case("respond_silent_client", script=[("sleep", HT + 4)], rc=EX_TEMPFAIL, route=None,
     args=T, tmin=HT - 0.05, tmax=HT + 2.5, **R)


# === launch errors ============================================================
def usage_case(name, argv_tail, stdin="socket", log=r".", rc=EX_USAGE):
    def run_it(build, ctx):
        alpnd = ctx.bin(build)[0]
        argv = ctx.wrap(build) + [str(alpnd)] + [a.format(**ctx.fmt) for a in argv_tail]
        run = Run()
        env = ctx.env(build, run)
        if stdin == "socket":
            p = run_connection(argv, [("read", 3)], run, env, wait_max=5)
        else:
            if stdin == "devnull":
                fin = open(os.devnull, "rb")
            elif stdin == "file":
                fin = open(__file__, "rb")
            else:
                r, w = os.pipe()
                fin = os.fdopen(r, "rb")
            t0 = time.monotonic()
            p = spawn(argv, fin, env)
            fin.close()
            try:
                _, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                run.notes.append("hung with stdin=%s" % stdin)
            if stdin == "pipe":
                os.close(w)
            run.elapsed = time.monotonic() - t0
            run.rc = p.returncode
            run.stderr = err.decode("utf-8", "replace")
        f = []
        if run.rc != rc:
            f.append("exit %r, expected %r" % (run.rc, rc))
        if not re.search(log, run.stderr):
            f.append("stderr does not match %r" % log)
        if run.elapsed is not None and run.elapsed > 2 * ctx.factor(build):
            f.append("took %.2fs" % run.elapsed)
        return run, f
    return case(name, custom=run_it)


usage_case("usage_stdin_devnull", ["--fallback", "{fb}"], stdin="devnull", log=r"socket")
usage_case("usage_stdin_file", ["--fallback", "{fb}"], stdin="file", log=r"socket")
usage_case("usage_stdin_pipe", ["--fallback", "{fb}"], stdin="pipe", log=r"socket")
usage_case("usage_no_fallback", ["--acme", "{fb}"], log=r"fallback")
usage_case("usage_bad_addr", ["--fallback", "[::1:443"])
usage_case("usage_bad_port", ["--fallback", "127.0.0.1:99999"])
usage_case("usage_send_proxy_v3", ["--fallback", "{fb}", "--send-proxy", "v3"])
usage_case("usage_hello_timeout_zero", ["--fallback", "{fb}", "-t", "0"])
usage_case("usage_hello_timeout_junk", ["--fallback", "{fb}", "-t", "1x"])
usage_case("usage_unix_path_too_long", ["--fallback", "unix:/" + "x" * 200])


# === limits: descriptors, fork, certificate files, as an unprivileged user ==============
def nobody():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def limits_case(name, argv_fn, script, rcs, log, preexec, tmax=3.0, alert=None,
                listen=False, hook=None):
    """A resource or permission failure: a log line matching log, an exit
    code in rcs, the client closed cleanly, never a signal."""
    def run_it(build, ctx):
        run = Run()
        env = ctx.env(build, run)
        if build != "normal":
            # ASan/LSan need descriptors and /proc of their own
            env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
        # A fallback of its own: what it got is this run's alone (reported
        # on failure), and no other case's connections share it.
        be = Backend("record")
        try:
            argv = ctx.wrap(build) + argv_fn(build, _Within(ctx, fb_addr=be.addr))
            f = []
            if listen:
                run, f = run_listening(argv, env, run, ctx, preexec, nconn=2,
                                       payload=acme_hello(), hook=hook)
            else:
                run_connection(argv, script, run, env, preexec=preexec, wait_max=tmax + 3)
        finally:
            be.close()
        if run.rc is None or run.rc < 0:
            f.append("died: rc %r" % run.rc)
        elif run.rc not in rcs:
            f.append("exit %r, expected one of %r" % (run.rc, rcs))
        if not re.search(log, run.stderr):
            f.append("no log line matching %r" % log)
        if run.elapsed is not None and run.elapsed > tmax * ctx.factor(build):
            f.append("took %.2fs > %.1fs" % (run.elapsed, tmax))
        if run.client_eof_after_exit == "timeout":
            f.append("client connection still open after exit")
        if alert is not None:
            recs, _ = H.parse_records(run.flight)
            al = H.alerts(recs)
            if any(d != alert for _, d in al):
                f.append("alerts %r, expected only %r" % (al, alert))
            if any(t == H.HS_CERTIFICATE for t, _ in H.handshake_messages(recs)):
                f.append("a certificate was served")
        if f:
            f.append("the client got %d bytes %r; the fallback: %s" % (
                len(run.client_got), run.client_got[:16],
                ", ".join("got %d, sent %d, ended %s" % (len(k.data), k.sent, k.end or "-")
                          for k in be.conns) or "no connection"))
        return run, f
    return case(name, custom=run_it)


class _Within:
    """ctx with some attributes of its own (a case's private backend)."""

    def __init__(self, ctx, **own):
        self._ctx = ctx
        self.__dict__.update(own)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _nofile(spare):
    """Once the process waits in its event loop, lower its descriptor limit
    to (highest open fd + 1 + spare): with spare 0 the backend socket
    cannot be made, with 1 the splice pipes cannot."""
    def set_it(run):
        t = wait_epoll(run.pid)
        n = max(t) + 1 + spare
        resource.prlimit(run.pid, resource.RLIMIT_NOFILE, (n, n))
    return set_it


def _router(build, ctx, *extra):
    a, r = ctx.bin(build)[:2]
    return [str(a), "--fallback", ctx.fb_addr, "--respond", str(r)] + list(extra)


def _router_pub(build, ctx, *extra):
    """_router with copies of the binaries another user can reach: the
    checkout itself may sit below a 0700 directory (mktemp -d, a home)."""
    a, r = ctx.pub_bin[build]
    return [a, "--fallback", ctx.fb_addr, "--respond", r] + list(extra)


limits_case("nofile_no_backend_socket",
            lambda b, c: _router(b, c, "--acme", c.fb_addr),
            [("call", _nofile(0)), ("send", _h), ("shut",), ("read", 3)],
            (EX_UNAVAILABLE, EX_OSERR, EX_IOERR), EMFILE_RE, None)
# The first 64 KiB of each way are copied without a pipe: a short exchange
# needs none, an upload past that needs one.
_BULK_UP = b"\0" * (96 * 1024)
limits_case("nofile_no_pipes",
            lambda b, c: _router(b, c, "--acme", c.fb_addr),
            [("call", _nofile(1)), ("send", _h + _BULK_UP), ("shut",), ("read", 3)],
            (EX_UNAVAILABLE, EX_OSERR, EX_IOERR), r"(?i)(pipe|relay): " + EMFILE_RE[4:], None)
limits_case("nofile_no_pipes_short_exchange",
            lambda b, c: _router(b, c, "--acme", c.fb_addr),
            [("call", _nofile(1)), ("send", _h), ("shut",), ("read", 3)],
            (EX_OK,), r"fallback \d+ \d+ \S+ ok$", None)
limits_case("nofile_one_pipe_only",
            lambda b, c: _router(b, c, "--acme", c.fb_addr),
            [("call", _nofile(3)), ("send", _h + _BULK_UP), ("shut",), ("read", 3)],
            (EX_OK,), r"fallback \d+ \d+ \S+ ok$", None)
limits_case("certs_dir_missing",
            lambda b, c: _router(b, c, "--certs", c.tmp + "/no-such-dir"),
            [("send", acme_hello()), ("flight", 3), ("shut",), ("read", 3)],
            (EX_UNAVAILABLE, EX_IOERR, EX_DATAERR), r"no-such-dir.*(No such file|not found)",
            None, alert=H.ALERT_UNRECOGNIZED_NAME)
limits_case("certs_dir_unreadable_nobody",
            lambda b, c: _router_pub(b, c, "--certs", c.locked_dir),
            [("send", acme_hello()), ("flight", 3), ("shut",), ("read", 3)],
            (EX_UNAVAILABLE, EX_IOERR, EX_DATAERR), r"(?i)permission denied", nobody,
            alert=H.ALERT_UNRECOGNIZED_NAME)
limits_case("key_unreadable_nobody",
            lambda b, c: _router_pub(b, c, "--certs", c.keyless_dir),
            [("send", acme_hello()), ("flight", 3), ("shut",), ("read", 3)],
            (EX_DATAERR, EX_IOERR), r"(?i)permission denied", nobody,
            alert=H.ALERT_UNRECOGNIZED_NAME)


def _nproc_fresh_user():
    """A user id of its own (so no other process counts against it) with a
    one-process limit: alpnd itself runs, fork(2) gets EAGAIN.  (prlimit(2)
    on the running process is not allowed in this sandbox.)"""
    uid = 60000 + os.getpid() % 4000
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


limits_case("fork_fails_listening_mode",
            lambda b, c: _router_pub(b, c, "--certs", c.certs_pub, "-x", "1"),
            None, (EX_OK,), r"(fork|posix_spawn|exec( \S+)?): Resource temporarily unavailable", _nproc_fresh_user,
            tmax=4.0, listen=True)


def run_listening(argv, env, run, ctx, preexec, nconn=2, payload=None, hook=None, factor=1.0):
    """Listening-socket mode: fd 0 is a listening socket; connect nconn
    clients one after the other; alpnd must exit by itself (--exit-idle)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    t0 = time.monotonic()
    p = spawn(argv, ls, env, preexec)
    run.pid = p.pid
    ls_addr = ls.getsockname()
    ls.close()
    if hook:
        hook(p.pid)
    f = []
    for i in range(nconn):
        try:
            s = socket.create_connection(ls_addr, timeout=3)
            try:
                s.sendall(payload or _h)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError, OSError) as e:
                if e.errno not in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                    raise               # else: the server closed it already
            got, how = drain(s, 4 * factor)
            s.close()
            run.client_got += got
            if how == "timeout":
                f.append("connection %d not closed" % i)
        except OSError as e:
            f.append("connection %d: %s" % (i, e))
    try:
        _, err = p.communicate(timeout=6 * factor)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        f.append("listening-mode alpnd did not exit (--exit-idle)")
    run.rc = p.returncode
    run.elapsed = time.monotonic() - t0
    run.stderr = err.decode("utf-8", "replace")
    run.client_eof_after_exit = "eof"
    return run, f


def listen_ok(build, ctx):
    a, r = ctx.bin(build)[:2]
    be = Backend("record")          # its own: other cases run at the same time
    argv = ctx.wrap(build) + [str(a), "--fallback", be.addr, "--acme", be.addr,
                              "--respond", str(r), "-x", "1"]
    run = Run()
    try:
        run, f = run_listening(argv, ctx.env(build, run), run, ctx, None, nconn=3,
                               factor=ctx.factor(build))
    finally:
        be.close()
    if run.rc != EX_OK:
        f.append("exit %r, expected 0" % run.rc)
    mine = be.conns
    if len(mine) < 3:
        f.append("backend saw %d connections, expected 3" % len(mine))
    elif any(bytes(c.data) != _h for c in mine[:3]):
        f.append("backend data differs")
    return run, f


case("listening_mode_serves_and_exits", custom=listen_ok, vg=True)


def _listener(build, ctx, extra=(), preexec=None, hello_timeout="1"):
    """alpnd in listening-socket mode on a fresh loopback listener."""
    a, r = ctx.bin(build)[:2]
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    run = Run()
    be = Backend("record", reply=REPLY, run=None)
    argv = ctx.wrap(build) + [str(a), "--fallback", be.addr, "--acme", be.addr,
                              "--respond", str(r), "-x", "1", "-t", hello_timeout] + list(extra)
    t0 = time.monotonic()
    p = spawn(argv, ls, ctx.env(build, run), preexec)
    run.pid = p.pid
    addr = ls.getsockname()
    ls.close()
    return run, p, be, addr, t0


def _finish_listener(run, p, be, t0, factor, f):
    try:
        _, err = p.communicate(timeout=8 * factor)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        f.append("listening-mode alpnd did not exit (--exit-idle)")
    run.rc, run.elapsed = p.returncode, time.monotonic() - t0
    run.stderr = err.decode("utf-8", "replace")
    be.close()
    if run.rc != EX_OK:
        f.append("exit %r, expected 0" % run.rc)
    for cn in be.conns:
        if cn.end not in ("eof", "rst"):
            f.append("a backend connection stayed open (%r)" % cn.end)


def relays_summed(stderr):
    """Clean relays a listening-mode alpnd summed up (alpnd.8, Logging)."""
    return sum(m["n"] for m in relayed_sums(stderr))


def listen_isolation(build, ctx):
    """One process, four clients at once: a silent one, a slowloris, a
    malformed hello and a good one.  The good one is relayed at once,
    byte-exact, while the others are still pending; each bad one gets its
    own outcome; nothing waits for anything else."""
    run, p, be, addr, t0 = _listener(build, ctx, hello_timeout="3")
    f = []
    fac = ctx.factor(build)
    silent = socket.create_connection(addr)
    slow = socket.create_connection(addr)
    slow.send(_h[:10])
    badc = socket.create_connection(addr)
    badh = acme_hello(extra=[H.ext(H.EXT_ALPN, H.alpn_data(b"h2"))])
    badc.sendall(badh)
    badc.shutdown(socket.SHUT_WR)
    good = socket.create_connection(addr)
    tg = time.monotonic()
    good.sendall(_h + b"payload")
    good.shutdown(socket.SHUT_WR)
    got, how = drain(good, 3 * fac)
    dt = time.monotonic() - tg
    if got != REPLY or how != "eof":
        f.append("good client got %r (%s)" % (got, how))
    if dt > 2.0 * fac:            # the others are held for 3 s
        f.append("good client waited %.2fs behind the others" % dt)
    d, how = drain(badc, 3 * fac)
    if (d, how) != (REPLY, "eof"):
        f.append("malformed hello not relayed: client got %r (%s)" % (d, how))
    if sorted(bytes(c.data) for c in be.conns) != sorted([_h + b"payload", badh]):
        f.append("backend got %r" % [bytes(c.data)[:20] for c in be.conns])
    for name, s_ in (("silent", silent), ("slowloris", slow)):
        d, how = drain(s_, 6 * fac)
        if how == "timeout":
            f.append("%s client not closed by the deadline" % name)
        s_.close()
    good.close()
    badc.close()
    _finish_listener(run, p, be, t0, fac, f)
    if len(re.findall(r" fallback \d+ \d+ \S+ ok", run.stderr)) + \
            relays_summed(run.stderr) < 2:
        f.append("fewer than 2 relays logged (the good and the malformed hello)")
    for rx in (r"timeout waiting for the ClientHello.*\n.*timeout waiting",):
        if not re.search(rx, run.stderr):
            f.append("no log line matching %r" % rx)
    return run, f


case("listening_mode_isolation", custom=listen_isolation)


def listen_fd_exhaustion(build, ctx):
    """Listening mode with a descriptor limit that fits about one relay:
    eight clients at once.  Whatever alpnd cannot serve it must close
    cleanly and say why; it never crashes, never hangs a client, and exits
    idle afterwards holding nothing."""
    run, p, be, addr, t0 = _listener(build, ctx)
    f = []
    fac = ctx.factor(build)
    t = wait_epoll(p.pid)
    n = max(t) + 1 + 6             # one client + backend + two pipes
    resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (n, n))
    cs = [socket.create_connection(addr) for _ in range(8)]
    shed = 0        # closed at once (reset) by the descriptor reserve
    for i, s_ in enumerate(cs):
        try:
            s_.sendall(_h + b"client%d" % i)
            s_.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            pass
    served = 0
    for i, s_ in enumerate(cs):
        try:
            got, how = drain(s_, 5 * fac)
        except ConnectionResetError:
            got, how = b"", "reset"
        s_.close()
        if how == "timeout":
            f.append("client %d left hanging" % i)
        elif got == REPLY:
            served += 1
        elif got:
            f.append("client %d got %r" % (i, got[:40]))
    if served == 0:
        f.append("no client was served")
    _finish_listener(run, p, be, t0, fac, f)
    for c_ in be.conns:     # empty: connected, then the pipes could not be made
        if c_.data and not re.fullmatch(re.escape(_h) + rb"client\d", bytes(c_.data)):
            f.append("backend got %r" % bytes(c_.data)[-20:])
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("alpnd[")]
    if served < 8 and not re.search(EMFILE_RE, run.stderr):
        f.append("dropped clients without saying why")
    m = re.search(r"(\d+) short of descriptors", run.stderr)
    shed = int(m.group(1)) if m else 0
    if len([ln for ln in lines if re.search(r" (fallback|-) \d+ \d+ ", ln)]) + shed + \
            relays_summed(run.stderr) < 8:
        f.append("fewer than 8 connection lines and shed connections counted")
    if re.search(r"accept: Resource temporarily unavailable", run.stderr):
        f.append("an empty queue logged as an accept error")
    run.notes.append("%d of 8 served" % served)
    return run, f


case("listening_mode_fd_exhaustion", custom=listen_fd_exhaustion)


# === the runner ================================================================
class Ctx:
    """Per-session shared state: certificates, paths, build helpers."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.certs = os.path.join(tmp, "certs")
        os.makedirs(self.certs)
        self.fb_backend = Backend("record")
        self.fb_addr = self.fb_backend.addr
        self.fmt = {"fb": self.fb_addr}
        self.big = os.urandom(256 << 10)
        self.big4 = os.urandom(4 << 20)

    def bin(self, build):
        return BUILDS[build]

    def wrap(self, build):
        return list(BUILDS[build][2])

    def factor(self, build):
        return BUILDS[build][3]

    def env(self, build, run):
        e = sanitizer_env()
        run.mark = "%s-%s" % (build, uuid.uuid4().hex)
        e[MARK_VAR] = run.mark
        return e


def make_certs(ctx):
    """Challenge pairs made by alpnd-respond --make, and three decoys that
    must never be served: no acmeIdentifier, acmeIdentifier not critical,
    SAN for another name."""
    respond = str(ROOT / "alpnd-respond")
    for name in (NAME, "127.0.0.1", "::1"):
        subprocess.run([respond, "--certs", ctx.certs, "--make", name, AUTH], check=True,
                       timeout=20, capture_output=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    def decoy(fname, san, acme_ext, critical=True):
        key = ec.generate_private_key(ec.SECP256R1())
        nm = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, san)])
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(nm).issuer_name(nm)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=7))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), False))
        if acme_ext:
            b = b.add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"), b"\x04\x20" + DIGEST), critical)
        cert = b.sign(key, hashes.SHA256())
        with open(os.path.join(ctx.certs, fname + ".crt.pem"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(ctx.certs, fname + ".key.pem"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    decoy("plain.test", "plain.test", False)
    decoy("noncrit.test", "noncrit.test", True, critical=False)
    decoy("wrongsan.test", "other.test", True)
    # A directory with hostile content: symlinks to a valid pair elsewhere,
    # a FIFO, a directory, a 64 MiB file and an empty one, named as pairs.
    ctx.evil = os.path.join(ctx.tmp, "evil")
    os.makedirs(ctx.evil)
    for ext_ in (".crt.pem", ".key.pem"):
        os.symlink(os.path.join(ctx.certs, NAME + ext_), os.path.join(ctx.evil, NAME + ext_))
        os.mkfifo(os.path.join(ctx.evil, "fifo.test" + ext_))
        os.mkdir(os.path.join(ctx.evil, "dir.test" + ext_))
        with open(os.path.join(ctx.evil, "huge.test" + ext_), "wb") as f:
            f.truncate(64 << 20)
        open(os.path.join(ctx.evil, "empty.test" + ext_), "wb").close()
    # Unprivileged-user fixtures live outside pytest's 0700 tmp tree.
    pub = tempfile.mkdtemp(prefix="alpnd-hostile-")
    os.chmod(pub, 0o755)
    ctx.pub = pub
    ctx.locked_dir = os.path.join(pub, "locked")
    shutil.copytree(ctx.certs, ctx.locked_dir)
    os.chmod(ctx.locked_dir, 0o700)
    ctx.certs_pub = os.path.join(pub, "certs")
    shutil.copytree(ctx.certs, ctx.certs_pub)
    ctx.pub_bin = {}
    for build, spec in BUILDS.items():
        d = os.path.join(pub, "bin-" + build)
        os.makedirs(d)
        os.chmod(d, 0o755)
        ctx.pub_bin[build] = tuple(shutil.copy2(str(x), d) for x in spec[:2])
    ctx.keyless_dir = os.path.join(pub, "keyless")
    shutil.copytree(ctx.certs, ctx.keyless_dir)
    os.chmod(ctx.keyless_dir, 0o755)
    for fn in os.listdir(ctx.keyless_dir):
        os.chmod(os.path.join(ctx.keyless_dir, fn), 0o600 if fn.endswith(".key.pem") else 0o644)


def cert_der(ctx, name):
    with open(os.path.join(ctx.certs, name + ".crt.pem")) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def evaluate(c, build, ctx, run, fb, ab):
    f = []
    fac = ctx.factor(build)
    want = c.rc if isinstance(c.rc, tuple) else (c.rc,)
    if run.rc is None or run.rc < 0:
        f.append("process died or hung: rc %r" % run.rc)
    elif run.rc not in want:
        f.append("exit %r, expected %r" % (run.rc, c.rc))
    if run.elapsed is not None:
        if run.elapsed < c.tmin:
            f.append("exited after %.2fs, before %.2fs" % (run.elapsed, c.tmin))
        if run.elapsed > c.tmax * fac:
            f.append("exited after %.2fs, bound %.2fs" % (run.elapsed, c.tmax * fac))
    f += run.notes
    # route: which backend was connected
    nf, na = len(fb.conns) if fb else 0, len(ab.conns) if ab else 0
    got_route = {(1, 0): "fallback", (0, 1): "acme", (0, 0): None}.get((nf, na), "both/many")
    if c.route == "any":
        # property cases: routed with the bytes intact and exit 0; never
        # dropped, never anything else
        ok = {"fallback": (EX_OK,), "acme": (EX_OK,)}
        if got_route not in ok or run.rc not in ok[got_route]:
            f.append("route %r with exit %r" % (got_route, run.rc))
    elif got_route not in (c.route if isinstance(c.route, tuple) else (c.route,)):
        f.append("route %r (fallback %d, acme %d), expected %r" % (got_route, nf, na, c.route))
    conn = None
    if c.route in ("fallback", "any") and nf:
        conn = fb.conns[0]
    if c.route in ("acme", "any") and na:
        conn = ab.conns[0]
    payload = c.payload
    if conn is not None:
        data = bytes(conn.data)
        if c.send_proxy is not None:
            hdr, data = H.parse_proxy_header(data)
            if hdr is None:
                f.append("no PROXY header at the backend: %r" % data[:40])
            else:
                for k, v in c.send_proxy.items():
                    if hdr.get(k) != v:
                        f.append("PROXY header %s=%r, expected %r (%r)" % (k, hdr.get(k), v, hdr))
        up = c.up(ctx) if callable(c.up) else c.up
        if up == "default":
            up = payload[c.consumed:]
        if up is not None and data != up:
            f.append("backend got %d bytes %r..., expected %d bytes %r..." %
                     (len(data), data[:32], len(up), up[:32]))
        if conn.end not in ("eof", "rst", "self"):
            f.append("backend connection not closed (%r)" % conn.end)
        if conn.fds is None and fb.behaviour == "record" and c.route == "fallback" \
                and run.rc == EX_OK and build != "valgrind" and c.stdio == "pipe":
            f.append("no descriptor snapshot of the relay was taken")
        if conn.fds and run.rc == EX_OK:
            # taken when the client's EOF reached the backend: the relay
            # is still running (the backend has not answered yet)
            # exactly: fd 0 (and 1) the client, 1 /dev/null, 2 our pipe, the
            # epoll fd, the backend socket, and a splice pipe (both ends)
            # for each way that went past the copied first 64 KiB
            fds = {k: v for k, v in conn.fds.items() if k < 1000}     # valgrind's own
            socks = {v for v in fds.values() if v.startswith("socket:")}
            pipes = [v for k, v in fds.items() if v.startswith("pipe:") and k != 2]
            if len(socks) != 2 or len(pipes) not in (0, 2, 4) or \
                    any(pipes.count(v) != 2 for v in pipes) or len(fds) != 5 + len(pipes):
                f.append("relay descriptor table: %r" % conn.fds)
    for be in (fb, ab):
        for cn in (be.conns if be else []):
            if cn.end not in ("eof", "rst", "self"):
                f.append("a backend connection stayed open (%r)" % cn.end)
    down = c.down(ctx) if callable(c.down) else c.down
    if down == "default":
        down = REPLY if c.route in ("fallback", "acme") or (c.route == "any" and conn) else None
    if down is not None and run.client_got != down:
        f.append("client got %d bytes %r, expected %r" % (len(run.client_got), run.client_got[:60],
                                                          down[:60]))
    if c.route in ("fallback", "acme") and build != "valgrind" and c.stdio == "pipe" and \
            not re.search(r" %s " % c.route, run.stderr):
        f.append("no log line with route %r" % c.route)
    for rx in c.log:
        if not re.search(rx, run.stderr):
            f.append("stderr does not match %r" % rx)
    for rx in c.nolog:
        if re.search(rx, run.stderr):
            f.append("stderr matches %r" % rx)
    if c.lines is not None and build != "valgrind":
        n = len(run.stderr.splitlines())
        if n != c.lines:
            f.append("%d stderr lines, expected %d" % (n, c.lines))
    if c.served is not None:
        der = (run.tls or {}).get("cert")
        if der is None and run.flight:
            recs, _ = H.parse_records(run.flight)
            msgs = dict(H.handshake_messages(recs))
            if H.HS_CERTIFICATE in msgs:
                der = H.certificates_tls12(msgs[H.HS_CERTIFICATE])[0]
        if der != cert_der(ctx, c.served):
            f.append("certificate for %s not served (tls %r)" % (c.served, run.tls))
        if run.tls is not None and run.tls.get("alpn") != "acme-tls/1":
            f.append("ALPN %r agreed" % run.tls.get("alpn"))
    if c.alert is not None:
        recs, _ = H.parse_records(run.flight)
        al = H.alerts(recs)
        if (2, c.alert) not in al:
            f.append("expected fatal alert %d, got %r (flight %r)" % (c.alert, al, run.flight[:40]))
        if any(t == H.HS_CERTIFICATE for t, _ in H.handshake_messages(recs)):
            f.append("a certificate was served")
    if c.name == "certs_client_stalls_mid_handshake":
        fds = run.fds or {}
        socks = {v for v in fds.values() if v.startswith("socket:")}
        pipes = [k for k, v in fds.items() if v.startswith("pipe:") and k != 2]
        if len(socks) != 1 or pipes:
            f.append("responder inherited descriptors: %r" % fds)
    if run.client_eof_after_exit == "timeout":
        f.append("client socket still open after the process exited")
    if c.check:
        f += c.check(run, ctx)
    return f


def common_checks(build, run, f):
    if SANITIZER_RE.search(run.stderr):
        f.append("sanitizer report")
    if build == "valgrind" and VALGRIND_RE.search(run.stderr):
        f.append("valgrind report")
    if run.rc == 99 and build == "valgrind":
        f.append("valgrind error exit")
    mark = getattr(run, "mark", None)
    if mark:
        end = time.monotonic() + 2
        left = marked_pids(mark)
        while left and time.monotonic() < end:
            time.sleep(0.05)
            left = marked_pids(mark)
        if left:
            f.append("processes left behind: %r" % left)
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass


def run_one(c, build, ctx):
    if c.custom is not None:
        run, f = c.custom(build, ctx)
        common_checks(build, run, f)
        return run, f
    alpnd, respond, wrap, _ = BUILDS[build]
    run = Run()
    fbkw = dict(c.fallback)
    unix = fbkw.pop("unix", False)
    fbkw.setdefault("reply", REPLY)
    fb = Backend(unix_dir=ctx.tmp if unix else None, run=run, **fbkw)
    abkw = dict(c.acme)
    abkw.setdefault("reply", REPLY)
    ab = Backend(run=run, **abkw) if c.mode == "acme" else None
    try:
        if c.mode == "respond":
            argv = wrap + [str(respond), "--certs", ctx.certs] + list(
                c.args or ("-t", "30" if build == "valgrind" else "2"))
        else:
            argv = wrap + [str(alpnd), "--fallback", fb.addr, "--respond", str(respond)]
            argv += ["--acme", ab.addr] if c.mode == "acme" else \
                ["--certs", ctx.evil if c.mode == "evil" else ctx.certs]
            argv += list(c.args)
            if "-t" not in c.args:
                argv += ["-t", "30" if build == "valgrind" else "8"]
        script = c.script
        if callable(script):
            class S:
                pass
            s = S()
            s.p, s.big, s.big4, s.fb = c.payload, ctx.big, ctx.big4, fb
            script = script(s)
        if build == "valgrind":             # everything is ~20x slower
            script = [op + (30.0,) if op[0] == "tls" else
                      ("flight", 30.0) if op[0] == "flight" else
                      ("read", 30.0) if op[0] == "read" else op for op in script]
        env = ctx.env(build, run)
        run_connection(argv, script, run, env, family=c.family,
                       wait_max=c.tmax * ctx.factor(build) + 3, stdio=c.stdio,
                       presend=c.presend)
    finally:
        fb.close()
        if ab:
            ab.close()
    f = evaluate(c, build, ctx, run, fb, ab)
    common_checks(build, run, f)
    return run, f


BUILD_NAMES = [b for b in BUILDS]
PARAMS = [(c.name, b) for c in CASES for b in BUILD_NAMES
          if b != "valgrind" or c.vg]
_STATE = {"results": {}, "lock": threading.Lock(), "ctx": None}


@pytest.fixture(scope="session")
def hostile_ctx(tmp_path_factory):
    for b, (a, r, _, _) in BUILDS.items():
        if not (os.access(a, os.X_OK) and os.access(r, os.X_OK)):
            pytest.fail("build %s missing: %s %s (run make all asan)" % (b, a, r))
    ctx = Ctx(str(tmp_path_factory.mktemp("hostile")))
    make_certs(ctx)
    yield ctx
    ctx.fb_backend.close()
    shutil.rmtree(ctx.pub, ignore_errors=True)


def _results(request, ctx):
    st = _STATE
    with st["lock"]:
        if not st["results"]:
            wanted = []
            for it in request.session.items:
                cs = getattr(it, "callspec", None)
                if cs and it.originalname == "test_hostile":
                    wanted.append((cs.params["name"], cs.params["build"]))
            byname = {c.name: c for c in CASES}

            def job(nb):
                try:
                    return nb, run_one(byname[nb[0]], nb[1], ctx)
                except Exception:
                    return nb, (Run(), ["harness error:\n" + traceback.format_exc()])
            # timing-sensitive cases first, in parallel; 2 cores are shared
            wanted.sort(key=lambda nb: -byname[nb[0]].tmax)
            with ThreadPoolExecutor(max_workers=8) as pool:
                for nb, res in pool.map(job, wanted):
                    st["results"][nb] = res
        return st["results"]


@pytest.mark.parametrize("name,build", PARAMS, ids=["%s-%s" % p for p in PARAMS])
def test_hostile(name, build, request, hostile_ctx):
    res = _results(request, hostile_ctx)
    if (name, build) not in res:        # selected after the batch ran
        res[(name, build)] = run_one({c.name: c for c in CASES}[name], build, hostile_ctx)
    run, failures = res[(name, build)]
    xf = {c.name: c.xfail for c in CASES}[name]
    if xf:
        if not failures:
            pytest.fail("%s [%s] passes now: remove its xfail (%s)" % (name, build, xf))
        pytest.xfail("known bug: %s: %s" % (xf, "; ".join(failures)))
    if failures:
        pytest.fail("%s [%s]:\n  %s\n--- rc %r elapsed %s\n--- stderr:\n%s" % (
            name, build, "\n  ".join(failures), run.rc,
            "%.3fs" % run.elapsed if run.elapsed is not None else "-", run.stderr[-3000:]))


def test_case_count():
    """The issue asks for at least 60 named hostile cases."""
    assert len(CASES) >= 60, len(CASES)
