/*
 * alpnparse.h - pure parsers for the first bytes of a connection:
 * the TLS ClientHello (RFC 8446, 6066, 7301) and the PROXY protocol
 * header (v1 text, v2 binary).
 *
 * No I/O, no allocation, no logging, no global state.  Bytes in, a status
 * and views into caller-owned memory out.  Safe on any input.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#ifndef ALPNPARSE_H
#define ALPNPARSE_H

#include <stddef.h>
#include <stdint.h>

enum alpn_status {
	ALPN_OK = 0,		/* complete and well formed */
	ALPN_NEED_MORE,		/* a valid prefix: call again with >= *need bytes */
	ALPN_NOT_TLS,		/* not a TLS handshake record (or no PROXY header) */
	ALPN_BAD		/* malformed, oversized or contradictory */
};

/* Largest ClientHello handshake message accepted, header included. */
#define ALPN_HELLO_MAX		16384
/* Most wire bytes (records with their headers) ever looked at. */
#define ALPN_WIRE_MAX		32768
/* Largest PROXY header accepted (v1 is at most 107 bytes by spec). */
#define ALPN_PROXY_MAX		4096
#define ALPN_PROXY_V1_MAX	107

#define ALPN_ACME		"acme-tls/1"

/*
 * What a well-formed ClientHello is, for both programs (alpnd routes on it,
 * alpnd-respond refuses anything else with decode_error):
 *   - the record layer (alpn_parse_hello only): handshake records of
 *     1..2^14 bytes, nothing else interleaved, the message ending at a
 *     record's end, at most ALPN_WIRE_MAX wire bytes;
 *   - the message: type client_hello, at most ALPN_HELLO_MAX bytes with its
 *     header, legacy_version 3.x, session id <= 32 bytes, a non-empty even
 *     cipher suite list, at least one compression method, an extension
 *     block (if any) consumed exactly;
 *   - extensions: no type twice, pre_shared_key last; server_name: a
 *     non-empty list holding exactly one entry, of type host_name, with a
 *     non-empty name; ALPN: a non-empty list of non-empty names;
 *     supported_versions: an even, non-empty list.
 * The host name's bytes are reported as sent, never judged: whether they
 * make a usable name is for the caller (alpnd-respond, with
 * alpn_valid_hostname, where the name becomes a file name).
 */
struct alpn_hello {
	/*
	 * SNI host_name (RFC 6066 section 3) exactly as sent: any bytes (a NUL,
	 * '/', non-ASCII, a trailing dot), not NUL-terminated; NULL if absent.
	 */
	const uint8_t	*sni;
	size_t		 sni_len;
	/*
	 * ALPN ProtocolNameList body (RFC 7301 section 3.1): a sequence of
	 * <1-byte length, name>; NULL if the extension is absent.
	 */
	const uint8_t	*alpn;
	size_t		 alpn_len;
	/*
	 * The rest describes what was parsed rather than what alpnd routes
	 * by (sni, alpn, has_acme; alpnd-respond also reads legacy_version
	 * and bad_ext).  parse_test.c and fuzz_hello.c hold the parser to
	 * them: every hello's versions, length and record bytes must come
	 * out as built, so a parser that skipped or misread a field fails
	 * there.  alpn_max_version() is for those tests.
	 */
	/* supported_versions body (RFC 8446 section 4.2.1): 2-byte versions. */
	const uint8_t	*versions;
	size_t		 versions_len;
	uint16_t	 legacy_version;	/* ClientHello.legacy_version */
	int		 has_acme;		/* "acme-tls/1" in the ALPN list */
	int		 has_ech;		/* encrypted_client_hello present */
	size_t		 hello_len;		/* handshake message length, header incl. */
	size_t		 wire_len;		/* record bytes that carried it */
	/*
	 * On ALPN_BAD, for the log: the type of the extension that was
	 * malformed or repeated, or -1 when the fault lies elsewhere.
	 */
	int		 bad_ext;
	/*
	 * Reassembly space when the handshake message spans several records;
	 * the views above may point here or into the caller's input.
	 */
	uint8_t		 scratch[ALPN_HELLO_MAX];
};

