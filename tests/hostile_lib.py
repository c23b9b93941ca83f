"""hostile_lib - build (and break) TLS ClientHellos and PROXY headers.

Everything here is bytes in, bytes out: no sockets.  The builders make a
well-formed message by default and take keyword arguments to override any
field, including lengths, so a test can state exactly which byte is wrong.

  ch = client_hello(sni=b"example.test", alpn=[b"acme-tls/1"])
  wire = records(ch, size=100)            # several TLS records
  wire = records(ch, rlen=0xffff)          # a lying record length

TLS: RFC 8446 (sections 4.1.2, 4.2, 5.1), RFC 5246 section 7.4.1.2,
RFC 6066 section 3 (SNI), RFC 7301 section 3.1 (ALPN).
PROXY: haproxy proxy-protocol.txt, v1 section 2.1, v2 section 2.2.
"""
import ipaddress
import os
import struct

# --- TLS constants ---------------------------------------------------------
CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_CERTIFICATE = 1, 2, 11
HS_SERVER_KEY_EXCHANGE, HS_SERVER_HELLO_DONE = 12, 14
EXT_SNI, EXT_GROUPS, EXT_POINT_FORMATS, EXT_SIGALGS = 0, 10, 11, 13
EXT_ALPN, EXT_EMS, EXT_SESSION_TICKET = 16, 23, 35
EXT_PSK, EXT_VERSIONS, EXT_PSK_MODES, EXT_KEY_SHARE = 41, 43, 45, 51
EXT_RENEGO, EXT_ECH, EXT_PADDING = 0xff01, 0xfe0d, 21
TLS10, TLS11, TLS12, TLS13 = 0x0301, 0x0302, 0x0303, 0x0304
ALERT_UNRECOGNIZED_NAME = 112
ALERT_NO_APPLICATION_PROTOCOL = 120
ALERT_PROTOCOL_VERSION = 70
ACME = b"acme-tls/1"

# Suites a GnuTLS server with an ECDSA P-256 certificate will take.
SUITES_13 = [0x1301, 0x1302, 0x1303]
SUITES_12 = [0xc02b, 0xc02c, 0xcca9, 0xc02f, 0xc030, 0xcca8]
GROUPS = [0x001d, 0x0017, 0x0018]                  # x25519, P-256, P-384
SIGALGS = [0x0403, 0x0503, 0x0804, 0x0805, 0x0401, 0x0501]


def u8(n):
    return struct.pack("!B", n)


def u16(n):
    return struct.pack("!H", n)


def u24(n):
    return struct.pack("!I", n)[1:]


def vec8(b):
    return u8(len(b)) + b


def vec16(b):
    return u16(len(b)) + b


def vec24(b):
    return u24(len(b)) + b


# --- extensions (type, data) -------------------------------------------------
def ext(etype, data, length=None):
    """One extension; length overrides the 2-byte extension_data length."""
    return u16(etype) + u16(len(data) if length is None else length) + data


def sni_data(*names, name_type=0, list_len=None):
    """server_name extension_data: ServerNameList of host_name entries."""
    body = b"".join(u8(name_type) + vec16(n) for n in names)
    return u16(len(body) if list_len is None else list_len) + body


def alpn_data(*protos, list_len=None):
    body = b"".join(vec8(p) for p in protos)
    return u16(len(body) if list_len is None else list_len) + body


def versions_data(*vers):
    return vec8(b"".join(u16(v) for v in vers))


def groups_data(*groups):
    return vec16(b"".join(u16(g) for g in groups))


def sigalgs_data(*algs):
    return vec16(b"".join(u16(a) for a in algs))


def key_share_data(group=0x001d, key=None):
    key = os.urandom(32) if key is None else key
    return vec16(u16(group) + vec16(key))


def default_extensions(sni=b"example.test", alpn=(ACME,),
                       versions=(TLS13, TLS12), key_share=True):
    """A modern client's extensions; None drops SNI / ALPN / versions."""
    exts = []
    if sni is not None:
        exts.append(ext(EXT_SNI, sni_data(sni)))
    exts.append(ext(EXT_GROUPS, groups_data(*GROUPS)))
    exts.append(ext(EXT_POINT_FORMATS, vec8(b"\x00")))
    exts.append(ext(EXT_SIGALGS, sigalgs_data(*SIGALGS)))
    if alpn is not None:
        exts.append(ext(EXT_ALPN, alpn_data(*alpn)))
    exts.append(ext(EXT_EMS, b""))
    exts.append(ext(EXT_RENEGO, b"\x00"))
    if versions is not None:
        exts.append(ext(EXT_VERSIONS, versions_data(*versions)))
        if TLS13 in versions:
            exts.append(ext(EXT_PSK_MODES, vec8(b"\x01")))
            if key_share:       # True: a random X25519 share; bytes: that key
                exts.append(ext(EXT_KEY_SHARE, key_share_data(
                    key=key_share if isinstance(key_share, bytes) else None)))
    return exts


