/*
 * parse_test.c - table-driven tests for alpnparse.c.
 *
 * Vectors are written field by field in a tiny assembler notation:
 *   hex bytes        "16 0303" (spaces optional between bytes)
 *   'text'           the ASCII bytes of text
 *   R32              32 bytes of client random
 *   {1 ... }         the enclosed bytes behind a 1-byte length (also {2, {3)
 * so every length in a vector is right unless the vector says otherwise
 * with explicit hex.  For every valid vector the test also checks that each
 * proper prefix is NEED_MORE and that re-framing the handshake message into
 * records of every size gives the same result.  Real captures listed in
 * tests/hellos/INDEX must parse to the SNI and ALPN their client was given.
 *
 * Output: "ok - name" / "not ok - name: why" lines, then a summary.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alpnparse.h"

/* Tables below leave trailing expectation fields out where they do not apply. */
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

#define MAXV	65536

static int npass, nfail;

static void result(int, const char *, const char *, ...)
    __attribute__((format(printf, 3, 4)));
static struct alpn_hello H, H2;		/* 16 KiB each: not on the stack */

static void
result(int ok, const char *name, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		npass++;
		printf("ok - %s\n", name);
		return;
	}
	nfail++;
	printf("not ok - %s: ", name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

/* Assemble the notation above into out; returns the length or -1. */
static long
assemble(const char *s, uint8_t *out, size_t cap)
{
	size_t n = 0, stack[16], width[16];
	int depth = 0, hi;
	size_t i, len, w;

	while (*s) {
		if (isspace((unsigned char)*s)) {
			s++;
		} else if (*s == '{') {
			w = (size_t)(s[1] - '0');
			if (depth == 16 || w < 1 || w > 3 || n + w > cap)
				return -1;
			stack[depth] = n;
			width[depth++] = w;
			n += w;
			s += 2;
		} else if (*s == '}') {
			if (depth == 0)
				return -1;
			depth--;
			len = n - stack[depth] - width[depth];
			for (i = 0; i < width[depth]; i++)
				out[stack[depth] + i] = (uint8_t)(len >>
				    (8 * (width[depth] - 1 - i)));
			s++;
		} else if (*s == '\'') {
			for (s++; *s && *s != '\''; s++) {
				if (n == cap)
					return -1;
				out[n++] = (uint8_t)*s;
			}
			if (*s++ != '\'')
				return -1;
		} else if (s[0] == 'R' && s[1] == '3' && s[2] == '2') {
			for (i = 0; i < 32; i++) {
				if (n == cap)
					return -1;
				out[n++] = (uint8_t)(0xa0 + i);
			}
			s += 3;
		} else if (s[0] == 'Z' && isdigit((unsigned char)s[1])) {
			/* Zn: n zero bytes (decimal), for big fields */
			char *end;
			unsigned long z = strtoul(s + 1, &end, 10);

			if (z > cap - n)
				return -1;
			memset(out + n, 0, z);
			n += z;
			s = end;
		} else if (isxdigit((unsigned char)s[0]) &&
		    isxdigit((unsigned char)s[1])) {
			if (n == cap)
				return -1;
			sscanf(s, "%2x", (unsigned *)&hi);
			out[n++] = (uint8_t)hi;
			s += 2;
		} else
			return -1;
	}
	return depth == 0 ? (long)n : -1;
}

/* Common pieces, annotated. */
#define REC	"16 0301 {2"		/* record: handshake, legacy 0x0301, length */
#define HS	" 01 {3"		/* handshake: client_hello, 24-bit length */
#define BODY	" 0303 R32"		/* legacy_version TLS 1.2, random */	\
		" {1 }"			/* legacy_session_id: empty */		\
		" {2 1301 1302 c02f}"	/* cipher_suites */			\
		" {1 00}"		/* legacy_compression_methods: null */
#define END	"}}"			/* close handshake and record */
#define SNI(x)	" 0000 {2 {2 00 {2 '" x "'}}}"	/* server_name: list, host_name */
#define ALPN1(x) " 0010 {2 {2 {1 '" x "'}}}"	/* ALPN: list, one name */
#define SV13	" 002b {2 {1 0304 0303}}"	/* supported_versions 1.3, 1.2 */
#define EXTS(x)	" {2 " x "}"		/* extensions block */
#define LONG254	"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa."	\
		"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb."	\
		"ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc."	\
		"dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"

struct vec {
	const char	*name;
	enum alpn_status want;
	const char	*hex;
	const char	*sni;		/* expected on OK (NULL: none) */
	const char	*alpn;		/* expected list, comma separated */
	int		 acme, ech;
	uint16_t	 maxver;
	size_t		 sni_n;		/* SNI length when it holds a NUL */
};

static const struct vec vecs[] = {
	/* --- well formed ------------------------------------------------- */
	{ "ok_minimal_no_extensions", ALPN_OK, REC HS BODY END,
	    NULL, NULL, 0, 0, 0x0303 },
	{ "ok_empty_extensions_block", ALPN_OK, REC HS BODY EXTS("") END,
	    NULL, NULL, 0, 0, 0x0303 },
	{ "ok_sni_only", ALPN_OK, REC HS BODY EXTS(SNI("example.com")) END,
	    "example.com", NULL, 0, 0, 0x0303 },
	{ "ok_acme", ALPN_OK,
	    REC HS BODY EXTS(SNI("a.example") ALPN1("acme-tls/1") SV13) END,
	    "a.example", "acme-tls/1", 1, 0, 0x0304 },
	{ "ok_acme_last_of_three", ALPN_OK,
	    REC HS BODY EXTS(SNI("b.example")
	    " 0010 {2 {2 {1 'h2'} {1 'http/1.1'} {1 'acme-tls/1'}}}") END,
	    "b.example", "h2,http/1.1,acme-tls/1", 1, 0, 0x0303 },
	{ "ok_acme_prefix_is_not_acme", ALPN_OK,
	    REC HS BODY EXTS(ALPN1("acme-tls/10")) END,
	    NULL, "acme-tls/10", 0, 0, 0x0303 },
	{ "ok_acme_case_matters", ALPN_OK,
	    REC HS BODY EXTS(ALPN1("ACME-TLS/1")) END,
	    NULL, "ACME-TLS/1", 0, 0, 0x0303 },
	{ "ok_h2_http11", ALPN_OK,
	    REC HS BODY EXTS(SNI("www.example.org")
	    " 0010 {2 {2 {1 'h2'} {1 'http/1.1'}}}" SV13) END,
	    "www.example.org", "h2,http/1.1", 0, 0, 0x0304 },
	{ "ok_sni_trailing_dot_kept", ALPN_OK,
	    REC HS BODY EXTS(SNI("example.com.")) END,
	    "example.com.", NULL, 0, 0, 0x0303 },
	{ "ok_sni_upper_case", ALPN_OK,
	    REC HS BODY EXTS(SNI("WWW.Example.COM")) END,
	    "WWW.Example.COM", NULL, 0, 0, 0x0303 },
	{ "ok_sni_reverse_ipv4", ALPN_OK,
	    REC HS BODY EXTS(SNI("4.3.2.1.in-addr.arpa") ALPN1("acme-tls/1")) END,
	    "4.3.2.1.in-addr.arpa", "acme-tls/1", 1, 0, 0x0303 },
	{ "ok_sni_63_byte_label", ALPN_OK,
	    REC HS BODY EXTS(SNI("abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij123.x")) END,
	    "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij123.x",
	    NULL, 0, 0, 0x0303 },
	{ "ok_ech_present", ALPN_OK,
	    REC HS BODY EXTS(SNI("public.example") " fe0d {2 00 0001}") END,
	    "public.example", NULL, 0, 1, 0x0303 },
	{ "ok_grease_everywhere", ALPN_OK,
	    REC HS BODY EXTS(" 0a0a {2 }" SNI("g.example")
	    " 002b {2 {1 3a3a 0304 0303}} 1a1a {2 00}") END,
	    "g.example", NULL, 0, 0, 0x0304 },
	{ "ok_psk_last", ALPN_OK,
	    REC HS BODY EXTS(SNI("p.example") " 0029 {2 {2 {2 01} 00000000} {2 {1 00}}}") END,
	    "p.example", NULL, 0, 0, 0x0303 },
	{ "ok_session_id_32", ALPN_OK,
	    REC HS " 0303 R32 {1 R32} {2 1301} {1 00}" EXTS(SNI("s.example")) END,
	    "s.example", NULL, 0, 0, 0x0303 },
	{ "ok_legacy_record_0303", ALPN_OK,
	    "16 0303 {2" HS BODY EXTS(SNI("r.example")) END,
	    "r.example", NULL, 0, 0, 0x0303 },
	{ "ok_two_records", ALPN_OK,
	    "16 0301 0006 01 00002b 0303"	/* record 1: header + version */
	    "  16 0301 0029 R32 00 0002 1301 0100 0000",	/* record 2: rest */
	    NULL, NULL, 0, 0, 0x0303 },
	{ "ok_trailing_early_data_ignored", ALPN_OK,
	    REC HS BODY EXTS(SNI("e.example")) END " 17 0303 0003 aabbcc",
	    "e.example", NULL, 0, 0, 0x0303 },
	{ "ok_padding_to_512", ALPN_OK,
	    REC HS BODY EXTS(SNI("pad.example") " 0015 {2 Z400}") END,
	    "pad.example", NULL, 0, 0, 0x0303 },

	/* --- not TLS ----------------------------------------------------- */
	{ "nottls_http_get", ALPN_NOT_TLS, "'GET / HTTP/1.1' 0d0a", },
	{ "nottls_sslv2_hello", ALPN_NOT_TLS, "80 2e 01 0002 0015 0000 0010", },
	{ "nottls_alert_record", ALPN_NOT_TLS, "15 0303 0002 0228", },
	{ "nottls_appdata_record", ALPN_NOT_TLS, "17 0303 0001 00", },
	{ "nottls_ccs_record", ALPN_NOT_TLS, "14 0303 0001 01", },
	{ "nottls_handshake_major_2", ALPN_NOT_TLS, "16 0200 0004 01000000", },
	{ "nottls_proxy_line", ALPN_NOT_TLS, "'PROXY TCP4 '", },
	{ "nottls_one_zero_byte", ALPN_NOT_TLS, "00", },

	/* --- malformed: record layer (RFC 8446 s5.1) ---------------------- */
	{ "bad_record_zero_length", ALPN_BAD, "16 0301 0000", },
	{ "bad_record_over_2_14", ALPN_BAD, "16 0301 4001", },
	{ "bad_record_length_ffff", ALPN_BAD, "16 0301 ffff", },
	{ "bad_record_minor_5", ALPN_BAD, "16 0305 {2" HS BODY END, },
	{ "bad_second_record_alert", ALPN_BAD,
	    "16 0301 0005 01 000045 0303  15 0303 0002 0228", },
	{ "bad_second_record_appdata", ALPN_BAD,
	    "16 0301 0005 01 000045 0303  17 0303 0001 00", },
	{ "bad_second_record_type_first_byte", ALPN_BAD,
	    "16 0301 0005 01 000045 0303  17", },
	{ "bad_second_record_major_2", ALPN_BAD,
	    "16 0301 0005 01 000045 0303  16 0201 0001 00", },
	{ "bad_second_record_zero_length", ALPN_BAD,
	    "16 0301 0005 01 000045 0303  16 0301 0000", },
	{ "bad_bytes_after_hello_in_record", ALPN_BAD,
	    REC HS BODY "}" " 00 }", },
	{ "bad_second_message_in_record", ALPN_BAD,
	    REC HS BODY "}" " 01 000000 }", },
	/* --- malformed: handshake header (RFC 8446 s4) --------------------- */
	{ "bad_handshake_type_server_hello", ALPN_BAD,
	    "16 0303 {2 02 {3" BODY END, },
	{ "bad_handshake_type_zero", ALPN_BAD, "16 0303 0004 00000000", },
	{ "bad_hello_over_16k", ALPN_BAD, "16 0301 0004 01 004000", },
	{ "bad_hello_length_ffffff", ALPN_BAD, "16 0301 0004 01 ffffff", },
	{ "bad_hello_type_in_second_fragment", ALPN_BAD,
	    "16 0301 0001 02  16 0301 0003 000045", },
	/* --- malformed: ClientHello body (RFC 8446 s4.1.2) ---------------- */
	{ "bad_legacy_version_0200", ALPN_BAD,
	    REC HS " 0200 R32 {1 } {2 1301} {1 00}" END, },
	{ "bad_random_short", ALPN_BAD, REC HS " 0303 0102" END, },
	{ "bad_session_id_33", ALPN_BAD,
	    REC HS " 0303 R32 {1 R32 00} {2 1301} {1 00}" END, },
	{ "bad_session_id_overruns", ALPN_BAD,
	    REC HS " 0303 R32 20 0102" END, },
	{ "bad_cipher_suites_empty", ALPN_BAD,
	    REC HS " 0303 R32 {1 } {2 } {1 00}" END, },
	{ "bad_cipher_suites_odd", ALPN_BAD,
	    REC HS " 0303 R32 {1 } {2 130102} {1 00}" END, },
	{ "bad_cipher_suites_overrun", ALPN_BAD,
	    REC HS " 0303 R32 {1 } 0010 1301" END, },
	{ "bad_compression_empty", ALPN_BAD,
	    REC HS " 0303 R32 {1 } {2 1301} {1 }" END, },
	{ "bad_compression_missing", ALPN_BAD,
	    REC HS " 0303 R32 {1 } {2 1301}" END, },
	{ "bad_extensions_length_short", ALPN_BAD,
	    REC HS BODY " 0003" SNI("x.example") END, },
	{ "bad_extensions_length_long", ALPN_BAD,
	    REC HS BODY " 00ff" SNI("x.example") END, },
	{ "bad_bytes_after_extensions", ALPN_BAD,
	    REC HS BODY EXTS(SNI("x.example")) " 00" END, },
	{ "bad_extensions_one_byte", ALPN_BAD, REC HS BODY " 00" END, },
	/* --- malformed: extensions (RFC 8446 s4.2) ----------------------- */
	{ "bad_extension_header_truncated", ALPN_BAD,
	    REC HS BODY EXTS(" 0000") END, },
	{ "bad_extension_data_overrun", ALPN_BAD,
	    REC HS BODY EXTS(" 0017 0004 00") END, },
	{ "bad_duplicate_extension_unknown", ALPN_BAD,
	    REC HS BODY EXTS(" 0017 {2 } 0017 {2 }") END, },
	{ "bad_duplicate_sni_extension", ALPN_BAD,
	    REC HS BODY EXTS(SNI("a.example") SNI("b.example")) END, },
	{ "bad_duplicate_alpn_extension", ALPN_BAD,
	    REC HS BODY EXTS(ALPN1("h2") ALPN1("acme-tls/1")) END, },
	{ "bad_duplicate_grease_extension", ALPN_BAD,
	    REC HS BODY EXTS(" 0a0a {2 } 0a0a {2 }") END, },
	{ "bad_psk_not_last", ALPN_BAD,
	    REC HS BODY EXTS(" 0029 {2 {2 {2 01} 00000000} {2 {1 00}}}" SNI("p.example")) END, },
	/* --- malformed: server_name (RFC 6066 s3) ------------------------ */
	{ "bad_sni_empty_extension", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 }") END, },
	{ "bad_sni_empty_list", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 }}") END, },
	{ "bad_sni_empty_name", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 }}}") END, },
	{ "bad_sni_two_host_names", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 'a.example'} 00 {2 'b.example'}}}") END, },
	{ "bad_sni_unknown_name_type", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 01 {2 'a.example'}}}") END, },
	{ "bad_sni_list_length_short", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 0005 00 {2 'a.example'}}") END, },
	{ "bad_sni_trailing_bytes_in_extension", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 'a.example'}} 00}") END, },
	{ "bad_sni_name_overruns_list", ALPN_BAD,
	    REC HS BODY EXTS(" 0000 {2 {2 00 0020 'a.example'}}") END, },
	/*
	 * --- server_name bytes are reported as sent, never judged: host-name
	 * syntax is alpnd-respond's business (alpn_valid_hostname, where the
	 * name becomes a file name); alpnd routes such hellos like any other.
	 */
	{ "ok_sni_raw_nul", ALPN_OK,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 'a' 00 '.example'}}}") END,
	    "a\0.example", NULL, 0, 0, 0x0303, 10 },
	{ "ok_sni_raw_slash", ALPN_OK, REC HS BODY EXTS(SNI("a/b.example")) END,
	    "a/b.example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_dotdot", ALPN_OK, REC HS BODY EXTS(SNI("a..example")) END,
	    "a..example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_dotdot_path_acme", ALPN_OK,
	    REC HS BODY EXTS(SNI("../../etc/passwd") ALPN1("acme-tls/1")) END,
	    "../../etc/passwd", "acme-tls/1", 1, 0, 0x0303 },
	{ "ok_sni_raw_only_dot", ALPN_OK, REC HS BODY EXTS(SNI(".")) END,
	    ".", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_two_trailing_dots", ALPN_OK,
	    REC HS BODY EXTS(SNI("a.example..")) END,
	    "a.example..", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_leading_dot", ALPN_OK, REC HS BODY EXTS(SNI(".a.example")) END,
	    ".a.example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_underscore", ALPN_OK,
	    REC HS BODY EXTS(SNI("my_host.example.com")) END,
	    "my_host.example.com", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_space", ALPN_OK, REC HS BODY EXTS(SNI("a example")) END,
	    "a example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_high_bit", ALPN_OK,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 'caf' c3a9 '.example'}}}") END,
	    "caf\xc3\xa9.example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_label_leading_hyphen", ALPN_OK,
	    REC HS BODY EXTS(SNI("-a.example")) END,
	    "-a.example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_label_trailing_hyphen", ALPN_OK,
	    REC HS BODY EXTS(SNI("a-.example")) END,
	    "a-.example", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_label_64", ALPN_OK,
	    REC HS BODY EXTS(SNI("abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij1234.x")) END,
	    "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij1234.x",
	    NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_254_bytes", ALPN_OK,
	    REC HS BODY EXTS(SNI(LONG254)) END,
	    LONG254, NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_ipv6_literal", ALPN_OK, REC HS BODY EXTS(SNI("::1")) END,
	    "::1", NULL, 0, 0, 0x0303 },
	{ "ok_sni_raw_crlf_log_injection", ALPN_OK,
	    REC HS BODY EXTS(" 0000 {2 {2 00 {2 'a.test' 0d0a 'alpnd[1]: x'}}}") END,
	    "a.test\r\nalpnd[1]: x", NULL, 0, 0, 0x0303 },
	/* --- malformed: ALPN (RFC 7301 s3.1) ----------------------------- */
	{ "bad_alpn_empty_extension", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 }") END, },
	{ "bad_alpn_empty_list", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 {2 }}") END, },
	{ "bad_alpn_empty_name", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 {2 {1 }}}") END, },
	{ "bad_alpn_empty_name_after_acme", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 {2 {1 'acme-tls/1'} {1 }}}") END, },
	{ "bad_alpn_name_overruns_list", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 {2 0b 'acme-tls/1'}}") END, },
	{ "bad_alpn_list_length_short", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 0005 {1 'acme-tls/1'}}") END, },
	{ "bad_alpn_trailing_bytes_in_extension", ALPN_BAD,
	    REC HS BODY EXTS(" 0010 {2 {2 {1 'h2'}} 00}") END, },
	/* --- malformed: supported_versions (RFC 8446 s4.2.1) -------------- */
	{ "bad_versions_empty", ALPN_BAD, REC HS BODY EXTS(" 002b {2 {1 }}") END, },
	{ "bad_versions_odd", ALPN_BAD, REC HS BODY EXTS(" 002b {2 {1 030403}}") END, },
	{ "bad_versions_trailing", ALPN_BAD, REC HS BODY EXTS(" 002b {2 {1 0304} 00}") END, },
	{ "bad_versions_overrun", ALPN_BAD, REC HS BODY EXTS(" 002b {2 08 0304}") END, },
};

