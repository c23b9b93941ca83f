/*
 * fuzz_proxy.c - libFuzzer target for alpn_parse_proxy: no crash, no
 * overread, and a header length that is inside the input and the caps.
 * A header it accepts is also written again with alpn_build_proxy (both
 * versions) and read back: the same family, addresses and ports.
 */
#include <stdlib.h>
#include <string.h>

#include "alpnparse.h"

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

static void
rebuild(const struct alpn_proxy *p, int version)
{
	uint8_t buf[ALPN_PROXY_BUILD_MAX];
	struct alpn_proxy q;
	size_t n, need, a;

	n = alpn_build_proxy(buf, sizeof(buf), version, p);
	if (n == 0 || alpn_parse_proxy(buf, n, &q, &need) != ALPN_OK ||
	    q.hdr_len != n || q.version != version || q.family != p->family)
		abort();
	if (p->family == ALPN_PROXY_UNKNOWN)
		return;
	a = p->family == ALPN_PROXY_TCP4 ? 4 : 16;
	if (memcmp(q.src, p->src, a) != 0 || memcmp(q.dst, p->dst, a) != 0 ||
	    q.sport != p->sport || q.dport != p->dport)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *buf, size_t len)
{
	struct alpn_proxy p;
	size_t need;

	switch (alpn_parse_proxy(buf, len, &p, &need)) {
	case ALPN_OK:
		if (p.hdr_len == 0 || p.hdr_len > len ||
		    p.hdr_len > ALPN_PROXY_MAX ||
		    (p.version == 1 && p.hdr_len > ALPN_PROXY_V1_MAX))
			abort();
		rebuild(&p, 1);
		rebuild(&p, 2);
		break;
	case ALPN_NEED_MORE:
		if (need <= len || need > ALPN_PROXY_MAX)
			abort();
		break;
	default:
		break;
	}
	return 0;
}
