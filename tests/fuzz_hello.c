/*
 * fuzz_hello.c - libFuzzer target for alpn_parse_hello.
 * Besides "no crash, no overread", it checks the parser's promises:
 * views stay inside the input or the scratch space, NEED_MORE asks for
 * more than it was given, and an OK hello still parses the same when
 * handed exactly its own bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "alpnparse.h"

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

static struct alpn_hello h, h2;

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
		break;
	default:
		break;
	}
	return 0;
}