static int
same_hello(const struct alpn_hello *a, const struct alpn_hello *b)
{
#define SAMEVIEW(p, n) (a->n == b->n && (a->n == 0 || \
	(a->p != NULL && b->p != NULL && memcmp(a->p, b->p, a->n) == 0)) && \
	((a->p == NULL) == (b->p == NULL)))
	return SAMEVIEW(sni, sni_len) && SAMEVIEW(alpn, alpn_len) &&
	    SAMEVIEW(versions, versions_len) &&
	    a->legacy_version == b->legacy_version &&
	    a->has_acme == b->has_acme && a->has_ech == b->has_ech &&
	    a->hello_len == b->hello_len;
#undef SAMEVIEW
}

/* The ALPN list as "a,b,c". */
static void
alpn_string(const struct alpn_hello *h, char *out, size_t cap)
{
	const uint8_t *name;
	size_t off = 0, n, used = 0;

	out[0] = '\0';
	while (alpn_next_proto(h, &off, &name, &n)) {
		if (used + n + 2 > cap)
			return;
		if (used)
			out[used++] = ',';
		memcpy(out + used, name, n);
		used += n;
		out[used] = '\0';
	}
}

/* Copy the handshake message out of the records in wire[0..wlen). */
static size_t
unframe(const uint8_t *wire, size_t wlen, uint8_t *msg, size_t cap)
{
	size_t off = 0, n = 0, r;

	while (off + 5 <= wlen) {
		r = (size_t)wire[off + 3] << 8 | wire[off + 4];
		if (off + 5 + r > wlen || n + r > cap)
			break;
		memcpy(msg + n, wire + off + 5, r);
		n += r;
		off += 5 + r;
	}
	return n;
}