# --- the ClientHello ----------------------------------------------------------
def client_hello_body(sni=b"example.test", alpn=(ACME,), versions=(TLS13, TLS12),
                      legacy_version=TLS12, random=None, session_id=None,
                      suites=None, compression=b"\x00", extensions=None,
                      extra=(), ext_len=None, no_extensions=False,
                      key_share=True, trailer=b""):
    """ClientHello body (no handshake header).  extensions replaces the
    default list; extra is appended after it; ext_len overrides the
    extensions<..> length; trailer is appended after the extensions."""
    if extensions is None:
        extensions = default_extensions(sni, alpn, versions, key_share)
    exts = b"".join(list(extensions) + list(extra))
    if suites is None:
        suites = (SUITES_13 if versions and TLS13 in versions else []) + SUITES_12
    sid = os.urandom(32) if session_id is None else session_id
    body = (u16(legacy_version) + (random or os.urandom(32)) + vec8(sid) +
            vec16(b"".join(u16(s) for s in suites)) + vec8(compression))
    if not no_extensions:
        body += u16(len(exts) if ext_len is None else ext_len) + exts
    return body + trailer


def handshake(body, msg_type=HS_CLIENT_HELLO, length=None):
    return u8(msg_type) + u24(len(body) if length is None else length) + body


def client_hello(**kw):
    """A complete ClientHello handshake message (4-byte header included)."""
    hl = kw.pop("hs_len", None)
    mt = kw.pop("hs_type", HS_CLIENT_HELLO)
    return handshake(client_hello_body(**kw), mt, hl)


def pad_hello_to(total, **kw):
    """A ClientHello handshake message of exactly `total` bytes (header
    included), grown with a padding extension (RFC 7685)."""
    base = client_hello(**kw)
    grow = total - len(base) - 4
    if grow < 0:
        raise ValueError("hello already larger than %d" % total)
    extra = list(kw.pop("extra", ())) + [ext(EXT_PADDING, bytes(grow))]
    out = client_hello(extra=extra, **kw)
    assert len(out) == total, (len(out), total)
    return out


def records(msg, size=16384, ctype=CT_HANDSHAKE, version=TLS10, rlen=None):
    """Split msg into TLS records of at most `size` bytes.  rlen overrides
    every record's length field (a lying length)."""
    out = b""
    for i in range(0, max(len(msg), 1), size):
        frag = msg[i:i + size]
        out += u8(ctype) + u16(version) + u16(len(frag) if rlen is None else rlen) + frag
    return out


def record(payload, ctype=CT_HANDSHAKE, version=TLS10, rlen=None):
    return u8(ctype) + u16(version) + u16(len(payload) if rlen is None else rlen) + payload


def hello_wire(size=16384, **kw):
    """ClientHello in records: the bytes a client puts on the wire."""
    return records(client_hello(**kw), size=size)


def sslv2_hello():
    """An SSLv2-compatible CLIENT-HELLO (RFC 5246 appendix E.2)."""
    specs = b"\x00\x00\x2f\x00\x00\x35\x01\x00\x80"
    challenge = os.urandom(16)
    body = b"\x01" + u16(TLS10) + u16(len(specs)) + u16(0) + u16(len(challenge)) + specs + challenge
    return u16(0x8000 | len(body)) + body


def corrupt(b, offset, value):
    """Replace byte(s) at offset (negative counts from the end)."""
    b = bytearray(b)
    if isinstance(value, int):
        value = bytes([value])
    if offset < 0:
        offset += len(b)
    b[offset:offset + len(value)] = value
    return bytes(b)


# --- reading what a TLS server sent back -------------------------------------
def parse_records(data):
    """[(ctype, version, payload)], plus any unparsed tail bytes."""
    out, i = [], 0
    while i + 5 <= len(data):
        ct, ver, ln = data[i], struct.unpack("!H", data[i + 1:i + 3])[0], struct.unpack("!H", data[i + 3:i + 5])[0]
        if i + 5 + ln > len(data):
            break
        out.append((ct, ver, data[i + 5:i + 5 + ln]))
        i += 5 + ln
    return out, data[i:]


def handshake_messages(recs):
    """Concatenate plaintext handshake records and split into messages."""
    buf = b"".join(p for ct, _, p in recs if ct == CT_HANDSHAKE)
    msgs, i = [], 0
    while i + 4 <= len(buf):
        t = buf[i]
        ln = int.from_bytes(buf[i + 1:i + 4], "big")
        if i + 4 + ln > len(buf):
            break
        msgs.append((t, buf[i + 4:i + 4 + ln]))
        i += 4 + ln
    return msgs


