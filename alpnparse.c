/*
 * alpnparse.c - the ClientHello and PROXY header parsers.
 *
 * Every untrusted byte is read through a bounds-checked cursor (struct cbs,
 * after OpenBSD's bs_cbs.c): a length-prefixed field becomes a sub-cursor
 * that must be consumed exactly; anything that does not fit is rejected,
 * never truncated.  No I/O, no allocation, no logging.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <string.h>

#include "alpnparse.h"

/* RFC 8446 section 5.1: ContentType and record limits. */
#define TLS_CT_HANDSHAKE	22
#define TLS_RECORD_HDR		5
#define TLS_RECORD_MAX		16384		/* 2^14 */
/* RFC 8446 section 4: HandshakeType. */
#define TLS_HS_CLIENT_HELLO	1
#define TLS_HS_HDR		4
/* Extension types: RFC 6066 s3, RFC 7301 s3.1, RFC 8446 s4.2, ECH draft. */
#define EXT_SERVER_NAME		0
#define EXT_ALPN		16
#define EXT_PRE_SHARED_KEY	41
#define EXT_SUPPORTED_VERSIONS	43
#define EXT_ECH			0xfe0d
#define SNI_HOST_NAME		0

struct cbs {
	const uint8_t	*p;
	size_t		 len;
};

static void
cbs_init(struct cbs *c, const uint8_t *p, size_t len)
{
	c->p = p;
	c->len = len;
}

static int
cbs_skip(struct cbs *c, size_t n)
{
	if (c->len < n)
		return 0;
	c->p += n;
	c->len -= n;
	return 1;
}

static int
cbs_u8(struct cbs *c, uint8_t *v)
{
	if (c->len < 1)
		return 0;
	*v = c->p[0];
	return cbs_skip(c, 1);
}

static int
cbs_u16(struct cbs *c, uint16_t *v)
{
	if (c->len < 2)
		return 0;
	*v = (uint16_t)(c->p[0] << 8 | c->p[1]);
	return cbs_skip(c, 2);
}

/* Take the next n bytes as a sub-cursor. */
static int
cbs_sub(struct cbs *c, size_t n, struct cbs *out)
{
	if (c->len < n)
		return 0;
	cbs_init(out, c->p, n);
	return cbs_skip(c, n);
}

/* A field with a 1- or 2-byte length prefix, as a sub-cursor. */
static int
cbs_prefixed8(struct cbs *c, struct cbs *out)
{
	uint8_t n;

	return cbs_u8(c, &n) && cbs_sub(c, n, out);
}

static int
cbs_prefixed16(struct cbs *c, struct cbs *out)
{
	uint16_t n;

	return cbs_u16(c, &n) && cbs_sub(c, n, out);
}

/*
 * RFC 1123 section 2.1 / RFC 952: letters, digits and hyphens, labels of
 * 1..63 bytes not starting or ending with a hyphen, at most 253 bytes.
 * RFC 6066 section 3: no trailing dot (callers strip one if they allow it).
 */
int
alpn_valid_hostname(const uint8_t *s, size_t len)
{
	size_t i, label = 0;
	uint8_t c;

	if (len == 0 || len > 253)
		return 0;
	for (i = 0; i < len; i++) {
		c = s[i];
		if (c == '.') {
			if (label == 0 || s[i - 1] == '-')
				return 0;
			label = 0;
			continue;
		}
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '-'))
			return 0;
		if (c == '-' && label == 0)
			return 0;
		if (++label > 63)
			return 0;
	}
	return label != 0 && s[len - 1] != '-';
}

/*
 * RFC 6066 section 3: ServerNameList <1..2^16-1> of ServerName entries, no
 * name_type twice; HostName <1..2^16-1>.  Exactly one entry, a host_name:
 * the encoding of other NameTypes is unknown, so they cannot be skipped
 * safely and are rejected (as OpenSSL does).  The name's bytes are not
 * judged here (see alpnparse.h): the view is exactly what was sent.
 */