/* Re-frame msg into records of at most size bytes. */
static size_t
reframe(const uint8_t *msg, size_t mlen, size_t size, uint8_t *out, size_t cap)
{
	size_t off = 0, n = 0, r;

	while (off < mlen) {
		r = mlen - off < size ? mlen - off : size;
		if (n + 5 + r > cap)
			return 0;
		out[n++] = 0x16;
		out[n++] = 0x03;
		out[n++] = 0x01;
		out[n++] = (uint8_t)(r >> 8);
		out[n++] = (uint8_t)r;
		memcpy(out + n, msg + off, r);
		n += r;
		off += r;
	}
	return n;
}

/*
 * Properties of a valid hello: every proper prefix is NEED_MORE with a
 * need beyond the prefix; every re-framing gives the same answer.
 */
static void
check_properties(const char *name, const uint8_t *wire, size_t wlen)
{
	static uint8_t msg[MAXV], re[MAXV * 6];
	char label[300];
	enum alpn_status st;
	size_t need, i, mlen, rlen, size;
	int bad = 0;

	if (alpn_parse_hello(wire, wlen, &H, &need) != ALPN_OK)
		return;
	wlen = H.wire_len;
	for (i = 0; i < wlen && !bad; i++) {
		st = alpn_parse_hello(wire, i, &H2, &need);
		if (st != ALPN_NEED_MORE || need <= i || need > wlen) {
			snprintf(label, sizeof(label), "%s/prefixes", name);
			result(0, label, "prefix %zu: status %d need %zu", i,
			    st, need);
			bad = 1;
		}
	}
	if (!bad) {
		snprintf(label, sizeof(label), "%s/prefixes", name);
		result(1, label, "%s", "");
	}

	mlen = unframe(wire, wlen, msg, sizeof(msg));
	for (size = 1; size <= mlen && !bad; size++) {
		rlen = reframe(msg, mlen, size, re, sizeof(re));
		st = alpn_parse_hello(re, rlen, &H2, &need);
		if (rlen + 0 > ALPN_WIRE_MAX) {
			/* Beyond the wire cap: must be refused, never OK. */
			if (st != ALPN_BAD) {
				snprintf(label, sizeof(label),
				    "%s/reframe", name);
				result(0, label, "size %zu over cap: %d", size, st);
				bad = 1;
			}
			continue;
		}
		if (st != ALPN_OK || !same_hello(&H, &H2) ||
		    H2.wire_len != rlen) {
			snprintf(label, sizeof(label), "%s/reframe", name);
			result(0, label, "record size %zu: status %d", size, st);
			bad = 1;
		}
	}
	if (!bad) {
		snprintf(label, sizeof(label), "%s/reframe", name);
		result(1, label, "%s", "");
	}
}

