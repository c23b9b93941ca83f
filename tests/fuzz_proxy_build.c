/*
 * fuzz_proxy_build.c - libFuzzer target for alpn_build_proxy, the PROXY
 * header writer, against its twin alpn_parse_proxy:
 *   - build-then-parse gives back what went in: version, family, local
 *     (v2 with no addresses is LOCAL), addresses, ports, and a hdr_len equal
 *     to the built length, also with bytes following the header;
 *   - the length is within ALPN_PROXY_BUILD_MAX (and v1's 107 bytes); one
 *     byte less of room returns 0 and leaves the buffer untouched;
 *   - bad versions and families return 0;
 *   - with glibc, the bytes are exactly those alpnd's send_proxy_header()
 *     wrote before it called alpn_build_proxy (snprintf + inet_ntop).
 *
 * Input (missing bytes read as zero):
 *   [0]      bit 0: version 1 or 2; bits 1-2: family (3: not a family)
 *   [1] [2]  masks: bit i zeroes group i of src / dst (runs for "::")
 *   [3]      bit 0 / bit 1: src / dst get the ::ffff:0:0/96 prefix
 *   [4..19]  src, [20..35] dst, [36..37] sport, [38..39] dport
 * tests/parse_test --corpus writes seeds in this form.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <arpa/inet.h>
#include <sys/socket.h>
#endif

#include "alpnparse.h"

#define INPUT_LEN	40

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

static void
shape(uint8_t a[16], uint8_t mask, int mapped)
{
	int i;

	for (i = 0; i < 8; i++)
		if (mask & (1u << i))
			a[2 * i] = a[2 * i + 1] = 0;
	if (mapped) {
		memset(a, 0, 10);
		a[10] = a[11] = 0xff;
	}
}

#ifdef __GLIBC__
/* What alpnd.c's send_proxy_header() built by hand, restated. */
static size_t
old_header(uint8_t *buf, size_t size, int version, const struct alpn_proxy *p)
{
	static const uint8_t sig[12] = "\r\n\r\n\0\r\nQUIT\n";
	char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
	int fam = p->family == ALPN_PROXY_TCP4 ? 4 :
	    p->family == ALPN_PROXY_TCP6 ? 6 : 0;
	size_t n, l, alen;

	if (version == 1) {
		if (fam == 0)
			return (size_t)snprintf((char *)buf, size,
			    "PROXY UNKNOWN\r\n");
		inet_ntop(fam == 4 ? AF_INET : AF_INET6, p->src, s, sizeof(s));
		inet_ntop(fam == 4 ? AF_INET : AF_INET6, p->dst, d, sizeof(d));
		return (size_t)snprintf((char *)buf, size,
		    "PROXY TCP%d %s %s %u %u\r\n", fam, s, d, p->sport,
		    p->dport);
	}
	memcpy(buf, sig, sizeof(sig));
	alen = fam == 4 ? 12 : fam == 6 ? 36 : 0;
	buf[12] = fam ? 0x21 : 0x20;
	buf[13] = fam == 4 ? 0x11 : fam == 6 ? 0x21 : 0x00;
	buf[14] = (uint8_t)(alen >> 8);
	buf[15] = (uint8_t)alen;
	n = 16;
	if (fam) {
		l = fam == 4 ? 4 : 16;
		memcpy(buf + n, p->src, l);
		memcpy(buf + n + l, p->dst, l);
		n += 2 * l;
		buf[n++] = (uint8_t)(p->sport >> 8);
		buf[n++] = (uint8_t)p->sport;
		buf[n++] = (uint8_t)(p->dport >> 8);
		buf[n++] = (uint8_t)p->dport;
	}
	return n;
}
#endif

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t in[INPUT_LEN], buf[ALPN_PROXY_BUILD_MAX + 16];
	uint8_t small[ALPN_PROXY_BUILD_MAX];
	struct alpn_proxy p, q;
	size_t n, need, a, i;
	int version, fam;

	memset(in, 0, sizeof(in));
	memcpy(in, data, size < sizeof(in) ? size : sizeof(in));
	version = (in[0] & 1) + 1;
	fam = (in[0] >> 1) & 3;
	memset(&p, 0x5a, sizeof(p));	/* fields the builder must not read */
	p.family = (enum alpn_proxy_family)fam;
	memcpy(p.src, in + 4, 16);
	memcpy(p.dst, in + 20, 16);
	shape(p.src, in[1], in[3] & 1);
	shape(p.dst, in[2], in[3] & 2);
	p.sport = (uint16_t)(in[36] << 8 | in[37]);
	p.dport = (uint16_t)(in[38] << 8 | in[39]);

	n = alpn_build_proxy(buf, sizeof(buf), version, &p);
	if (fam == 3) {
		if (n != 0)
			abort();
		return 0;
	}
	if (n == 0 || n > ALPN_PROXY_BUILD_MAX ||
	    (version == 1 && n > ALPN_PROXY_V1_MAX))
		abort();

	/* One byte short: 0, and not a byte written. */
	memset(small, 0xee, sizeof(small));
	if (alpn_build_proxy(small, n - 1, version, &p) != 0)
		abort();
	for (i = 0; i < sizeof(small); i++)
		if (small[i] != 0xee)
			abort();
	if (alpn_build_proxy(small, n, version, &p) != n ||
	    memcmp(small, buf, n) != 0)
		abort();

	/* Parse it back, with the ClientHello's first bytes behind it. */
	memcpy(buf + n, "\x16\x03\x01\x02\x00\x01", 6);
	if (alpn_parse_proxy(buf, n + 6, &q, &need) != ALPN_OK ||
	    q.hdr_len != n || q.version != version ||
	    q.family != p.family ||
	    q.local != (version == 2 && p.family == ALPN_PROXY_UNKNOWN))
		abort();
	if (p.family != ALPN_PROXY_UNKNOWN) {
		a = p.family == ALPN_PROXY_TCP4 ? 4 : 16;
		if (memcmp(q.src, p.src, a) != 0 ||
		    memcmp(q.dst, p.dst, a) != 0 ||
		    q.sport != p.sport || q.dport != p.dport)
			abort();
	}
	/* Every proper prefix asks for more, as from a slow sender. */
	for (i = 0; i < n; i++)
		if (alpn_parse_proxy(buf, i, &q, &need) != ALPN_NEED_MORE ||
		    need <= i)
			abort();
#ifdef __GLIBC__
	{
		uint8_t old[ALPN_PROXY_BUILD_MAX + 16];

		if (old_header(old, sizeof(old), version, &p) != n ||
		    memcmp(old, buf, n) != 0)
			abort();
	}
#endif
	return 0;
}