static int
parse_sni(struct cbs *ext, struct alpn_hello *h)
{
	struct cbs list, name;
	uint8_t type;

	if (!cbs_prefixed16(ext, &list) || ext->len != 0 || list.len == 0)
		return 0;
	while (list.len > 0) {
		if (!cbs_u8(&list, &type) || type != SNI_HOST_NAME)
			return 0;
		if (!cbs_prefixed16(&list, &name) || name.len == 0)
			return 0;
		if (h->sni != NULL)
			return 0;		/* more than one host_name */
		h->sni = name.p;
		h->sni_len = name.len;
	}
	return 1;
}

/*
 * RFC 7301 section 3.1: ProtocolNameList <2..2^16-1> of
 * ProtocolName <1..2^8-1>; empty names and an empty list are malformed.
 */
static int
parse_alpn(struct cbs *ext, struct alpn_hello *h)
{
	struct cbs list, name;
	static const char acme[] = ALPN_ACME;

	if (!cbs_prefixed16(ext, &list) || ext->len != 0 || list.len == 0)
		return 0;
	h->alpn = list.p;
	h->alpn_len = list.len;
	while (list.len > 0) {
		if (!cbs_prefixed8(&list, &name) || name.len == 0)
			return 0;
		if (name.len == sizeof(acme) - 1 &&
		    memcmp(name.p, acme, name.len) == 0)
			h->has_acme = 1;
	}
	return 1;
}

/* RFC 8446 section 4.2.1: ClientHello form, versions<2..254>. */
static int
parse_versions(struct cbs *ext, struct alpn_hello *h)
{
	struct cbs list;

	if (!cbs_prefixed8(ext, &list) || ext->len != 0)
		return 0;
	if (list.len < 2 || list.len % 2 != 0)
		return 0;
	h->versions = list.p;
	h->versions_len = list.len;
	return 1;
}

/*
 * RFC 8446 section 4.2: Extension extensions<8..2^16-1>; no type twice;
 * pre_shared_key, if present, last (section 4.2.11).
 */
static int
parse_extensions(struct cbs *exts, struct alpn_hello *h)
{
	uint64_t seen[65536 / 64];
	struct cbs ext;
	uint16_t type;
	int ok;

	memset(seen, 0, sizeof(seen));
	while (exts->len > 0) {
		h->bad_ext = -1;	/* a fault in the block, not in one */
		if (!cbs_u16(exts, &type) || !cbs_prefixed16(exts, &ext))
			return 0;
		h->bad_ext = type;
		if (seen[type / 64] & (UINT64_C(1) << (type % 64)))
			return 0;
		seen[type / 64] |= UINT64_C(1) << (type % 64);
		switch (type) {
		case EXT_SERVER_NAME:
			ok = parse_sni(&ext, h);
			break;
		case EXT_ALPN:
			ok = parse_alpn(&ext, h);
			break;
		case EXT_SUPPORTED_VERSIONS:
			ok = parse_versions(&ext, h);
			break;
		case EXT_PRE_SHARED_KEY:
			ok = exts->len == 0;
			break;
		case EXT_ECH:
			h->has_ech = 1;
			ok = 1;
			break;
		default:
			ok = 1;
			break;
		}
		if (!ok)
			return 0;
	}
	h->bad_ext = -1;
	return 1;
}

/*
 * RFC 8446 section 4.1.2 (and 5246 section 7.4.1.2): the ClientHello body.
 * Extensions may be absent altogether in a pre-1.3 hello.
 */
static int
parse_client_hello(struct cbs *body, struct alpn_hello *h)
{
	struct cbs sid, suites, comp, exts;

	if (!cbs_u16(body, &h->legacy_version) || h->legacy_version >> 8 != 3)
		return 0;
	if (!cbs_skip(body, 32))			/* random */
		return 0;
	if (!cbs_prefixed8(body, &sid) || sid.len > 32)
		return 0;
	if (!cbs_prefixed16(body, &suites) || suites.len < 2 ||
	    suites.len % 2 != 0)
		return 0;
	if (!cbs_prefixed8(body, &comp) || comp.len < 1)
		return 0;
	if (body->len == 0)
		return 1;
	if (!cbs_prefixed16(body, &exts) || body->len != 0)
		return 0;
	return parse_extensions(&exts, h);
}

