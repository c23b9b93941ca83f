/*
 * fuzz_proxy.c - libFuzzer target for alpn_parse_proxy: no crash, no
 * overread, and a header length that is inside the input and the caps.
 */
#include <stdlib.h>

#include "alpnparse.h"

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

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
