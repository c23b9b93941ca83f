"""A deterministic corpus of ClientHellos that do not offer acme-tls/1.

Used by tests/test_transparent.py: every hello here must get the same
answer through alpnd as straight from the web server, because alpnd sends
everything that is not a ClientHello offering acme-tls/1 to the fallback.

    corpus() -> [Item(idx, how, data)]

  how   what the hello is, e.g. "curl-h2 sni=underscore" or
        "chromium mut#0412 flip2@17,803"; stable from run to run
  data  the bytes the client sends, after which it half-closes

Built from the real captures in tests/hellos (INDEX), in five groups:

  capture   each capture as recorded; acme-tls/1 removed from the ALPN list
            of those that offer it (replaced by http/1.1 if it was alone)
  sni       server_name variants: underscore, space, double dot, one and two
            trailing dots, UTF-8, raw high bytes, NUL, newline, slash,
            wildcard, upper case, IP literal, 63/64-byte labels, 253/254/255-
            byte names, empty name, empty list, two names, name type 1, a
            lying list length, the extension twice, no extension
  size      padding or a long ALPN list to 16,384 bytes (the cap), 16,385,
            17 KB, 21 KB and 32 KB, in records of at most 16,384 bytes
  split     the hello re-framed in records of 1, 2, 5, 64 and 512 bytes, and
            some size variants in small records (over the wire cap)
  trunc     the capture cut short (the client then half-closes): in the
            record header, the handshake header, halfway, one byte short
  mutant    seeded random corruption of the above: 1-4 bytes replaced,
            truncation anywhere (the client then half-closes), a byte
            inserted or deleted, a length field set to 0 or 0xffff
  other     not TLS: plain HTTP, an SSLv2 hello, a lone handshake byte

No os.urandom and no time: two calls give byte-identical corpora (the seed
is SEED below).  Adding captures to tests/hellos grows the corpus.
"""
import collections
import os
import random
import struct

from hostile_lib import u8, u16, u24, vec8, vec16     # one set of byte builders

HERE = os.path.dirname(os.path.abspath(__file__))
HELLOS = os.path.join(HERE, "hellos")
SEED = 0x7e57_0a1b
ACME = b"acme-tls/1"

CT_HANDSHAKE = 22
HS_CLIENT_HELLO = 1
EXT_SNI, EXT_ALPN, EXT_PADDING, EXT_PSK = 0, 16, 21, 41

Item = collections.namedtuple("Item", "idx how data")


# --- decoding and re-encoding ---------------------------------------------------

class Hello:
    """A decoded ClientHello: the fields alpnparse looks at, the rest kept
    as opaque bytes, extensions as an ordered list of [type, data]."""

    def __init__(self, msg, rec_version):
        assert msg[0] == HS_CLIENT_HELLO, "not a ClientHello"
        n = int.from_bytes(msg[1:4], "big")
        body = msg[4:]
        assert len(body) == n, "handshake length"
        p = 0
        self.head = body[:34]                  # legacy_version + random
        p = 34
        sid = body[p]
        self.session_id = body[p + 1:p + 1 + sid]
        p += 1 + sid
        cs = int.from_bytes(body[p:p + 2], "big")
        self.suites = body[p + 2:p + 2 + cs]
        p += 2 + cs
        cm = body[p]
        self.compression = body[p + 1:p + 1 + cm]
        p += 1 + cm
        self.exts = []
        if p == len(body):
            self.has_exts = False
            return
        self.has_exts = True
        el = int.from_bytes(body[p:p + 2], "big")
        p += 2
        assert p + el == len(body), "extensions length"
        while p < len(body):
            t, ln = struct.unpack("!HH", body[p:p + 4])
            self.exts.append([t, body[p + 4:p + 4 + ln]])
            p += 4 + ln
        assert p == len(body)
        self.rec_version = rec_version

    def copy(self):
        h = Hello.__new__(Hello)
        h.__dict__.update(self.__dict__)
        h.exts = [list(e) for e in self.exts]
        return h

    def message(self):
        body = (self.head + vec8(self.session_id) + vec16(self.suites) +
                vec8(self.compression))
        if self.has_exts or self.exts:
            body += vec16(b"".join(u16(t) + vec16(d) for t, d in self.exts))
        return u8(HS_CLIENT_HELLO) + u24(len(body)) + body

    def find(self, etype):
        for k, (t, _) in enumerate(self.exts):
            if t == etype:
                return k
        return None

    def put(self, etype, data):
        """Replace the extension's data, or insert it (before a trailing
        pre_shared_key, which must stay last)."""
        k = self.find(etype)
        if k is not None:
            self.exts[k][1] = data
            return
        at = len(self.exts)
        if self.exts and self.exts[-1][0] == EXT_PSK:
            at -= 1
        self.exts.insert(at, [etype, data])
        self.has_exts = True

    def drop(self, etype):
        self.exts = [e for e in self.exts if e[0] != etype]

    def alpn(self):
        k = self.find(EXT_ALPN)
        if k is None:
            return None
        d = self.exts[k][1]
        out, p = [], 2
        while p < len(d):
            out.append(d[p + 1:p + 1 + d[p]])
            p += 1 + d[p]
        return out