/*
 * The ClientHello message body, whichever way it arrived: the one step
 * both entry points share.  On failure the views are cleared, so no
 * caller can use a half-parsed hello.
 */
static enum alpn_status
parse_message(const uint8_t *body, size_t len, struct alpn_hello *h)
{
	struct cbs msg;

	h->hello_len = TLS_HS_HDR + len;
	cbs_init(&msg, body, len);
	if (h->hello_len > ALPN_HELLO_MAX || !parse_client_hello(&msg, h)) {
		int bad_ext = h->bad_ext;

		memset(h, 0, offsetof(struct alpn_hello, scratch));
		h->bad_ext = bad_ext;
		return ALPN_BAD;
	}
	return ALPN_OK;
}

/*
 * RFC 8446 section 5.1: a handshake message may be fragmented over several
 * records of type handshake; no other type may be interleaved; records are
 * 1..2^14 bytes.  The ClientHello must end exactly at a record's end.
 */
enum alpn_status
alpn_parse_hello(const uint8_t *buf, size_t len, struct alpn_hello *h,
    size_t *need)
{
	struct cbs in, rec;
	const uint8_t *hs;
	uint16_t rlen;
	uint8_t type, major, minor;
	size_t have = 0, mlen = 0, off, n;

	memset(h, 0, offsetof(struct alpn_hello, scratch));
	h->bad_ext = -1;
	*need = 0;
	cbs_init(&in, buf, len);
	hs = NULL;
	for (;;) {
		off = len - in.len;
		if (in.len < TLS_RECORD_HDR) {
			/* Decide NOT_TLS on the bytes we have, as early as possible. */
			if (off == 0 && len >= 1 && buf[0] != TLS_CT_HANDSHAKE)
				return ALPN_NOT_TLS;
			if (off == 0 && len >= 2 && buf[1] != 3)
				return ALPN_NOT_TLS;
			if (off > 0 && in.len >= 1 && in.p[0] != TLS_CT_HANDSHAKE)
				return ALPN_BAD;
			*need = off + TLS_RECORD_HDR;
			goto more;
		}
		(void)cbs_u8(&in, &type);
		(void)cbs_u8(&in, &major);
		(void)cbs_u8(&in, &minor);
		(void)cbs_u16(&in, &rlen);
		if (off == 0 && (type != TLS_CT_HANDSHAKE || major != 3))
			return ALPN_NOT_TLS;
		if (type != TLS_CT_HANDSHAKE || major != 3 || minor > 4)
			return ALPN_BAD;
		if (rlen == 0 || rlen > TLS_RECORD_MAX)
			return ALPN_BAD;
		if (!cbs_sub(&in, rlen, &rec)) {
			*need = off + TLS_RECORD_HDR + rlen;
			goto more;
		}

		/* Append this fragment to the handshake message. */
		if (hs == NULL && have == 0) {
			/* Fast path: the whole message in the first record. */
			if (rec.len >= TLS_HS_HDR) {
				mlen = TLS_HS_HDR + ((size_t)rec.p[1] << 16 |
				    (size_t)rec.p[2] << 8 | rec.p[3]);
				if (rec.p[0] != TLS_HS_CLIENT_HELLO ||
				    mlen > ALPN_HELLO_MAX)
					return ALPN_BAD;
				if (rec.len >= mlen) {
					hs = rec.p;
					have = rec.len;
					goto complete;
				}
			}
		}
		n = rec.len;
		if (have + n > ALPN_HELLO_MAX)
			return ALPN_BAD;
		memcpy(h->scratch + have, rec.p, n);
		have += n;
		if (have >= TLS_HS_HDR) {
			mlen = TLS_HS_HDR + ((size_t)h->scratch[1] << 16 |
			    (size_t)h->scratch[2] << 8 | h->scratch[3]);
			if (h->scratch[0] != TLS_HS_CLIENT_HELLO ||
			    mlen > ALPN_HELLO_MAX)
				return ALPN_BAD;
			if (have >= mlen) {
				hs = h->scratch;
				goto complete;
			}
		}
		if (len - in.len >= ALPN_WIRE_MAX)
			return ALPN_BAD;
	}

complete:
	/* The message must end where its last record ends. */
	if (have != mlen)
		return ALPN_BAD;
	if (parse_message(hs + TLS_HS_HDR, mlen - TLS_HS_HDR, h) != ALPN_OK)
		return ALPN_BAD;
	h->wire_len = len - in.len;
	return ALPN_OK;

more:
	if (*need > ALPN_WIRE_MAX)
		return ALPN_BAD;
	return ALPN_NEED_MORE;
}

