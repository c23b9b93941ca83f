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

struct alpn_hello {
	/* SNI host_name (RFC 6066 section 3), not NUL-terminated; NULL if absent. */
	const uint8_t	*sni;
	size_t		 sni_len;
	/*
	 * ALPN ProtocolNameList body (RFC 7301 section 3.1): a sequence of
	 * <1-byte length, name>; NULL if the extension is absent.
	 */
	const uint8_t	*alpn;
	size_t		 alpn_len;
	/* supported_versions body (RFC 8446 section 4.2.1): 2-byte versions. */
	const uint8_t	*versions;
	size_t		 versions_len;
	uint16_t	 legacy_version;	/* ClientHello.legacy_version */
	int		 has_acme;		/* "acme-tls/1" in the ALPN list */
	int		 has_ech;		/* encrypted_client_hello present */
	size_t		 hello_len;		/* handshake message length, header incl. */
	size_t		 wire_len;		/* record bytes that carried it */
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

/* Highest version offered: supported_versions if present, else legacy. */
uint16_t alpn_max_version(const struct alpn_hello *h);

/*
 * Iterate the ALPN list: *off starts at 0; returns 1 with a view of the next
 * name, 0 at the end.  Only meaningful on a list alpn_parse_hello accepted.
 */
int alpn_next_proto(const struct alpn_hello *h, size_t *off,
    const uint8_t **name, size_t *name_len);

/* RFC 1123 LDH host name, <= 253 bytes, no empty label, no trailing dot. */
int alpn_valid_hostname(const uint8_t *s, size_t len);

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

#endif /* ALPNPARSE_H */
