/*
 * fuzz_hello.c - libFuzzer target for alpn_parse_hello.
 * Besides "no crash, no overread", it checks the parser's promises:
 * views stay inside the input or the scratch space, NEED_MORE asks for
 * more than it was given, and an OK hello still parses the same when
 * handed exactly its own bytes.  alpn_parse_hello_body (the message body
 * alone, as alpnd-respond's GnuTLS hook parses it) must agree: on the
 * message of every OK hello, and on the input taken as a body.
 */
#include <stdlib.h>
#include <string.h>

#include "alpnparse.h"

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

static struct alpn_hello h, h2, h3;
static uint8_t msg[ALPN_WIRE_MAX];

/* The handshake message of an OK hello, out of its records. */
static size_t
unframe(const uint8_t *buf, size_t wire_len)
{
	size_t off = 0, n = 0, r;

	while (off + 5 <= wire_len) {
		r = (size_t)buf[off + 3] << 8 | buf[off + 4];
		memcpy(msg + n, buf + off + 5, r);
		n += r;
		off += 5 + r;
	}
	return n;
}

static int
inside(const uint8_t *p, size_t n, const uint8_t *buf, size_t len)
{
	if (p == NULL)
		return n == 0;
	if (p >= buf && p + n <= buf + len)
		return 1;
	return p >= h.scratch && p + n <= h.scratch + sizeof(h.scratch);
}

int
LLVMFuzzerTestOneInput(const uint8_t *buf, size_t len)
{
	const uint8_t *name;
	size_t need, off = 0, n;
	enum alpn_status st;

	st = alpn_parse_hello(buf, len, &h, &need);
	switch (st) {
	case ALPN_NEED_MORE:
		if (need <= len || need > ALPN_WIRE_MAX)
			abort();
		break;
	case ALPN_OK:
		if (!inside(h.sni, h.sni_len, buf, len) ||
		    !inside(h.alpn, h.alpn_len, buf, len) ||
		    !inside(h.versions, h.versions_len, buf, len) ||
		    h.wire_len > len || h.hello_len > ALPN_HELLO_MAX)
			abort();
		while (alpn_next_proto(&h, &off, &name, &n))
			if (n == 0)
				abort();
		if (off != h.alpn_len)
			abort();
		(void)alpn_max_version(&h);
		if (alpn_parse_hello(buf, h.wire_len, &h2, &need) != ALPN_OK ||
		    h2.sni_len != h.sni_len || h2.alpn_len != h.alpn_len ||
		    h2.has_acme != h.has_acme)
			abort();
		n = unframe(buf, h.wire_len);
		if (n != h.hello_len ||
		    alpn_parse_hello_body(msg + 4, n - 4, &h3) != ALPN_OK ||
		    h3.sni_len != h.sni_len || h3.alpn_len != h.alpn_len ||
		    h3.versions_len != h.versions_len ||
		    h3.has_acme != h.has_acme || h3.has_ech != h.has_ech ||
		    h3.legacy_version != h.legacy_version ||
		    h3.hello_len != h.hello_len || h3.wire_len != 0 ||
		    (h.sni && memcmp(h3.sni, h.sni, h.sni_len) != 0) ||
		    (h.alpn && memcmp(h3.alpn, h.alpn, h.alpn_len) != 0))
			abort();
		break;
	default:
		break;
	}

	/* The input as a message body: views inside it, or a clean refusal. */
	switch (alpn_parse_hello_body(buf, len, &h3)) {
	case ALPN_OK:
		if (len + 4 > ALPN_HELLO_MAX || h3.hello_len != len + 4 ||
		    h3.wire_len != 0 || h3.bad_ext != -1 ||
		    (h3.sni && (h3.sni < buf || h3.sni + h3.sni_len > buf + len)) ||
		    (h3.alpn && (h3.alpn < buf ||
		    h3.alpn + h3.alpn_len > buf + len)))
			abort();
		break;
	case ALPN_BAD:
		if (h3.sni != NULL || h3.alpn != NULL || h3.has_acme ||
		    h3.bad_ext < -1 || h3.bad_ext > 0xffff)
			abort();
		break;
	default:
		abort();
	}
	return 0;
}