/*
 * alpn_parse_hello_body (the message body, as GnuTLS's hook sees it)
 * must agree with alpn_parse_hello on every vector: OK with the same
 * result, or BAD with the same bad_ext.  Where only alpn_parse_hello says
 * BAD, the fault must lie in the framing: the same message in canonical
 * records parses OK.
 */
static void
check_message(const char *name, const uint8_t *wire, size_t wlen)
{
	static uint8_t msg[MAXV], re[MAXV * 2];
	char label[300];
	enum alpn_status st, mst;
	size_t mlen, blen, rlen, need;
	const char *why = NULL;

	st = alpn_parse_hello(wire, wlen, &H, &need);
	if (st != ALPN_OK && st != ALPN_BAD)
		return;
	mlen = unframe(wire, wlen, msg, sizeof(msg));
	if (mlen < 4 || msg[0] != 1)
		return;
	blen = (size_t)msg[1] << 16 | (size_t)msg[2] << 8 | msg[3];
	if (blen > mlen - 4)
		return;			/* no one whole message to hand over */
	mst = alpn_parse_hello_body(msg + 4, blen, &H2);
	if (st == ALPN_OK) {
		if (mst != ALPN_OK)
			why = "body refused";
		else if (!same_hello(&H, &H2) || H2.wire_len != 0 ||
		    (H2.sni && (H2.sni < msg || H2.sni >= msg + mlen)))
			why = "body parsed differently";
	} else if (mst == ALPN_BAD) {
		if (H.bad_ext != H2.bad_ext)
			why = "bad_ext differs";
	} else {
		rlen = reframe(msg, 4 + blen, 16384, re, sizeof(re));
		if (alpn_parse_hello(re, rlen, &H2, &need) != ALPN_OK)
			why = "body accepted, yet not a framing fault";
	}
	snprintf(label, sizeof(label), "%s/message", name);
	result(why == NULL, label, "%s (hello %d body %d, bad_ext %d/%d)",
	    why, st, mst, H.bad_ext, H2.bad_ext);
}

/* Which extension alpn_parse_hello blames (bad_ext) for a BAD vector. */
static const struct {
	const char	*name;
	int		 bad_ext;
} blame[] = {
	{ "bad_sni_empty_list", 0 },
	{ "bad_sni_empty_name", 0 },
	{ "bad_sni_two_host_names", 0 },
	{ "bad_sni_unknown_name_type", 0 },
	{ "bad_sni_trailing_bytes_in_extension", 0 },
	{ "bad_duplicate_sni_extension", 0 },
	{ "bad_alpn_empty_list", 16 },
	{ "bad_alpn_empty_name_after_acme", 16 },
	{ "bad_duplicate_alpn_extension", 16 },
	{ "bad_versions_odd", 43 },
	{ "bad_psk_not_last", 41 },
	{ "bad_duplicate_extension_unknown", 0x17 },
	{ "bad_duplicate_grease_extension", 0x0a0a },
	{ "bad_extension_header_truncated", -1 },
	{ "bad_extension_data_overrun", -1 },
	{ "bad_session_id_33", -1 },
	{ "bad_bytes_after_extensions", -1 },
	{ "bad_record_zero_length", -1 },
	{ "bad_hello_over_16k", -1 },
};

static void
check_blame(const struct vec *v)
{
	char label[300];
	size_t i;

	for (i = 0; i < sizeof(blame) / sizeof(blame[0]); i++) {
		if (strcmp(blame[i].name, v->name) != 0)
			continue;
		snprintf(label, sizeof(label), "%s/bad_ext", v->name);
		result(H.bad_ext == blame[i].bad_ext, label, "bad_ext %d, want %d",
		    H.bad_ext, blame[i].bad_ext);
	}
}

static void
run_vectors(void)
{
	static uint8_t wire[MAXV];
	const struct vec *v;
	enum alpn_status st;
	char alpn[1024], sni[300];
	size_t need, i, sni_n;
	long n;

	for (i = 0; i < sizeof(vecs) / sizeof(vecs[0]); i++) {
		v = &vecs[i];
		n = assemble(v->hex, wire, sizeof(wire));
		if (n < 0) {
			result(0, v->name, "vector does not assemble");
			continue;
		}
		st = alpn_parse_hello(wire, (size_t)n, &H, &need);
		if (st != v->want) {
			result(0, v->name, "status %d, want %d", st, v->want);
			continue;
		}
		if (st == ALPN_OK) {
			snprintf(sni, sizeof(sni), "%.*s", (int)H.sni_len,
			    H.sni ? (const char *)H.sni : "");
			sni_n = v->sni_n ? v->sni_n : v->sni ? strlen(v->sni) : 0;
			alpn_string(&H, alpn, sizeof(alpn));
			if ((v->sni == NULL) != (H.sni == NULL) ||
			    (v->sni && (H.sni_len != sni_n ||
			    memcmp(v->sni, H.sni, sni_n) != 0)) ||
			    (v->alpn == NULL) != (H.alpn == NULL) ||
			    (v->alpn && strcmp(v->alpn, alpn) != 0) ||
			    v->acme != H.has_acme || v->ech != H.has_ech ||
			    v->maxver != alpn_max_version(&H)) {
				result(0, v->name, "got sni '%s' alpn '%s' "
				    "acme %d ech %d ver %04x", sni, alpn,
				    H.has_acme, H.has_ech, alpn_max_version(&H));
				continue;
			}
			result(1, v->name, "%s", "");
			check_message(v->name, wire, (size_t)n);
			check_properties(v->name, wire, (size_t)n);
		} else {
			result(1, v->name, "%s", "");
			if (st == ALPN_BAD)
				check_blame(v);
			check_message(v->name, wire, (size_t)n);
		}
	}
}

/* Real captures: tests/hellos/INDEX lines "file sni alpn,list|-". */
static void
run_captures(const char *dir)
{
	static uint8_t wire[MAXV];
	char path[1024], line[2048], file[256], sni[300], alpn[1024];
	char got_sni[300], got_alpn[1024], label[300];
	enum alpn_status st;
	FILE *idx, *f;
	size_t n, need;
	int count = 0;

	snprintf(path, sizeof(path), "%s/INDEX", dir);
	if ((idx = fopen(path, "r")) == NULL) {
		result(0, "captures", "%s: %s", path, strerror(errno));
		return;
	}
	while (fgets(line, sizeof(line), idx) != NULL) {
		if (line[0] == '#' || line[0] == '\n')
			continue;
		if (sscanf(line, "%255s %299s %1023s", file, sni, alpn) != 3)
			continue;
		snprintf(label, sizeof(label), "capture/%s", file);
		snprintf(path, sizeof(path), "%s/%s", dir, file);
		if ((f = fopen(path, "rb")) == NULL) {
			result(0, label, "%s", strerror(errno));
			continue;
		}
		n = fread(wire, 1, sizeof(wire), f);
		fclose(f);
		st = alpn_parse_hello(wire, n, &H, &need);
		if (st != ALPN_OK) {
			result(0, label, "status %d", st);
			continue;
		}
		if (H.sni != NULL)
			snprintf(got_sni, sizeof(got_sni), "%.*s",
			    (int)H.sni_len, (const char *)H.sni);
		else
			snprintf(got_sni, sizeof(got_sni), "-");
		alpn_string(&H, got_alpn, sizeof(got_alpn));
		if (H.alpn == NULL)
			snprintf(got_alpn, sizeof(got_alpn), "-");
		if (strcmp(sni, got_sni) != 0 || strcmp(alpn, got_alpn) != 0 ||
		    H.has_acme != (strstr(alpn, ALPN_ACME) != NULL)) {
			result(0, label, "got %s %s, want %s %s", got_sni,
			    got_alpn, sni, alpn);
			continue;
		}
		result(1, label, "%s", "");
		check_properties(label, wire, n);
		count++;
	}
	fclose(idx);
	result(count >= 5, "captures/at_least_five", "only %d captures", count);
}