def unframe(wire):
    """Records -> (handshake message, first record's version, record sizes)."""
    msg, sizes, p, ver = b"", [], 0, None
    while p < len(wire):
        ct, v, ln = struct.unpack("!BHH", wire[p:p + 5])
        assert ct == CT_HANDSHAKE, "capture holds a non-handshake record"
        ver = v if ver is None else ver
        msg += wire[p + 5:p + 5 + ln]
        sizes.append(ln)
        p += 5 + ln
    return msg, ver, sizes


def frame(msg, size=16384, version=0x0301):
    out = []
    for i in range(0, len(msg), size):
        frag = msg[i:i + size]
        out.append(u8(CT_HANDSHAKE) + u16(version) + u16(len(frag)) + frag)
    return b"".join(out)


def sni_data(*names, name_type=0, list_len=None):
    body = b"".join(u8(name_type) + vec16(n) for n in names)
    return u16(len(body) if list_len is None else list_len) + body


def alpn_data(protos):
    return vec16(b"".join(vec8(p) for p in protos))


def offers_acme(msg):
    """True if msg parses as a ClientHello whose ALPN list has acme-tls/1."""
    try:
        a = Hello(msg, 0x0301).alpn()
    except (AssertionError, IndexError, struct.error):
        return ACME in msg          # be strict: any trace of it counts
    return a is not None and ACME in a


# --- the captures -----------------------------------------------------------------

def captures():
    """[(short name, Hello, record sizes)] from tests/hellos/INDEX, with
    acme-tls/1 taken out of every ALPN list."""
    out = []
    with open(os.path.join(HELLOS, "INDEX")) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            fname = line.split()[0]
            with open(os.path.join(HELLOS, fname), "rb") as b:
                wire = b.read()
            msg, ver, sizes = unframe(wire)
            h = Hello(msg, ver)
            a = h.alpn()
            if a is not None and ACME in a:
                a = [p for p in a if p != ACME] or [b"http/1.1"]
                h.put(EXT_ALPN, alpn_data(a))
            out.append((fname[:-4] if fname.endswith(".bin") else fname, h, sizes))
    return out


def with_sni(h, data):
    h = h.copy()
    h.put(EXT_SNI, data)
    return h


LONG253 = b".".join([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61])