/*
 * RFC 8446 section 4: the body of a handshake message of type
 * client_hello, its 4-byte header already taken off (by GnuTLS).
 */
enum alpn_status
alpn_parse_hello_body(const uint8_t *msg, size_t len, struct alpn_hello *h)
{
	memset(h, 0, offsetof(struct alpn_hello, scratch));
	h->bad_ext = -1;
	if (len > ALPN_HELLO_MAX)	/* keeps 4 + len from wrapping */
		return ALPN_BAD;
	return parse_message(msg, len, h);
}

/* GREASE values (RFC 8701) are 0x?a?a with both bytes equal. */
uint16_t
alpn_max_version(const struct alpn_hello *h)
{
	uint16_t v, best = 0;
	size_t i;

	if (h->versions == NULL)
		return h->legacy_version;
	for (i = 0; i + 1 < h->versions_len; i += 2) {
		v = (uint16_t)(h->versions[i] << 8 | h->versions[i + 1]);
		if ((v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff))
			continue;
		if (v > best)
			best = v;
	}
	return best;
}

int
alpn_next_proto(const struct alpn_hello *h, size_t *off, const uint8_t **name,
    size_t *name_len)
{
	size_t n;

	if (h->alpn == NULL || *off >= h->alpn_len)
		return 0;
	n = h->alpn[*off];
	if (n == 0 || n > h->alpn_len - *off - 1)
		return 0;
	*name = h->alpn + *off + 1;
	*name_len = n;
	*off += 1 + n;
	return 1;
}

/*
 * PROXY protocol (haproxy.org proxy-protocol.txt, v1 section 2.1,
 * v2 section 2.2).
 */
static const uint8_t proxy_v1_sig[6] = { 'P', 'R', 'O', 'X', 'Y', ' ' };
static const uint8_t proxy_v2_sig[12] = {
	0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a
};

/* Strict dotted quad: four decimal octets, no leading zeros. */
static int
parse_ipv4(const uint8_t *s, size_t len, uint8_t out[4])
{
	size_t i = 0;
	int part, digits, v;

	for (part = 0; part < 4; part++) {
		if (part > 0) {
			if (i >= len || s[i] != '.')
				return 0;
			i++;
		}
		v = 0;
		for (digits = 0; i < len && s[i] >= '0' && s[i] <= '9'; digits++) {
			if (digits == 3 || (digits == 1 && v == 0))
				return 0;
			v = v * 10 + (s[i++] - '0');
		}
		if (digits == 0 || v > 255)
			return 0;
		out[part] = (uint8_t)v;
	}
	return i == len;
}