/*
 * Parse a ClientHello from buf[0..len), which starts at the first TLS record.
 * ALPN_NEED_MORE sets *need to the smallest total length worth retrying with.
 * On ALPN_OK the views in *h are valid while buf and *h live.
 */
enum alpn_status alpn_parse_hello(const uint8_t *buf, size_t len,
    struct alpn_hello *h, size_t *need);

/*
 * Parse a ClientHello handshake message body, msg[0..len): the bytes after
 * the 4-byte handshake header (msg_type, length), as GnuTLS hands them to a
 * GNUTLS_HANDSHAKE_CLIENT_HELLO hook; no record layer.  Same rules as
 * alpn_parse_hello (the same code), with 4 + len <= ALPN_HELLO_MAX.
 * Returns ALPN_OK or ALPN_BAD; on ALPN_OK the views point into msg,
 * hello_len is 4 + len and wire_len is 0.
 */
enum alpn_status alpn_parse_hello_body(const uint8_t *msg, size_t len,
    struct alpn_hello *h);

/* Highest version offered: supported_versions if present, else legacy. */
uint16_t alpn_max_version(const struct alpn_hello *h);

/*
 * Iterate the ALPN list: *off starts at 0; returns 1 with a view of the next
 * name, 0 at the end.  Only meaningful on a list alpn_parse_hello accepted.
 */
int alpn_next_proto(const struct alpn_hello *h, size_t *off,
    const uint8_t **name, size_t *name_len);

/*
 * RFC 1123 LDH host name, <= 253 bytes, no empty label, no trailing dot.
 * Not applied by the parsers above: alpnd-respond calls it on the SNI.
 */
int alpn_valid_hostname(const uint8_t *s, size_t len);

/* The value of a hex digit (either case), or -1: for IPv6 text and AUTH. */
int alpn_hexval(uint8_t c);

enum alpn_proxy_family {
	ALPN_PROXY_UNKNOWN = 0,	/* v1 UNKNOWN, v2 LOCAL or AF_UNSPEC/AF_UNIX */
	ALPN_PROXY_TCP4,
	ALPN_PROXY_TCP6
};

struct alpn_proxy {
	int		 version;	/* 1 or 2 */
	int		 local;		/* v2 LOCAL command: keep the real peer */
	enum alpn_proxy_family family;
	uint8_t		 src[16], dst[16];	/* network order; 4 bytes for TCP4 */
	uint16_t	 sport, dport;		/* host order */
	size_t		 hdr_len;	/* bytes to consume from the stream */
};

/*
 * Parse a PROXY protocol header (v1 or v2) at buf[0..len).
 * ALPN_NOT_TLS here means "this is not a PROXY header at all".
 */
enum alpn_status alpn_parse_proxy(const uint8_t *buf, size_t len,
    struct alpn_proxy *p, size_t *need);

/* Longest header alpn_build_proxy writes: a v1 TCP6 line (v2 needs 52). */
#define ALPN_PROXY_BUILD_MAX	104

/*
 * The parser's twin: write a PROXY header of version 1 or 2 for p->family,
 * p->src, p->dst, p->sport, p->dport (p->version, p->local and p->hdr_len
 * are not read) into buf[0..size).
 *   TCP4, TCP6:  v1 "PROXY TCP4|TCP6 src dst sport dport\r\n" (IPv6 in
 *                RFC 5952 form, IPv4-mapped and -compatible ones ending in
 *                a dotted quad, like glibc's inet_ntop), or a v2 PROXY
 *                command with an AF_INET/AF_INET6 STREAM block, no TLVs;
 *   UNKNOWN:     v1 "PROXY UNKNOWN\r\n", or a v2 LOCAL command with an
 *                AF_UNSPEC, empty block.
 * Returns the header's length, or 0 (buf untouched) when size is too small
 * or version or family is not one of the above.  ALPN_PROXY_BUILD_MAX
 * bytes are always enough.  alpn_parse_proxy gives back what went in.
 */
size_t alpn_build_proxy(uint8_t *buf, size_t size, int version,
    const struct alpn_proxy *p);

#endif /* ALPNPARSE_H */