# name -> function(Hello) -> Hello
SNI_VARIANTS = [
    ("underscore", lambda h: with_sni(h, sni_data(b"my_host.example.com"))),
    ("space", lambda h: with_sni(h, sni_data(b"my host.example.com"))),
    ("double_dot", lambda h: with_sni(h, sni_data(b"my..host.example.com"))),
    ("trailing_dot", lambda h: with_sni(h, sni_data(b"host.example.com."))),
    ("two_trailing_dots", lambda h: with_sni(h, sni_data(b"host.example.com.."))),
    ("leading_dot", lambda h: with_sni(h, sni_data(b".example.com"))),
    ("utf8", lambda h: with_sni(h, sni_data("b\u00fccher.example".encode()))),
    ("high_bytes", lambda h: with_sni(h, sni_data(b"\xff\xfe.example.com"))),
    ("nul", lambda h: with_sni(h, sni_data(b"exa\x00mple.com"))),
    ("newline", lambda h: with_sni(h, sni_data(b"a.example\nalpnd[1]: forged"))),
    ("slash", lambda h: with_sni(h, sni_data(b"../../etc/passwd"))),
    ("wildcard", lambda h: with_sni(h, sni_data(b"*.example.com"))),
    ("leading_hyphen", lambda h: with_sni(h, sni_data(b"-host.example.com"))),
    ("upper", lambda h: with_sni(h, sni_data(b"WWW.EXAMPLE.COM"))),
    ("ipv4_literal", lambda h: with_sni(h, sni_data(b"127.0.0.1"))),
    ("label_63", lambda h: with_sni(h, sni_data(b"a" * 63 + b".example"))),
    ("label_64", lambda h: with_sni(h, sni_data(b"a" * 64 + b".example"))),
    ("len_253", lambda h: with_sni(h, sni_data(LONG253))),
    ("len_254", lambda h: with_sni(h, sni_data(LONG253 + b"e"))),
    ("len_255", lambda h: with_sni(h, sni_data(LONG253 + b"ef"))),
    ("len_1000", lambda h: with_sni(h, sni_data(b"x" * 1000))),
    ("empty_name", lambda h: with_sni(h, sni_data(b""))),
    ("empty_list", lambda h: with_sni(h, u16(0))),
    ("empty_extension", lambda h: with_sni(h, b"")),
    ("two_names", lambda h: with_sni(h, sni_data(b"a.example.com", b"b.example.com"))),
    ("name_type_1", lambda h: with_sni(h, sni_data(b"a.example.com", name_type=1))),
    ("name_type_255", lambda h: with_sni(h, sni_data(b"a.example.com", name_type=255))),
    ("list_len_lies", lambda h: with_sni(h, sni_data(b"a.example.com", list_len=5))),
    ("none", lambda h: _dropped(h, EXT_SNI)),
]


def _dropped(h, etype):
    h = h.copy()
    h.drop(etype)
    return h


def _twice(h, etype, data):
    h = h.copy()
    h.put(etype, data)
    k = h.find(etype)
    h.exts.insert(k + 1, [etype, data])
    return h


SNI_VARIANTS.append(("extension_twice",
                     lambda h: _twice(h, EXT_SNI, sni_data(b"a.example.com"))))


def padded_to(h, total):
    """The hello grown to exactly `total` handshake bytes with a padding
    extension (RFC 7685), replacing any padding it had."""
    h = h.copy()
    h.drop(EXT_PADDING)
    grow = total - len(h.message()) - 4
    assert grow >= 0, "hello already larger than %d" % total
    h.put(EXT_PADDING, bytes(grow))
    assert len(h.message()) == total
    return h


def long_alpn(h, total):
    """The hello's ALPN list (or http/1.1) followed by made-up protocols
    until the hello is about `total` bytes, the way a client with a long
    ALPN list gets there (Python's ssl took a 21 KB one)."""
    h = h.copy()
    protos = list(h.alpn() or [b"http/1.1"])
    h.put(EXT_ALPN, alpn_data(protos))
    have, k = len(h.message()), 0
    while True:
        p = b"x-made-up-protocol-%05d/1.0" % k
        if have + 1 + len(p) + 40 > total:
            break
        protos.append(p)
        have += 1 + len(p)
        k += 1
    h.put(EXT_ALPN, alpn_data(protos))
    assert len(h.message()) == have
    return h


SIZES = [
    ("pad_16384", lambda h: padded_to(h, 16384)),       # exactly the cap
    ("pad_16385", lambda h: padded_to(h, 16385)),
    ("pad_17k", lambda h: padded_to(h, 17 * 1024)),
    ("pad_21k", lambda h: padded_to(h, 21 * 1024)),
    ("pad_32k", lambda h: padded_to(h, 32 * 1024)),
    ("alpn_17k", lambda h: long_alpn(h, 17 * 1024)),
    ("alpn_21k", lambda h: long_alpn(h, 21 * 1024)),
]
SPLITS = [1, 2, 5, 64, 512]