static void
test_hostname(void)
{
	static const struct { const char *s; int ok; } t[] = {
		{ "a", 1 }, { "example.com", 1 }, { "xn--bcher-kva.example", 1 },
		{ "1.2.3.4", 1 }, { "a-b.c", 1 }, { "A.B", 1 },
		{ "", 0 }, { ".", 0 }, { "a.", 0 }, { ".a", 0 }, { "a..b", 0 },
		{ "-a", 0 }, { "a-", 0 }, { "a_b", 0 }, { "a/b", 0 },
		{ "a b", 0 }, { "a\\b", 0 }, { "a:b", 0 }, { "*.example", 0 },
	};
	char buf[300];
	size_t i;
	int bad = 0;

	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		if (alpn_valid_hostname((const uint8_t *)t[i].s,
		    strlen(t[i].s)) != t[i].ok) {
			result(0, "hostname_table", "'%s'", t[i].s);
			bad = 1;
		}
	}
	/* NUL inside, and the 253/254 boundary with 63-byte labels. */
	if (alpn_valid_hostname((const uint8_t *)"a\0b", 3))
		result(0, "hostname_table", "NUL accepted"), bad = 1;
	memset(buf, 'a', sizeof(buf));
	buf[63] = buf[127] = buf[191] = '.';
	if (!alpn_valid_hostname((const uint8_t *)buf, 253) ||
	    alpn_valid_hostname((const uint8_t *)buf, 254))
		result(0, "hostname_table", "253/254 boundary"), bad = 1;
	if (!bad)
		result(1, "hostname_table", "%s", "");
}

/*
 * alpn_parse_hello_body on its own: what GnuTLS's client-hello hook hands
 * over is the message body (no record, no 4-byte handshake header).
 */
#define BODY_ACME	BODY EXTS(SNI("v.example.org") ALPN1("acme-tls/1"))