def alerts(recs):
    """[(level, description)] of plaintext alert records."""
    return [(p[0], p[1]) for ct, _, p in recs if ct == CT_ALERT and len(p) == 2]


def certificates_tls12(body):
    """DER certificates of a TLS 1.2 Certificate message body."""
    certs, lst = [], body[3:3 + int.from_bytes(body[:3], "big")]
    i = 0
    while i + 3 <= len(lst):
        ln = int.from_bytes(lst[i:i + 3], "big")
        certs.append(lst[i + 3:i + 3 + ln])
        i += 3 + ln
    return certs


def server_hello_info(body):
    """(version, cipher, alpn or None) from a ServerHello body."""
    ver = struct.unpack("!H", body[:2])[0]
    i = 2 + 32
    i += 1 + body[i]
    suite = struct.unpack("!H", body[i:i + 2])[0]
    i += 3
    alpn = None
    if i + 2 <= len(body):
        end = i + 2 + struct.unpack("!H", body[i:i + 2])[0]
        i += 2
        while i + 4 <= end:
            t, ln = struct.unpack("!HH", body[i:i + 4])
            d = body[i + 4:i + 4 + ln]
            if t == EXT_VERSIONS and ln == 2:
                ver = struct.unpack("!H", d)[0]
            if t == EXT_ALPN and ln >= 3:
                alpn = d[3:3 + d[2]]
            i += 4 + ln
    return ver, suite, alpn


# --- PROXY protocol ----------------------------------------------------------
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL, V2_PROXY = 0x0, 0x1
V2_UNSPEC, V2_TCP4, V2_TCP6, V2_UNIX = 0x00, 0x11, 0x21, 0x31


def proxy_v1(family="TCP4", src="192.0.2.1", dst="198.51.100.2", sport=40000,
             dport=443, line=None):
    if line is not None:
        return line
    if family == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return ("PROXY %s %s %s %d %d\r\n" % (family, src, dst, sport, dport)).encode()


def proxy_v2(cmd=V2_PROXY, fam=V2_TCP4, src="192.0.2.1", dst="198.51.100.2",
             sport=40000, dport=443, tlvs=(), length=None, version=2,
             sig=V2_SIG, addr=None):
    """A PROXY v2 header.  addr overrides the address block; length the
    2-byte length field; tlvs is [(type, value)]."""
    if addr is None:
        if fam >> 4 == 1:
            addr = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed +
                    u16(sport) + u16(dport))
        elif fam >> 4 == 2:
            addr = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed +
                    u16(sport) + u16(dport))
        elif fam >> 4 == 3:
            addr = b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0")
        else:
            addr = b""
    block = addr + b"".join(u8(t) + vec16(v) for t, v in tlvs)
    return (sig + u8(version << 4 | cmd) + u8(fam) +
            u16(len(block) if length is None else length) + block)


def parse_proxy_header(data):
    """Parse a PROXY header at the start of data (as alpnd --send-proxy
    writes it).  Returns (dict, rest) or (None, data)."""
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n")
        if end < 0:
            return None, data
        f = data[6:end].decode().split(" ")
        d = {"version": 1, "family": f[0]}
        if f[0] in ("TCP4", "TCP6"):
            d.update(src=f[1], dst=f[2], sport=int(f[3]), dport=int(f[4]))
        return d, data[end + 2:]
    if data.startswith(V2_SIG) and len(data) >= 16:
        vc, fam, ln = data[12], data[13], struct.unpack("!H", data[14:16])[0]
        blk = data[16:16 + ln]
        d = {"version": 2, "cmd": vc & 0xf, "fam": fam}
        if vc & 0xf == V2_PROXY and fam == V2_TCP4:
            d.update(family="TCP4", src=str(ipaddress.IPv4Address(blk[0:4])),
                     dst=str(ipaddress.IPv4Address(blk[4:8])),
                     sport=struct.unpack("!H", blk[8:10])[0],
                     dport=struct.unpack("!H", blk[10:12])[0])
        elif vc & 0xf == V2_PROXY and fam == V2_TCP6:
            d.update(family="TCP6", src=str(ipaddress.IPv6Address(blk[0:16])),
                     dst=str(ipaddress.IPv6Address(blk[16:32])),
                     sport=struct.unpack("!H", blk[32:34])[0],
                     dport=struct.unpack("!H", blk[34:36])[0])
        else:
            d["family"] = "UNKNOWN"
        return d, data[16 + ln:]
    return None, data
