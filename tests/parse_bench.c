/*
 * parse_bench.c - how long alpn_parse_hello takes on a 2 KiB ClientHello
 * (SNI, ALPN h2/http1.1, supported_versions, padding to 2048 bytes), in one
 * record and spread over records of 512 bytes.  Informational: not a test.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alpnparse.h"

static struct alpn_hello h;

static size_t
put16(uint8_t *p, size_t n)
{
	p[0] = (uint8_t)(n >> 8);
	p[1] = (uint8_t)n;
	return 2;
}

/* A TLS 1.3-style hello whose handshake message is exactly 2048 bytes. */
static size_t
build(uint8_t *m)
{
	static const char sni[] = "www.example.com";
	static const uint8_t alpn[] = "\x02h2\x08http/1.1";
	size_t n = 4, ext, pad;

	m[n++] = 3, m[n++] = 3;
	memset(m + n, 0x42, 32), n += 32;
	m[n++] = 32, memset(m + n, 0x17, 32), n += 32;
	n += put16(m + n, 8);
	memcpy(m + n, "\x13\x01\x13\x02\x13\x03\xc0\x2f", 8), n += 8;
	m[n++] = 1, m[n++] = 0;
	ext = n, n += 2;
	n += put16(m + n, 0), n += put16(m + n, sizeof(sni) - 1 + 5);
	n += put16(m + n, sizeof(sni) - 1 + 3), m[n++] = 0;
	n += put16(m + n, sizeof(sni) - 1);
	memcpy(m + n, sni, sizeof(sni) - 1), n += sizeof(sni) - 1;
	n += put16(m + n, 16), n += put16(m + n, sizeof(alpn) - 1 + 2);
	n += put16(m + n, sizeof(alpn) - 1);
	memcpy(m + n, alpn, sizeof(alpn) - 1), n += sizeof(alpn) - 1;
	n += put16(m + n, 43), n += put16(m + n, 5);
	m[n++] = 4, memcpy(m + n, "\x03\x04\x03\x03", 4), n += 4;
	pad = 2048 - n - 4;				/* padding (RFC 7685) */
	n += put16(m + n, 21), n += put16(m + n, pad);
	memset(m + n, 0, pad), n += pad;
	put16(m + ext, n - ext - 2);
	m[0] = 1, m[1] = 0, m[2] = (uint8_t)((n - 4) >> 8), m[3] = (uint8_t)(n - 4);
	return n;
}

static size_t
frame(const uint8_t *m, size_t mlen, size_t size, uint8_t *out)
{
	size_t off = 0, n = 0, r;

	for (; off < mlen; off += r) {
		r = mlen - off < size ? mlen - off : size;
		out[n++] = 0x16, out[n++] = 3, out[n++] = 1;
		n += put16(out + n, r);
		memcpy(out + n, m + off, r), n += r;
	}
	return n;
}

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int
main(void)
{
	static uint8_t msg[4096], wire[8192];
	size_t mlen, wlen, need, sizes[] = { 16384, 512 }, i, k;
	const long iters = 200000;
	double t0, t1;

	mlen = build(msg);
	for (k = 0; k < 2; k++) {
		wlen = frame(msg, mlen, sizes[k], wire);
		if (alpn_parse_hello(wire, wlen, &h, &need) != ALPN_OK ||
		    h.hello_len != 2048) {
			fprintf(stderr, "parse_bench: hello does not parse\n");
			return 1;
		}
		t0 = now();
		for (i = 0; i < (size_t)iters; i++)
			(void)alpn_parse_hello(wire, wlen, &h, &need);
		t1 = now();
		printf("parse 2048-byte ClientHello, %s: %.0f ns per hello\n",
		    k == 0 ? "one record" : "records of 512 bytes",
		    (t1 - t0) / (double)iters * 1e9);
	}
	return 0;
}