static void
test_client_hello_body(void)
{
	static uint8_t msg[MAXV];
	enum alpn_status st;
	size_t i, pre;
	long n;
	int bad;

	n = assemble(BODY_ACME, msg, sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(st == ALPN_OK && H.sni == msg + n - 30 && H.sni_len == 13 &&
	    memcmp(H.sni, "v.example.org", 13) == 0 && H.has_acme &&
	    H.hello_len == (size_t)n + 4 && H.wire_len == 0 && H.bad_ext == -1,
	    "body_acme", "status %d sni_len %zu", st, H.sni_len);

	/*
	 * Every proper prefix is refused (no NEED_MORE: GnuTLS hands over
	 * whole messages), except the one that ends before the extensions
	 * block, which is a complete hello without extensions.
	 */
	pre = 2 + 32 + 1 + 2 + 6 + 1 + 1;
	bad = 0;
	for (i = 0; i < (size_t)n && !bad; i++) {
		st = alpn_parse_hello_body(msg, i, &H);
		if (st != (i == pre ? ALPN_OK : ALPN_BAD) ||
		    (st == ALPN_OK && H.sni != NULL))
			bad = 1;
	}
	result(!bad, "body_prefixes", "prefix %zu: status %d", i - 1, st);

	/* 4 + len <= ALPN_HELLO_MAX (16384), as through the record layer. */
	n = assemble(BODY EXTS(" 0015 {2 Z16329}"), msg, sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(n == 16380 && st == ALPN_OK, "body_16380_bytes",
	    "len %ld status %d", n, st);
	n = assemble(BODY EXTS(" 0015 {2 Z16330}"), msg, sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(n == 16381 && st == ALPN_BAD, "body_16381_bytes",
	    "len %ld status %d", n, st);
	/* A huge length is refused before a byte is read (4 + len wraps). */
	st = alpn_parse_hello_body(msg, (size_t)-1, &H);
	result(st == ALPN_BAD, "body_length_size_max", "status %d", st);
	st = alpn_parse_hello_body(msg, 0, &H);
	result(st == ALPN_BAD, "body_empty", "status %d", st);

	/*
	 * legacy_version 0x0403: GnuTLS takes it in a second ClientHello
	 * after HelloRetryRequest; the parser does not.
	 */
	n = assemble(" 0403 R32 {1 } {2 1301} {1 00}"
	    EXTS(SNI("v.example.org") ALPN1("acme-tls/1")), msg, sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(st == ALPN_BAD && H.sni == NULL && !H.has_acme,
	    "body_legacy_version_0403", "status %d", st);

	/* The policy differences from respond.c's former hello_ext. */
	n = assemble(BODY EXTS(" 0000 {2 {2 01 {2 'x'} 00 {2 'v.example.org'}}}"
	    ALPN1("acme-tls/1")), msg, sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(st == ALPN_BAD && H.bad_ext == 0, "body_sni_other_type_first",
	    "status %d bad_ext %d", st, H.bad_ext);
	n = assemble(BODY EXTS(SNI("v.example.org") " 0010 {2 {2 }}"), msg,
	    sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(st == ALPN_BAD && H.bad_ext == 16, "body_alpn_empty_list",
	    "status %d bad_ext %d", st, H.bad_ext);
	n = assemble(BODY EXTS(" 0000 {2 {2 }}" ALPN1("acme-tls/1")), msg,
	    sizeof(msg));
	st = alpn_parse_hello_body(msg, (size_t)n, &H);
	result(st == ALPN_BAD && H.bad_ext == 0, "body_sni_empty_list",
	    "status %d bad_ext %d", st, H.bad_ext);
}

/* alpn_hexval on every byte value. */
static void
test_hexval(void)
{
	static const char digits[] = "0123456789abcdef";
	const char *d;
	int c, want, bad = 0;

	for (c = 0; c < 256; c++) {
		d = c != 0 ? strchr(digits, tolower(c)) : NULL;
		want = d != NULL ? (int)(d - digits) : -1;
		if (alpn_hexval((uint8_t)c) != want) {
			result(0, "hexval", "byte 0x%02x: %d", c,
			    alpn_hexval((uint8_t)c));
			bad = 1;
		}
	}
	if (!bad)
		result(1, "hexval", "%s", "");
}

/* --- PROXY protocol ------------------------------------------------- */

#define V2SIG	"0d0a0d0a000d0a515549540a"

struct pvec {
	const char	*name;
	enum alpn_status want;
	const char	*hex;
	int		 version, local;
	enum alpn_proxy_family family;
	const char	*src;		/* hex of the source address */
	uint16_t	 sport, dport;
	size_t		 hdr_len;	/* 0: the whole vector */
};

static const struct pvec pvecs[] = {
	{ "proxy_v1_tcp4", ALPN_OK,
	    "'PROXY TCP4 192.0.2.1 198.51.100.2 56324 443' 0d0a 16030100",
	    1, 0, ALPN_PROXY_TCP4, "c0000201", 56324, 443, 45 },
	{ "proxy_v1_tcp6", ALPN_OK,
	    "'PROXY TCP6 2001:db8::1 ::ffff:198.51.100.2 1 65535' 0d0a",
	    1, 0, ALPN_PROXY_TCP6, "20010db8000000000000000000000001", 1, 65535, 0 },
	{ "proxy_v1_unknown", ALPN_OK, "'PROXY UNKNOWN' 0d0a",
	    1, 0, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v1_unknown_with_junk", ALPN_OK,
	    "'PROXY UNKNOWN ffff::1 ::2 1 2' 0d0a",
	    1, 0, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v1_max_length", ALPN_OK,
	    "'PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
	    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535' 0d0a",
	    1, 0, ALPN_PROXY_TCP6, "ffffffffffffffffffffffffffffffff", 65535, 65535, 104 },
	{ "proxy_v2_tcp4", ALPN_OK,
	    V2SIG "21 11 {2 c0000201 c6336402 dc04 01bb}",
	    2, 0, ALPN_PROXY_TCP4, "c0000201", 56324, 443, 0 },
	{ "proxy_v2_tcp6_tlvs", ALPN_OK,
	    V2SIG "21 21 {2 20010db8000000000000000000000001 Z16 0001 0002"
	    " 01 {2 'h2'} 04 {2 } 05 {2 'unique-id'}}",
	    2, 0, ALPN_PROXY_TCP6, "20010db8000000000000000000000001", 1, 2, 0 },
	{ "proxy_v2_local", ALPN_OK, V2SIG "20 00 {2 }",
	    2, 1, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v2_local_ignores_block", ALPN_OK, V2SIG "20 11 {2 0102}",
	    2, 1, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v2_unspec", ALPN_OK, V2SIG "21 00 {2 00}",
	    2, 0, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v2_unix", ALPN_OK, V2SIG "21 31 {2 Z216}",
	    2, 0, ALPN_PROXY_UNKNOWN, NULL, 0, 0, 0 },
	{ "proxy_v2_followed_by_hello", ALPN_OK,
	    V2SIG "21 11 {2 7f000001 7f000001 0001 0002} 16030100",
	    2, 0, ALPN_PROXY_TCP4, "7f000001", 1, 2, 28 },

	{ "proxy_none_tls", ALPN_NOT_TLS, "16 0301 0200", },
	{ "proxy_none_http", ALPN_NOT_TLS, "'GET / HTTP/1.0'", },
	{ "proxy_none_lower_case", ALPN_NOT_TLS, "'proxy TCP4'", },
	{ "proxy_none_v2_sig_wrong", ALPN_NOT_TLS, "0d0a0d0a000d0a5155495421", },

	{ "proxy_v1_no_crlf_107", ALPN_BAD,
	    "'PROXY TCP4 1.1.1.1 2.2.2.2 1 2 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
	    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'", },
	{ "proxy_v1_bare_lf", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 1 2' 0a", },
	{ "proxy_v1_nul", ALPN_BAD, "'PROXY TCP4 1.1.1.1' 00 '2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_udp4", ALPN_BAD, "'PROXY UDP4 1.1.1.1 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_tcp4_with_v6", ALPN_BAD, "'PROXY TCP4 ::1 ::1 1 2' 0d0a", },
	{ "proxy_v1_tcp6_with_v4", ALPN_BAD, "'PROXY TCP6 1.1.1.1 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_octet_256", ALPN_BAD, "'PROXY TCP4 1.1.1.256 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_octet_leading_zero", ALPN_BAD, "'PROXY TCP4 01.1.1.1 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_three_octets", ALPN_BAD, "'PROXY TCP4 1.1.1 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_port_65536", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 65536 2' 0d0a", },
	{ "proxy_v1_port_leading_zero", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 01 2' 0d0a", },
	{ "proxy_v1_port_negative", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 -1 2' 0d0a", },
	{ "proxy_v1_missing_port", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 1' 0d0a", },
	{ "proxy_v1_extra_field", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 1 2 3' 0d0a", },
	{ "proxy_v1_double_space", ALPN_BAD, "'PROXY TCP4  1.1.1.1 2.2.2.2 1 2' 0d0a", },
	{ "proxy_v1_trailing_space", ALPN_BAD, "'PROXY TCP4 1.1.1.1 2.2.2.2 1 2 ' 0d0a", },
	{ "proxy_v1_ipv6_two_gaps", ALPN_BAD, "'PROXY TCP6 1::2::3 ::1 1 2' 0d0a", },
	{ "proxy_v1_ipv6_too_many_groups", ALPN_BAD,
	    "'PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2' 0d0a", },
	{ "proxy_v1_ipv6_group_5_digits", ALPN_BAD, "'PROXY TCP6 12345:: ::1 1 2' 0d0a", },
	{ "proxy_v1_ipv6_trailing_colon", ALPN_BAD, "'PROXY TCP6 1:: 1: 1 2' 0d0a", },
	{ "proxy_v1_empty", ALPN_BAD, "'PROXY ' 0d0a", },
	{ "proxy_v2_version_1", ALPN_BAD, V2SIG "11 11 {2 Z12}", },
	{ "proxy_v2_command_2", ALPN_BAD, V2SIG "22 11 {2 Z12}", },
	{ "proxy_v2_family_5", ALPN_BAD, V2SIG "21 51 {2 Z12}", },
	{ "proxy_v2_dgram", ALPN_BAD, V2SIG "21 12 {2 Z12}", },
	{ "proxy_v2_tcp4_short_block", ALPN_BAD, V2SIG "21 11 {2 Z11}", },
	{ "proxy_v2_tcp6_short_block", ALPN_BAD, V2SIG "21 21 {2 Z35}", },
	{ "proxy_v2_tlv_overrun", ALPN_BAD, V2SIG "21 11 {2 Z12 01 0005 'h2'}", },
	{ "proxy_v2_tlv_truncated_header", ALPN_BAD, V2SIG "21 11 {2 Z12 01 00}", },
	{ "proxy_v2_huge_length", ALPN_BAD, V2SIG "21 11 ffff", },
	{ "proxy_v2_over_cap", ALPN_BAD, V2SIG "21 11 0ff1", },
};

static void
run_proxy(void)
{
	static uint8_t wire[MAXV];
	const struct pvec *v;
	struct alpn_proxy p, q;
	enum alpn_status st;
	uint8_t src[16];
	char label[300];
	size_t need, i, j, alen, want_len;
	long n;
	int bad;

	for (i = 0; i < sizeof(pvecs) / sizeof(pvecs[0]); i++) {
		v = &pvecs[i];
		n = assemble(v->hex, wire, sizeof(wire));
		if (n < 0) {
			result(0, v->name, "vector does not assemble");
			continue;
		}
		st = alpn_parse_proxy(wire, (size_t)n, &p, &need);
		if (st != v->want) {
			result(0, v->name, "status %d, want %d", st, v->want);
			continue;
		}
		if (st != ALPN_OK) {
			result(1, v->name, "%s", "");
			continue;
		}
		want_len = v->hdr_len ? v->hdr_len : (size_t)n;
		alen = v->family == ALPN_PROXY_TCP4 ? 4 : 16;
		memset(src, 0, sizeof(src));
		if (v->src)
			assemble(v->src, src, sizeof(src));
		if (p.version != v->version || p.local != v->local ||
		    p.family != v->family || p.hdr_len != want_len ||
		    (v->src && (memcmp(p.src, src, alen) != 0 ||
		    p.sport != v->sport || p.dport != v->dport))) {
			result(0, v->name, "version %d local %d family %d "
			    "len %zu sport %u dport %u", p.version, p.local,
			    p.family, p.hdr_len, p.sport, p.dport);
			continue;
		}
		result(1, v->name, "%s", "");
		/* Every proper prefix of the header is NEED_MORE. */
		bad = 0;
		for (j = 0; j < p.hdr_len; j++) {
			st = alpn_parse_proxy(wire, j, &q, &need);
			if (st != ALPN_NEED_MORE || need <= j) {
				bad = 1;
				break;
			}
		}
		snprintf(label, sizeof(label), "%s/prefixes", v->name);
		result(!bad, label, "prefix %zu: status %d need %zu", j, st,
		    need);
	}
}

/*
 * alpn_build_proxy: the expected bytes annotated field by field, then the
 * properties: one byte less of room gives 0 and leaves the buffer alone,
 * and the parser reads back what went in.
 */
struct bvec {
	const char	*name;
	int		 version;
	enum alpn_proxy_family family;
	const char	*src, *dst;	/* hex, network order */
	uint16_t	 sport, dport;
	const char	*want;
};

#define V1(x)	"'PROXY " x "' 0d0a"		/* section 2.1: a CRLF line */
#define V2HDR	V2SIG				/* section 2.2: signature */
#define A6(x)	"20010db8" x			/* 2001:db8::/32 */

static const struct bvec bvecs[] = {
	{ "build_v1_tcp4", 1, ALPN_PROXY_TCP4, "c0000201", "c6336402",
	    56324, 443, V1("TCP4 192.0.2.1 198.51.100.2 56324 443") },
	{ "build_v1_tcp4_zeros", 1, ALPN_PROXY_TCP4, "00000000", "00000000",
	    0, 0, V1("TCP4 0.0.0.0 0.0.0.0 0 0") },
	{ "build_v1_tcp4_longest", 1, ALPN_PROXY_TCP4, "ffffffff", "ffffffff",
	    65535, 65535, V1("TCP4 255.255.255.255 255.255.255.255 65535 65535") },
	{ "build_v1_tcp4_no_leading_zeros", 1, ALPN_PROXY_TCP4, "0a00000a",
	    "7f000001", 8, 80, V1("TCP4 10.0.0.10 127.0.0.1 8 80") },
	{ "build_v1_tcp6", 1, ALPN_PROXY_TCP6,
	    A6("000000000000000000000001"), "00000000000000000000000000000001",
	    1, 65535, V1("TCP6 2001:db8::1 ::1 1 65535") },
	{ "build_v1_tcp6_longest", 1, ALPN_PROXY_TCP6,
	    "ffffffffffffffffffffffffffffffff", "ffffffffffffffffffffffffffffffff",
	    65535, 65535, V1("TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
	    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535") },
	{ "build_v1_tcp6_unspecified", 1, ALPN_PROXY_TCP6, "Z16 ", "Z16 ", 0, 0,
	    V1("TCP6 :: :: 0 0") },
	/* RFC 5952 4.2.2: one zero group is not "::". */
	{ "build_v1_tcp6_single_zero_group", 1, ALPN_PROXY_TCP6,
	    A6("0000 0001 0001 0001 0001 0001"), A6("0001 0000 0001 0001 0001 0001"),
	    1, 2, V1("TCP6 2001:db8:0:1:1:1:1:1 2001:db8:1:0:1:1:1:1 1 2") },
	/* 4.2.3: the longest run; of equal runs, the first. */
	{ "build_v1_tcp6_longest_run", 1, ALPN_PROXY_TCP6,
	    A6("0000 0001 0000 0000 0000 0001"), A6("0000 0000 0001 0000 0000 0001"),
	    1, 2, V1("TCP6 2001:db8:0:1::1 2001:db8::1:0:0:1 1 2") },
	{ "build_v1_tcp6_run_at_end", 1, ALPN_PROXY_TCP6,
	    "00010000000000000000000000000000", "fe800000000000000000000000000000",
	    1, 2, V1("TCP6 1:: fe80:: 1 2") },
	{ "build_v1_tcp6_leading_zero_group", 1, ALPN_PROXY_TCP6,
	    "00000001000200030004000500060007", "000000000000000000000000000a000b",
	    1, 2, V1("TCP6 0:1:2:3:4:5:6:7 ::0.10.0.11 1 2") },
	/* section 5: IPv4-mapped ends in a dotted quad (as does ::/96). */
	{ "build_v1_tcp6_v4_mapped", 1, ALPN_PROXY_TCP6,
	    "00000000000000000000ffffc0000201", "00000000000000000000ffff00000000",
	    443, 1, V1("TCP6 ::ffff:192.0.2.1 ::ffff:0.0.0.0 443 1") },
	{ "build_v1_tcp6_v4_compatible", 1, ALPN_PROXY_TCP6,
	    "000000000000000000000000c0000201", "00000000000000000000000000010000",
	    1, 2, V1("TCP6 ::192.0.2.1 ::0.1.0.0 1 2") },
	{ "build_v1_tcp6_not_mapped", 1, ALPN_PROXY_TCP6,
	    "00000000000000000000fffec0000201", "0000000000000000ffff0000c0000201",
	    1, 2, V1("TCP6 ::fffe:c000:201 ::ffff:0:c000:201 1 2") },
	{ "build_v1_unknown", 1, ALPN_PROXY_UNKNOWN, NULL, NULL, 0, 0,
	    V1("UNKNOWN") },
	{ "build_v2_tcp4", 2, ALPN_PROXY_TCP4, "c0000201", "c6336402", 56324, 443,
	    V2HDR " 21"		/* version 2, command PROXY */
	    " 11"		/* AF_INET, STREAM */
	    " 000c"		/* address block: 12 bytes */
	    " c0000201"		/* source 192.0.2.1 */
	    " c6336402"		/* destination 198.51.100.2 */
	    " dc04"		/* source port 56324 */
	    " 01bb" },		/* destination port 443 */
	{ "build_v2_tcp6", 2, ALPN_PROXY_TCP6,
	    A6("000000000000000000000001"), "00000000000000000000ffff7f000001",
	    1, 65535,
	    V2HDR " 21"		/* version 2, command PROXY */
	    " 21"		/* AF_INET6, STREAM */
	    " 0024"		/* address block: 36 bytes */
	    " 20010db8000000000000000000000001"	/* source 2001:db8::1 */
	    " 00000000000000000000ffff7f000001"	/* destination ::ffff:127.0.0.1 */
	    " 0001"		/* source port 1 */
	    " ffff" },		/* destination port 65535 */
	{ "build_v2_local", 2, ALPN_PROXY_UNKNOWN, NULL, NULL, 0, 0,
	    V2HDR " 20"		/* version 2, command LOCAL */
	    " 00"		/* AF_UNSPEC, UNSPEC */
	    " 0000" },		/* no address block */
};

static void
fill_proxy(const struct bvec *v, struct alpn_proxy *p)
{
	memset(p, 0x5a, sizeof(*p));	/* the builder must not read these */
	p->family = v->family;
	memset(p->src, 0, sizeof(p->src));
	memset(p->dst, 0, sizeof(p->dst));
	if (v->src)
		assemble(v->src, p->src, sizeof(p->src));
	if (v->dst)
		assemble(v->dst, p->dst, sizeof(p->dst));
	p->sport = v->sport;
	p->dport = v->dport;
}

static void
run_build(void)
{
	static uint8_t want[MAXV], buf[MAXV];
	const struct bvec *v;
	struct alpn_proxy p, q;
	enum alpn_status st;
	char label[300];
	size_t i, j, n, need, a;
	long wn;
	int bad;

	for (i = 0; i < sizeof(bvecs) / sizeof(bvecs[0]); i++) {
		v = &bvecs[i];
		fill_proxy(v, &p);
		wn = assemble(v->want, want, sizeof(want));
		memset(buf, 0xee, sizeof(buf));
		n = alpn_build_proxy(buf, sizeof(buf), v->version, &p);
		if (wn < 0 || n != (size_t)wn || memcmp(buf, want, n) != 0 ||
		    buf[n] != 0xee) {
			result(0, v->name, "built %zu bytes '%.*s', want %ld",
			    n, (int)n, (const char *)buf, wn);
			continue;
		}
		result(1, v->name, "%s", "");

		/* Room for one byte less: 0 and nothing written; exact: n. */
		memset(buf, 0xee, sizeof(buf));
		bad = alpn_build_proxy(buf, n - 1, v->version, &p) != 0;
		for (j = 0; j < n && !bad; j++)
			bad = buf[j] != 0xee;
		bad = bad || alpn_build_proxy(buf, n, v->version, &p) != n ||
		    memcmp(buf, want, n) != 0;
		snprintf(label, sizeof(label), "%s/room", v->name);
		result(!bad, label, "%s", "short buffer written or accepted");

		/* The parser gives back what went in, hdr_len = length. */
		buf[n] = 0x16;
		st = alpn_parse_proxy(buf, n + 1, &q, &need);
		a = v->family == ALPN_PROXY_TCP4 ? 4 : 16;
		bad = st != ALPN_OK || q.hdr_len != n ||
		    q.version != v->version || q.family != v->family ||
		    q.local != (v->version == 2 &&
		    v->family == ALPN_PROXY_UNKNOWN);
		if (!bad && v->family != ALPN_PROXY_UNKNOWN)
			bad = memcmp(q.src, p.src, a) != 0 ||
			    memcmp(q.dst, p.dst, a) != 0 ||
			    q.sport != p.sport || q.dport != p.dport;
		snprintf(label, sizeof(label), "%s/parse", v->name);
		result(!bad, label, "status %d len %zu version %d family %d",
		    st, q.hdr_len, q.version, q.family);
	}

	/* Not a version or not a family: 0, nothing written. */
	fill_proxy(&bvecs[0], &p);
	memset(buf, 0xee, sizeof(buf));
	bad = alpn_build_proxy(buf, sizeof(buf), 0, &p) != 0 ||
	    alpn_build_proxy(buf, sizeof(buf), 3, &p) != 0 ||
	    alpn_build_proxy(buf, sizeof(buf), -1, &p) != 0 ||
	    alpn_build_proxy(buf, 0, 1, &p) != 0;
	p.family = (enum alpn_proxy_family)3;
	bad = bad || alpn_build_proxy(buf, sizeof(buf), 1, &p) != 0 ||
	    alpn_build_proxy(buf, sizeof(buf), 2, &p) != 0;
	for (j = 0; j < sizeof(buf) && !bad; j++)
		bad = buf[j] != 0xee;
	result(!bad, "build_refuses_bad_version_and_family", "%s",
	    "built something");
}

#ifdef __GLIBC__
#include <arpa/inet.h>
#include <sys/socket.h>

/*
 * alpnd's send_proxy_header() wrote v1 lines with snprintf and glibc's
 * inet_ntop; the builder must write the same bytes.  Addresses with zero
 * groups at random places (where the text forms differ), mapped and
 * compatible ones included; a fixed seed.
 */
static void
test_build_matches_inet_ntop(void)
{
	struct alpn_proxy p;
	char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN], line[128];
	uint8_t buf[ALPN_PROXY_BUILD_MAX];
	uint32_t x = 2463534242u;
	size_t n, k;
	int i, j, diff = 0, v6;

	for (i = 0; i < 200000 && diff < 3; i++) {
		memset(&p, 0, sizeof(p));
		v6 = i % 4 != 0;
		p.family = v6 ? ALPN_PROXY_TCP6 : ALPN_PROXY_TCP4;
		for (j = 0; j < 36; j++) {
			x ^= x << 13, x ^= x >> 17, x ^= x << 5;
			if (j < 32 && (x >> 8) % 3 == 0 && j % 2 == 0)
				continue;	/* leave a zero group half */
			if (j < 16)
				p.src[j] = (uint8_t)x;
			else if (j < 32)
				p.dst[j - 16] = (uint8_t)x;
			else if (j < 34)
				p.sport = (uint16_t)(p.sport << 8 | (x & 0xff));
			else
				p.dport = (uint16_t)(p.dport << 8 | (x & 0xff));
		}
		/* zero whole groups, and now and then a v4-carrying prefix */
		for (j = 0; j < 16; j += 2) {
			x ^= x << 13, x ^= x >> 17, x ^= x << 5;
			if (x % 2)
				p.src[j] = p.src[j + 1] = 0;
			if ((x >> 1) % 2)
				p.dst[j] = p.dst[j + 1] = 0;
		}
		if (x % 7 == 0) {
			memset(p.src, 0, 10);
			p.src[10] = p.src[11] = 0xff;
		} else if (x % 7 == 1)
			memset(p.dst, 0, 12);
		inet_ntop(v6 ? AF_INET6 : AF_INET, p.src, s, sizeof(s));
		inet_ntop(v6 ? AF_INET6 : AF_INET, p.dst, d, sizeof(d));
		k = (size_t)snprintf(line, sizeof(line), "PROXY TCP%d %s %s %u %u\r\n",
		    v6 ? 6 : 4, s, d, p.sport, p.dport);
		n = alpn_build_proxy(buf, sizeof(buf), 1, &p);
		if (n != k || memcmp(buf, line, n) != 0) {
			diff++;
			result(0, "build_v1_matches_inet_ntop", "'%.*s' vs '%s'",
			    (int)n, (const char *)buf, line);
		}
	}
	if (diff == 0)
		result(1, "build_v1_matches_inet_ntop", "%s", "");
}
#endif

/*
 * Write every vector as a seed file: DIR/hello/NAME, DIR/proxy/NAME, and
 * the builder's inputs as DIR/proxy_build/NAME in tests/fuzz_proxy_build.c's
 * input form.
 */
static int
dump_corpus(const char *dir)
{
	static uint8_t wire[MAXV];
	char path[1024];
	FILE *f;
	size_t i;
	long n;

	for (i = 0; i < sizeof(vecs) / sizeof(vecs[0]) +
	    sizeof(pvecs) / sizeof(pvecs[0]); i++) {
		int hello = i < sizeof(vecs) / sizeof(vecs[0]);
		const char *name = hello ? vecs[i].name :
		    pvecs[i - sizeof(vecs) / sizeof(vecs[0])].name;
		const char *hex = hello ? vecs[i].hex :
		    pvecs[i - sizeof(vecs) / sizeof(vecs[0])].hex;

		if ((n = assemble(hex, wire, sizeof(wire))) < 0)
			return 1;
		snprintf(path, sizeof(path), "%s/%s/%s", dir,
		    hello ? "hello" : "proxy", name);
		if ((f = fopen(path, "wb")) == NULL) {
			perror(path);
			return 1;
		}
		fwrite(wire, 1, (size_t)n, f);
		fclose(f);
	}
	for (i = 0; i < sizeof(bvecs) / sizeof(bvecs[0]); i++) {
		struct alpn_proxy p;

		fill_proxy(&bvecs[i], &p);
		memset(wire, 0, 40);
		wire[0] = (uint8_t)((bvecs[i].version - 1) | p.family << 1);
		memcpy(wire + 4, p.src, 16);
		memcpy(wire + 20, p.dst, 16);
		wire[36] = (uint8_t)(p.sport >> 8);
		wire[37] = (uint8_t)p.sport;
		wire[38] = (uint8_t)(p.dport >> 8);
		wire[39] = (uint8_t)p.dport;
		snprintf(path, sizeof(path), "%s/proxy_build/%s", dir,
		    bvecs[i].name);
		if ((f = fopen(path, "wb")) == NULL) {
			perror(path);
			return 1;
		}
		fwrite(wire, 1, 40, f);
		fclose(f);
	}
	return 0;
}

int
main(int argc, char *argv[])
{
	const char *dir = "tests/hellos";

	if (argc == 3 && strcmp(argv[1], "--corpus") == 0)
		return dump_corpus(argv[2]);
	if (argc > 1)
		dir = argv[1];

	run_vectors();
	test_client_hello_body();
	test_hostname();
	test_hexval();
	run_captures(dir);
	run_proxy();
	run_build();
#ifdef __GLIBC__
	test_build_matches_inet_ntop();
#endif
	printf("%d passed, %d failed\n", npass, nfail);
	return nfail != 0;
}