def _mutate(rng, data):
    """One seeded mutation of data -> (description, bytes)."""
    b = bytearray(data)
    kind = rng.choices(["flip", "trunc", "insert", "delete", "length"],
                       weights=[60, 20, 6, 6, 8])[0]
    if kind == "flip":
        n = rng.randint(1, 4)
        where = sorted(rng.sample(range(len(b)), n))
        for p in where:
            b[p] ^= rng.randint(1, 255)
        return "flip%d@%s" % (n, ",".join(map(str, where))), bytes(b)
    if kind == "trunc":
        # Half of them cut in the first record header or handshake header.
        p = rng.randint(1, 9) if rng.random() < 0.2 else rng.randint(1, len(b) - 1)
        return "trunc@%d" % p, bytes(b[:p])
    if kind == "insert":
        p = rng.randint(0, len(b))
        v = rng.randint(0, 255)
        b[p:p] = bytes([v])
        return "insert%02x@%d" % (v, p), bytes(b)
    if kind == "delete":
        p = rng.randrange(len(b))
        del b[p]
        return "delete@%d" % p, bytes(b)
    p = rng.randrange(len(b) - 1)
    v = rng.choice([b"\x00\x00", b"\xff\xff", b"\x40\x01"])
    b[p:p + 2] = v
    return "len%s@%d" % (v.hex(), p), bytes(b)


def corpus(n_mutants=600):
    items = []

    def add(how, data):
        items.append(Item(len(items), how, bytes(data)))

    caps = captures()
    bases = []
    for name, h, sizes in caps:
        size = max(sizes) if len(sizes) > 1 else 16384
        wire = frame(h.message(), size, h.rec_version)
        add("%s capture" % name, wire)
        bases.append((name, wire))
    for name, h, _ in caps:
        for vname, fn in SNI_VARIANTS:
            add("%s sni=%s" % (name, vname), frame(fn(h).message(), 16384, h.rec_version))
    sized = []
    for name, h, _ in caps:
        for vname, fn in SIZES:
            msg = fn(h).message()
            add("%s size=%s" % (name, vname), frame(msg, 16384, h.rec_version))
            sized.append(("%s size=%s" % (name, vname), msg, h.rec_version))
    for name, h, _ in caps:
        for n in SPLITS:
            add("%s split=%d" % (name, n), frame(h.message(), n, h.rec_version))
    # Cut short by the client's EOF: in the record header, in the handshake
    # header, in the middle, one byte short.
    for name, wire in bases:
        for n in sorted({1, 3, 5, 6, 9, len(wire) // 2, len(wire) - 1}):
            add("%s trunc=%d" % (name, n), wire[:n])
    # Big hellos in small records: over alpnd's wire cap as well.
    for label, msg, ver in sized[::5]:
        add("%s split=100" % label, frame(msg, 100, ver))
    # Not TLS at all.
    add("other plain-http", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    specs = bytes.fromhex("00002f000035010080000039")
    challenge = bytes(range(16))
    v2 = (b"\x01" + u16(0x0301) + u16(len(specs)) + u16(0) + u16(len(challenge)) +
          specs + challenge)
    add("other sslv2-hello", u16(0x8000 | len(v2)) + v2)
    add("other lone-0x16", b"\x16")
    add("other record-header-only", b"\x16\x03\x01\x02\x00")
    # Seeded mutants of the captures (most) and of a few SNI variants.
    rng = random.Random(SEED)
    pool = bases + [(it.how, it.data) for it in items
                    if " sni=" in it.how and it.idx % 7 == 0]
    for k in range(n_mutants):
        name, data = pool[rng.randrange(len(pool))] if rng.random() < 0.3 \
            else bases[rng.randrange(len(bases))]
        desc, data = _mutate(rng, data)
        add("%s mut#%04d %s" % (name, k, desc), data)
    for it in items:
        assert ACME not in it.data, it.how
        if it.data[:1] == b"\x16" and len(it.data) > 5:
            try:
                msg, _, _ = unframe(it.data)
            except (AssertionError, struct.error):
                continue
            assert not offers_acme(msg), it.how
    return items


def group(item):
    """capture | sni | size | split | trunc | mutant | other"""
    if " mut#" in item.how:
        return "mutant"
    if item.how.startswith("other "):
        return "other"
    for g in ("split", "size", "sni", "trunc", "capture"):
        if " %s" % g in item.how:
            return g
    raise ValueError(item.how)


if __name__ == "__main__":
    import collections as c
    import hashlib
    cs = corpus()
    groups = c.Counter(group(it) for it in cs)
    print(len(cs), "hellos;", dict(groups))
    print("sha256", hashlib.sha256(b"".join(it.data for it in cs)).hexdigest())