int
alpn_hexval(uint8_t c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * RFC 4291 section 2.2 text forms: groups of 1-4 hex digits, one "::",
 * an optional trailing dotted quad.
 */
static int
parse_ipv6(const uint8_t *s, size_t len, uint8_t out[16])
{
	uint8_t words[16];
	size_t i = 0, n = 0, gap = (size_t)-1, start;
	int v, d, digits;

	if (len >= 2 && s[0] == ':' && s[1] == ':') {
		gap = 0;
		i = 2;
	} else if (len >= 1 && s[0] == ':')
		return 0;
	while (i < len) {
		if (n == 16)
			return 0;
		start = i;
		v = 0;
		for (digits = 0; i < len && (d = alpn_hexval(s[i])) >= 0; digits++) {
			if (digits == 4)
				return 0;
			v = v << 4 | d;
			i++;
		}
		if (i < len && s[i] == '.') {
			/* embedded IPv4 must be last and fit */
			if (n > 12 || !parse_ipv4(s + start, len - start,
			    words + n))
				return 0;
			n += 4;
			i = len;
			break;
		}
		if (digits == 0)
			return 0;
		words[n++] = (uint8_t)(v >> 8);
		words[n++] = (uint8_t)v;
		if (i == len)
			break;
		if (s[i] != ':')
			return 0;
		i++;
		if (i < len && s[i] == ':') {
			if (gap != (size_t)-1)
				return 0;
			gap = n;
			i++;
		} else if (i == len)
			return 0;	/* trailing single colon */
	}
	if (gap == (size_t)-1) {
		if (n != 16)
			return 0;
		memcpy(out, words, 16);
		return 1;
	}
	if (n > 14)
		return 0;
	memset(out, 0, 16);
	memcpy(out, words, gap);
	memcpy(out + 16 - (n - gap), words + gap, n - gap);
	return 1;
}

/* Decimal 0..65535, no sign, no leading zero. */
static int
parse_port(const uint8_t *s, size_t len, uint16_t *port)
{
	size_t i;
	unsigned v = 0;

	if (len == 0 || len > 5 || (len > 1 && s[0] == '0'))
		return 0;
	for (i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (unsigned)(s[i] - '0');
	}
	if (v > 65535)
		return 0;
	*port = (uint16_t)v;
	return 1;
}

/* Next space-separated token of a v1 line. */
static int
v1_token(struct cbs *line, struct cbs *tok, int last)
{
	size_t i;

	for (i = 0; i < line->len && line->p[i] != ' '; i++)
		;
	if (i == 0 || (last ? i != line->len : i == line->len))
		return 0;
	(void)cbs_sub(line, i, tok);
	return last || cbs_skip(line, 1);
}

/* v1: "PROXY TCP4|TCP6 src dst sport dport\r\n" or "PROXY UNKNOWN...\r\n". */
static enum alpn_status
parse_proxy_v1(const uint8_t *buf, size_t len, struct alpn_proxy *p,
    size_t *need)
{
	struct cbs line, proto, src, dst, sp, dp;
	size_t i, end = 0;

	for (i = 0; i < len && i < ALPN_PROXY_V1_MAX; i++) {
		if (buf[i] == '\n') {
			if (buf[i - 1] != '\r')	/* i >= 6: the signature */
				return ALPN_BAD;
			end = i - 1;
			break;
		}
		if (buf[i] == '\0' ||
		    (buf[i] == '\r' && i + 1 < len && buf[i + 1] != '\n'))
			return ALPN_BAD;
	}
	if (end == 0) {
		if (len >= ALPN_PROXY_V1_MAX)
			return ALPN_BAD;
		*need = len + 1;
		return ALPN_NEED_MORE;
	}
	p->version = 1;
	p->hdr_len = end + 2;
	cbs_init(&line, buf + sizeof(proxy_v1_sig), end - sizeof(proxy_v1_sig));
	if (line.len >= 7 && memcmp(line.p, "UNKNOWN", 7) == 0 &&
	    (line.len == 7 || line.p[7] == ' ')) {
		p->family = ALPN_PROXY_UNKNOWN;
		return ALPN_OK;
	}
	if (!v1_token(&line, &proto, 0) || proto.len != 4 ||
	    !v1_token(&line, &src, 0) || !v1_token(&line, &dst, 0) ||
	    !v1_token(&line, &sp, 0) || !v1_token(&line, &dp, 1))
		return ALPN_BAD;
	if (memcmp(proto.p, "TCP4", 4) == 0) {
		p->family = ALPN_PROXY_TCP4;
		if (!parse_ipv4(src.p, src.len, p->src) ||
		    !parse_ipv4(dst.p, dst.len, p->dst))
			return ALPN_BAD;
	} else if (memcmp(proto.p, "TCP6", 4) == 0) {
		p->family = ALPN_PROXY_TCP6;
		if (!parse_ipv6(src.p, src.len, p->src) ||
		    !parse_ipv6(dst.p, dst.len, p->dst))
			return ALPN_BAD;
	} else
		return ALPN_BAD;
	if (!parse_port(sp.p, sp.len, &p->sport) ||
	    !parse_port(dp.p, dp.len, &p->dport))
		return ALPN_BAD;
	return ALPN_OK;
}

/* v2: 16-byte header, address block by family, then TLVs to the end. */
static enum alpn_status
parse_proxy_v2(const uint8_t *buf, size_t len, struct alpn_proxy *p,
    size_t *need)
{
	struct cbs in, block, tlv;
	uint16_t blen;
	uint8_t vc, fam, t;
	size_t alen;

	if (len < 16) {
		*need = 16;
		return ALPN_NEED_MORE;
	}
	cbs_init(&in, buf + 12, len - 12);
	(void)cbs_u8(&in, &vc);
	(void)cbs_u8(&in, &fam);
	(void)cbs_u16(&in, &blen);
	if ((vc >> 4) != 2 || (vc & 0x0f) > 1)
		return ALPN_BAD;
	if (16 + (size_t)blen > ALPN_PROXY_MAX)
		return ALPN_BAD;
	if (!cbs_sub(&in, blen, &block)) {
		*need = 16 + (size_t)blen;
		return ALPN_NEED_MORE;
	}
	p->version = 2;
	p->hdr_len = 16 + (size_t)blen;
	p->local = (vc & 0x0f) == 0;
	p->family = ALPN_PROXY_UNKNOWN;
	if (p->local)
		return ALPN_OK;		/* section 2.2: ignore the rest */
	switch (fam >> 4) {
	case 0:				/* AF_UNSPEC: skip the block */
		return ALPN_OK;
	case 1:
		alen = 12;
		p->family = ALPN_PROXY_TCP4;
		break;
	case 2:
		alen = 36;
		p->family = ALPN_PROXY_TCP6;
		break;
	case 3:
		alen = 216;
		break;
	default:
		return ALPN_BAD;
	}
	if ((fam & 0x0f) != 1)		/* only STREAM makes sense here */
		return ALPN_BAD;
	if (block.len < alen)
		return ALPN_BAD;
	if (p->family != ALPN_PROXY_UNKNOWN) {
		size_t a = alen == 12 ? 4 : 16;

		memcpy(p->src, block.p, a);
		memcpy(p->dst, block.p + a, a);
		p->sport = (uint16_t)(block.p[2 * a] << 8 | block.p[2 * a + 1]);
		p->dport = (uint16_t)(block.p[2 * a + 2] << 8 |
		    block.p[2 * a + 3]);
	}
	(void)cbs_skip(&block, alen);
	while (block.len > 0) {		/* TLVs: consumed exactly */
		if (!cbs_u8(&block, &t) || !cbs_prefixed16(&block, &tlv))
			return ALPN_BAD;
	}
	return ALPN_OK;
}

enum alpn_status
alpn_parse_proxy(const uint8_t *buf, size_t len, struct alpn_proxy *p,
    size_t *need)
{
	size_t n;

	memset(p, 0, sizeof(*p));
	*need = 0;
	n = len < sizeof(proxy_v2_sig) ? len : sizeof(proxy_v2_sig);
	if (len > 0 && buf[0] == proxy_v2_sig[0]) {
		if (memcmp(buf, proxy_v2_sig, n) != 0)
			return ALPN_NOT_TLS;
		if (len < sizeof(proxy_v2_sig)) {
			*need = 16;
			return ALPN_NEED_MORE;
		}
		return parse_proxy_v2(buf, len, p, need);
	}
	n = len < sizeof(proxy_v1_sig) ? len : sizeof(proxy_v1_sig);
	if (memcmp(buf, proxy_v1_sig, n) != 0)
		return ALPN_NOT_TLS;
	if (len < sizeof(proxy_v1_sig)) {
		*need = sizeof(proxy_v1_sig);
		return ALPN_NEED_MORE;
	}
	return parse_proxy_v1(buf, len, p, need);
}

/*
 * Building: the parser's twin.  Writers append to a struct out; what does
 * not fit is counted but not written, so len > cap means "did not fit".
 * alpn_build_proxy hands a header to the caller only when it is complete.
 */
struct out {
	uint8_t		*p;
	size_t		 len, cap;
};

static void
out_bytes(struct out *o, const void *s, size_t n)
{
	if (o->len <= o->cap && n <= o->cap - o->len)
		memcpy(o->p + o->len, s, n);
	o->len += n;
}

static void
out_u8(struct out *o, uint8_t v)
{
	out_bytes(o, &v, 1);
}

static void
out_u16(struct out *o, uint16_t v)
{
	uint8_t b[2] = { (uint8_t)(v >> 8), (uint8_t)v };

	out_bytes(o, b, 2);
}

static void
out_str(struct out *o, const char *s)
{
	out_bytes(o, s, strlen(s));
}

/* Decimal, no leading zeros: ports and IPv4 octets (section 2.1). */
static void
out_dec(struct out *o, unsigned v)
{
	char d[5];
	size_t n = 0;

	do
		d[sizeof(d) - ++n] = (char)('0' + v % 10);
	while ((v /= 10) != 0 && n < sizeof(d));
	out_bytes(o, d + sizeof(d) - n, n);
}

/* Lower-case hex, no leading zeros: an IPv6 group (RFC 5952 4.1, 4.3). */
static void
out_hex16(struct out *o, unsigned v)
{
	static const char hex[] = "0123456789abcdef";
	char d[4];
	size_t n = 0;

	do
		d[sizeof(d) - ++n] = hex[v & 0xf];
	while ((v >>= 4) != 0 && n < sizeof(d));
	out_bytes(o, d + sizeof(d) - n, n);
}

static void
out_ipv4(struct out *o, const uint8_t a[4])
{
	int i;

	for (i = 0; i < 4; i++) {
		if (i > 0)
			out_u8(o, '.');
		out_dec(o, a[i]);
	}
}

/*
 * RFC 5952 section 4: the longest run of two or more zero groups (the
 * first of equal runs) becomes "::"; section 5: an IPv4-mapped address
 * (::ffff:0:0/96) ends in a dotted quad.  Like glibc's inet_ntop, so is an
 * IPv4-compatible one (RFC 4291 2.5.5.1, ::/96 with a non-zero 7th group).
 * The parser reads back every one of these forms.
 */
static void
out_ipv6(struct out *o, const uint8_t a[16])
{
	unsigned w[8];
	int i, run = -1, runlen = 0, cur = -1, curlen = 0;

	for (i = 0; i < 8; i++) {
		w[i] = (unsigned)a[2 * i] << 8 | a[2 * i + 1];
		if (w[i] == 0) {
			if (cur == -1)
				cur = i;
			if (++curlen > runlen) {
				run = cur;
				runlen = curlen;
			}
		} else {
			cur = -1;
			curlen = 0;
		}
	}
	if (runlen < 2)
		run = -1;
	for (i = 0; i < 8; i++) {
		if (run != -1 && i >= run && i < run + runlen) {
			if (i == run)
				out_u8(o, ':');
			continue;
		}
		if (i > 0)
			out_u8(o, ':');
		if (i == 6 && run == 0 &&
		    (runlen == 6 || (runlen == 5 && w[5] == 0xffff))) {
			out_ipv4(o, a + 12);
			return;
		}
		out_hex16(o, w[i]);
	}
	if (run != -1 && run + runlen == 8)
		out_u8(o, ':');
}

/*
 * proxy-protocol.txt section 2.1: "PROXY", one space, TCP4 or TCP6, the
 * source and destination addresses (IPv4 dotted decimal without leading
 * zeros, IPv6 in RFC 4291 text form) and ports (decimal, no leading
 * zeros), single spaces between, CRLF; "PROXY UNKNOWN" CRLF when the
 * sender has no addresses to give.
 */
static int
build_proxy_v1(struct out *o, const struct alpn_proxy *p)
{
	out_bytes(o, proxy_v1_sig, sizeof(proxy_v1_sig));
	switch (p->family) {
	case ALPN_PROXY_UNKNOWN:
		out_str(o, "UNKNOWN\r\n");
		return 1;
	case ALPN_PROXY_TCP4:
		out_str(o, "TCP4 ");
		out_ipv4(o, p->src);
		out_u8(o, ' ');
		out_ipv4(o, p->dst);
		break;
	case ALPN_PROXY_TCP6:
		out_str(o, "TCP6 ");
		out_ipv6(o, p->src);
		out_u8(o, ' ');
		out_ipv6(o, p->dst);
		break;
	default:
		return 0;
	}
	out_u8(o, ' ');
	out_dec(o, p->sport);
	out_u8(o, ' ');
	out_dec(o, p->dport);
	out_str(o, "\r\n");
	return 1;
}

/*
 * proxy-protocol.txt section 2.2: the 12-byte signature; version 2 in the
 * high nibble of byte 13 and the command in the low one (0 LOCAL, 1 PROXY);
 * byte 14 the address family (0 AF_UNSPEC, 1 AF_INET, 2 AF_INET6) over
 * the transport (0 UNSPEC, 1 STREAM); a 16-bit length of the address block
 * that follows: source and destination addresses, then ports, network
 * order (12 bytes for AF_INET, 36 for AF_INET6).  A LOCAL header says "no
 * client to report": AF_UNSPEC and an empty block, as the spec suggests.
 */
static int
build_proxy_v2(struct out *o, const struct alpn_proxy *p)
{
	size_t a;

	out_bytes(o, proxy_v2_sig, sizeof(proxy_v2_sig));
	switch (p->family) {
	case ALPN_PROXY_UNKNOWN:
		out_u8(o, 0x20);		/* v2, LOCAL */
		out_u8(o, 0x00);		/* AF_UNSPEC, UNSPEC */
		out_u16(o, 0);
		return 1;
	case ALPN_PROXY_TCP4:
		a = 4;
		out_u8(o, 0x21);		/* v2, PROXY */
		out_u8(o, 0x11);		/* AF_INET, STREAM */
		break;
	case ALPN_PROXY_TCP6:
		a = 16;
		out_u8(o, 0x21);
		out_u8(o, 0x21);		/* AF_INET6, STREAM */
		break;
	default:
		return 0;
	}
	out_u16(o, (uint16_t)(2 * a + 4));
	out_bytes(o, p->src, a);
	out_bytes(o, p->dst, a);
	out_u16(o, p->sport);
	out_u16(o, p->dport);
	return 1;
}

size_t
alpn_build_proxy(uint8_t *buf, size_t size, int version,
    const struct alpn_proxy *p)
{
	uint8_t tmp[ALPN_PROXY_BUILD_MAX];
	struct out o = { tmp, 0, sizeof(tmp) };
	int ok;

	if (version == 1)
		ok = build_proxy_v1(&o, p);
	else if (version == 2)
		ok = build_proxy_v2(&o, p);
	else
		ok = 0;
	if (!ok || o.len > sizeof(tmp) || o.len > size)
		return 0;
	memcpy(buf, tmp, o.len);
	return o.len;
}
