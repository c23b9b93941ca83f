/*
 * respond.c - alpnd-respond: answer one ACME TLS-ALPN-01 validation
 * (RFC 8737, RFC 8738) on an inherited connection, and make or remove
 * the challenge certificates it serves.
 *
 *   alpnd-respond --certs DIR [--hello-timeout SECS]
 *   alpnd-respond --certs DIR --make NAME AUTH
 *   alpnd-respond --certs DIR --clean NAME
 *   alpnd-respond --certs DIR --check NAME
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */

#include <sys/types.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>
#include <systemd/sd-journal.h>

#include "alpnparse.h"
#include "shared.h"

#define PROG		"alpnd-respond"
#define ACME_OID	"1.3.6.1.5.5.7.1.31"	/* id-pe-acmeIdentifier, RFC 8737 6.1 */
#define DIGEST_LEN	32			/* SHA-256 */
#define NAME_LEN	253			/* RFC 1035 presentation, no dot */
#define PEM_MAX		(64 * 1024)		/* larger files are not challenges */
#define SNI_LOG_MAX	512			/* SNI bytes shown in a log line */
#define WHY_LEN		768
#define CHALLENGE_DAYS	7
#define DRAIN_MS	1000
#define DRAIN_MAX	(64 * 1024)
#define CLOSE_WAIT_MS	250	/* for the client to close first */

/* One identifier: a DNS name, or an IP address by its reverse name. */
struct ident {
	char		name[NAME_LEN + 1];	/* lower case, no trailing dot */
	size_t		len;
	int		is_ip;
	uint8_t		ip[16];
	size_t		ip_len;
};

/* A loaded and checked challenge pair. */
struct pair {
	gnutls_x509_crt_t	crt;
	gnutls_x509_privkey_t	key;
	uint8_t			digest[DIGEST_LEN];
	char			keydesc[64];
};

/*
 * The responder's session: the one connection served, what the ClientHello
 * hook decided and what the log line will say.
 */
struct session {
	int		 dirfd;
	int		 dir_errno;		/* why dirfd is -1 */
	const char	*dir;
	gnutls_certificate_credentials_t cred;
	struct timespec	 start;
	char		 client[INET6_ADDRSTRLEN + 16];
	char		 sni[4 * SNI_LOG_MAX + 1];	/* escaped, for logs */
	const char	*result;
	char		 why[WHY_LEN];
	char		 loaded[NAME_LEN + 1];	/* name whose pair is set */
	int		 hook_failed;		/* our hook refused, alert pending */
	int		 alert;
	int		 rc;
	char		 keydesc[64];
};

/* The command line, read once by parse_options(). */
struct options {
	const char	*dir;		/* --certs */
	long		 timeout;	/* --hello-timeout, seconds */
	int		 mode;		/* 0 (serve), 'm', 'c' or 'k' */
	char		**args;		/* the operands */
};

static int stderr_is_conn;		/* inetd: fd 2 is the client */

static void usage(void) __attribute__((noreturn));

static void
usage(void)
{
	fprintf(stderr,
	    "usage: %s --certs DIR [--hello-timeout SECS]\n"
	    "       %s --certs DIR --make NAME AUTH\n"
	    "       %s --certs DIR --clean NAME\n"
	    "       %s --certs DIR --check NAME\n",
	    PROG, PROG, PROG, PROG);
	exit(EX_USAGE);
}

static void
on_alarm(int sig)
{
	static const char msg[] = PROG ": handshake deadline passed\n";
	ssize_t n;

	(void)sig;
	if (!stderr_is_conn) {
		n = write(STDERR_FILENO, msg, sizeof(msg) - 1);
		(void)n;
	}
	_exit(EX_TEMPFAIL);
}

static double
elapsed_ms(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - start->tv_sec) * 1e3 +
	    (now.tv_nsec - start->tv_nsec) / 1e6;
}

/*
 * The handshake deadline is absolute: GnuTLS's own timeout restarts with
 * every byte, so a client trickling one byte at a time would outlive it.
 * One connection per process, hence plain statics.
 */
static struct timespec	hs_start;
static double		hs_limit_ms;

static int
pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
	struct pollfd pfd;
	double left = hs_limit_ms - elapsed_ms(&hs_start);

	if (left <= 0)
		return 0;			/* GNUTLS_E_TIMEDOUT */
	if (ms != GNUTLS_INDEFINITE_TIMEOUT && ms < left)
		left = ms;
	pfd.fd = (int)(intptr_t)ptr;
	pfd.events = POLLIN;
	return poll(&pfd, 1, (int)left + 1);
}

/*
 * RFC 8738 section 6: an IP identifier travels as its reverse name.
 * Accept exactly four decimal octets + "in-addr.arpa" or exactly 32
 * nibbles + "ip6.arpa"; anything else is not an IP identifier.
 */
static int
reverse_to_ip(const char *name, size_t len, uint8_t *ip, size_t *ip_len)
{
	static const char v4[] = ".in-addr.arpa", v6[] = ".ip6.arpa";
	const char *p;
	size_t i;

	if (len > sizeof(v4) - 1 &&
	    strcmp(name + len - (sizeof(v4) - 1), v4) == 0) {
		p = name;
		for (i = 0; i < 4; i++) {
			unsigned v = 0, nd = 0;

			while (*p >= '0' && *p <= '9' && nd < 4) {
				v = v * 10 + (unsigned)(*p++ - '0');
				nd++;
			}
			if (nd == 0 || nd > 3 || v > 255 ||
			    (nd > 1 && p[-(int)nd] == '0') || *p != '.')
				return 0;
			ip[3 - i] = (uint8_t)v;
			p++;
		}
		if ((size_t)(p - name) != len - (sizeof(v4) - 1) + 1)
			return 0;
		*ip_len = 4;
		return 1;
	}
	if (len == 64 + sizeof(v6) - 1 - 1 &&
	    strcmp(name + 64 - 1, v6) == 0) {
		memset(ip, 0, 16);
		for (i = 0; i < 32; i++) {
			int v = alpn_hexval((uint8_t)name[2 * i]);

			if (v < 0 || name[2 * i + 1] != '.')
				return 0;
			/* Nibbles run from the least significant one. */
			ip[15 - i / 2] |= (uint8_t)(v << (4 * (i % 2)));
		}
		*ip_len = 16;
		return 1;
	}
	return 0;
}

static void
ip_to_reverse(const uint8_t *ip, size_t ip_len, struct ident *id)
{
	static const char hex[] = "0123456789abcdef";
	size_t i, o = 0;

	if (ip_len == 4) {
		snprintf(id->name, sizeof(id->name), "%u.%u.%u.%u.in-addr.arpa",
		    ip[3], ip[2], ip[1], ip[0]);
	} else {
		for (i = 16; i-- > 0;) {
			id->name[o++] = hex[ip[i] & 0xf];
			id->name[o++] = '.';
			id->name[o++] = hex[ip[i] >> 4];
			id->name[o++] = '.';
		}
		memcpy(id->name + o, "ip6.arpa", sizeof("ip6.arpa"));
	}
	id->len = strlen(id->name);
	id->is_ip = 1;
	memcpy(id->ip, ip, ip_len);
	id->ip_len = ip_len;
}

/*
 * Turn an SNI host_name (RFC 6066 section 3) or a command-line name into an
 * identifier: lower case, one trailing dot stripped, then validated as an
 * LDH host name before it is ever used to build a file name.
 */
static int
ident_from_name(const uint8_t *raw, size_t rawlen, struct ident *id,
    char *why, size_t whylen)
{
	uint8_t tmp[16];
	size_t i, len = rawlen;

	memset(id, 0, sizeof(*id));
	if (rawlen == 0) {
		snprintf(why, whylen, "empty name");
		return -1;
	}
	if (memchr(raw, '\0', rawlen) != NULL) {
		snprintf(why, whylen, "name contains NUL");
		return -1;
	}
	if (len > 0 && raw[len - 1] == '.')
		len--;
	if (len > NAME_LEN) {
		snprintf(why, whylen, "name longer than %d bytes", NAME_LEN);
		return -1;
	}
	if (memchr(raw, '/', len) != NULL) {
		snprintf(why, whylen, "name contains '/'");
		return -1;
	}
	for (i = 0; i + 1 < len; i++)
		if (raw[i] == '.' && raw[i + 1] == '.') {
			snprintf(why, whylen, "name contains '..'");
			return -1;
		}
	for (i = 0; i < len; i++) {
		uint8_t c = raw[i];

		id->name[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
	}
	id->name[len] = '\0';
	id->len = len;
	if (inet_pton(AF_INET, id->name, tmp) == 1 ||
	    inet_pton(AF_INET6, id->name, tmp) == 1) {
		snprintf(why, whylen, "IP literal (RFC 6066 3 forbids it in SNI)");
		return -1;
	}
	if (!alpn_valid_hostname((const uint8_t *)id->name, len) ||
	    id->name[0] == '.' || id->name[0] == '-') {
		snprintf(why, whylen, "not a valid host name");
		return -1;
	}
	id->is_ip = reverse_to_ip(id->name, len, id->ip, &id->ip_len);
	return 0;
}

/* A command-line NAME: an IP address (by its reverse name) or a DNS name. */
static int
ident_from_arg(const char *arg, struct ident *id, char *why, size_t whylen)
{
	uint8_t ip[16];

	memset(id, 0, sizeof(*id));
	if (inet_pton(AF_INET, arg, ip) == 1) {
		ip_to_reverse(ip, 4, id);
		return 0;
	}
	if (inet_pton(AF_INET6, arg, ip) == 1) {
		/* ::ffff:a.b.c.d is validated as the IPv4 address it is. */
		if (IN6_IS_ADDR_V4MAPPED((struct in6_addr *)ip))
			ip_to_reverse(ip + 12, 4, id);
		else
			ip_to_reverse(ip, 16, id);
		return 0;
	}
	return ident_from_name((const uint8_t *)arg, strlen(arg), id, why,
	    whylen);
}

/* Read DIR/fname: a regular file, never through a symlink, bounded. */
static int
read_file(int dirfd, const char *fname, gnutls_datum_t *out, char *why,
    size_t whylen)
{
	struct stat st;
	ssize_t n;
	size_t off = 0;
	int fd, rc = -1;

	out->data = NULL;
	out->size = 0;
	if ((fd = openat(dirfd, fname, O_RDONLY | O_NOFOLLOW | O_CLOEXEC |
	    O_NONBLOCK | O_NOCTTY)) == -1) {
		if (errno == ELOOP)
			snprintf(why, whylen, "%s is a symbolic link", fname);
		else
			snprintf(why, whylen, "%s: %s", fname, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) == -1) {
		snprintf(why, whylen, "%s: %s", fname, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(why, whylen, "%s is not a regular file", fname);
		goto out;
	}
	if (st.st_nlink != 1) {
		/* A hard link may stand for a file outside the directory. */
		snprintf(why, whylen, "%s has %ju links (1 allowed)", fname,
		    (uintmax_t)st.st_nlink);
		goto out;
	}
	if (st.st_size <= 0 || st.st_size > PEM_MAX) {
		snprintf(why, whylen, "%s has size %lld (1..%d allowed)", fname,
		    (long long)st.st_size, PEM_MAX);
		goto out;
	}
	if ((out->data = malloc((size_t)st.st_size + 1)) == NULL) {
		snprintf(why, whylen, "out of memory");
		goto out;
	}
	while (off < (size_t)st.st_size) {
		n = read(fd, out->data + off, (size_t)st.st_size - off);
		if (n == -1 && errno == EINTR)
			continue;
		if (n == -1) {
			snprintf(why, whylen, "%s: %s", fname, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		off += (size_t)n;
	}
	out->data[off] = '\0';
	out->size = (unsigned)off;
	rc = 0;
 out:
	if (rc == -1) {
		free(out->data);
		out->data = NULL;
	}
	close(fd);
	return rc;
}

static void
pair_free(struct pair *p)
{
	if (p->crt != NULL)
		gnutls_x509_crt_deinit(p->crt);
	if (p->key != NULL)
		gnutls_x509_privkey_deinit(p->key);
	p->crt = NULL;
	p->key = NULL;
}

static void
describe_key(gnutls_x509_privkey_t key, char *buf, size_t len)
{
	gnutls_ecc_curve_t curve;
	unsigned bits = 0;
	int pk;

	gnutls_datum_t x, y, k;

	pk = gnutls_x509_privkey_get_pk_algorithm2(key, &bits);
	if (pk == GNUTLS_PK_ECDSA &&
	    gnutls_x509_privkey_export_ecc_raw(key, &curve, &x, &y, &k) == 0) {
		snprintf(buf, len, "ECDSA-%s", gnutls_ecc_curve_get_name(curve));
		gnutls_memset(k.data, 0, k.size);
		gnutls_free(x.data);
		gnutls_free(y.data);
		gnutls_free(k.data);
	} else if (pk >= 0)
		snprintf(buf, len, "%s-%u",
		    gnutls_pk_get_name((gnutls_pk_algorithm_t)pk), bits);
	else
		snprintf(buf, len, "unknown key");
}

/* The certificate's public key is the key file's. */
static int
check_key_match(const struct pair *p, char *why, size_t whylen)
{
	uint8_t kid1[64], kid2[64];
	size_t kl1 = sizeof(kid1), kl2 = sizeof(kid2);

	if (gnutls_x509_crt_get_key_id(p->crt, GNUTLS_KEYID_USE_SHA256,
	    kid1, &kl1) < 0 ||
	    gnutls_x509_privkey_get_key_id(p->key, GNUTLS_KEYID_USE_SHA256,
	    kid2, &kl2) < 0 || kl1 != kl2 || memcmp(kid1, kid2, kl1) != 0) {
		snprintf(why, whylen, "key does not match certificate");
		return -1;
	}
	return 0;
}

/* Its issuer is its subject, and its signature verifies with its own key. */
static int
check_self_signed(const struct pair *p, char *why, size_t whylen)
{
	gnutls_x509_crt_t crt = p->crt;
	unsigned status = 0;
	int ret;

	if (!gnutls_x509_crt_check_issuer(crt, crt)) {
		snprintf(why, whylen, "not self-signed: issuer is not the "
		    "subject");
		return -1;
	}
	ret = gnutls_x509_crt_verify(crt, &crt, 1,
	    GNUTLS_VERIFY_DO_NOT_ALLOW_SAME | GNUTLS_VERIFY_DISABLE_CA_SIGN |
	    GNUTLS_VERIFY_DISABLE_TIME_CHECKS |
	    GNUTLS_VERIFY_DISABLE_TRUSTED_TIME_CHECKS |
	    GNUTLS_VERIFY_IGNORE_UNKNOWN_CRIT_EXTENSIONS, &status);
	if (ret < 0 || status != 0) {
		snprintf(why, whylen, "not self-signed: signature does not "
		    "verify with its own key (status 0x%x)", status);
		return -1;
	}
	return 0;
}

/* How many subjectAltName entries (up to 64 are counted), or -1. */
static int
count_sans(gnutls_x509_crt_t crt, char *why, size_t whylen)
{
	unsigned i, san_type, critical;
	int ret, nsan = 0;

	for (i = 0; i < 64; i++) {
		size_t sz = 0;

		ret = gnutls_x509_crt_get_subject_alt_name2(crt, i, NULL,
		    &sz, &san_type, &critical);
		if (ret == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
			break;
		if (ret < 0 && ret != GNUTLS_E_SHORT_MEMORY_BUFFER) {
			snprintf(why, whylen, "subjectAltName unreadable: %s",
			    gnutls_strerror(ret));
			return -1;
		}
		nsan++;
	}
	return nsan;
}

/* A dNSName equal to the identifier, ASCII case ignored. */
static int
dnsname_is(const uint8_t *san, size_t len, const struct ident *id)
{
	size_t k;

	if (len != id->len)
		return 0;
	for (k = 0; k < len; k++) {
		uint8_t c = san[k];

		if (c >= 'A' && c <= 'Z')
			c += 32;
		if (c != (uint8_t)id->name[k])
			return 0;
	}
	return 1;
}

/*
 * Exactly one subjectAltName entry: the identifier's dNSName, or for an IP
 * identifier the iPAddress it stands for.
 */
static int
check_san(const struct ident *id, const struct pair *p, char *why,
    size_t whylen)
{
	uint8_t buf[1024];
	char shown[128];
	size_t sz = sizeof(buf);
	unsigned san_type, critical;
	int ret, nsan;

	if ((nsan = count_sans(p->crt, why, whylen)) == -1)
		return -1;
	if (nsan != 1) {
		snprintf(why, whylen, "%d subjectAltName entries, RFC 8737 "
		    "wants exactly one", nsan);
		return -1;
	}
	ret = gnutls_x509_crt_get_subject_alt_name2(p->crt, 0, buf, &sz,
	    &san_type, &critical);
	if (ret < 0) {
		snprintf(why, whylen, "subjectAltName unreadable: %s",
		    gnutls_strerror(ret));
		return -1;
	}
	if (id->is_ip) {
		if (ret != GNUTLS_SAN_IPADDRESS) {
			snprintf(why, whylen, "subjectAltName is not an "
			    "iPAddress (RFC 8738)");
			return -1;
		}
		if (sz != id->ip_len || memcmp(buf, id->ip, id->ip_len) != 0) {
			snprintf(why, whylen, "subjectAltName iPAddress is not "
			    "the address of %s", id->name);
			return -1;
		}
		return 0;
	}
	if (ret != GNUTLS_SAN_DNSNAME) {
		snprintf(why, whylen, "subjectAltName is not a dNSName");
		return -1;
	}
	if (!dnsname_is(buf, sz, id)) {
		log_escape(shown, sizeof(shown), buf, sz);
		snprintf(why, whylen, "subjectAltName dNSName '%s' is not %s",
		    shown, id->name);
		return -1;
	}
	return 0;
}

/*
 * Exactly one acmeIdentifier extension, critical, holding
 * Authorization ::= OCTET STRING (SIZE (32)) (RFC 8737 section 3): the
 * digest goes to p->digest.
 */
static int
check_acme_ext(struct pair *p, char *why, size_t whylen)
{
	gnutls_datum_t ext;
	unsigned i, critical;
	char oid[128];
	size_t oid_size;
	int found = 0, ret;

	for (i = 0;; i++) {
		oid_size = sizeof(oid);
		ret = gnutls_x509_crt_get_extension_info(p->crt, i, oid,
		    &oid_size, &critical);
		if (ret == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
			break;
		if (ret < 0) {
			snprintf(why, whylen, "extension %u unreadable: %s", i,
			    gnutls_strerror(ret));
			return -1;
		}
		if (strcmp(oid, ACME_OID) != 0)
			continue;
		if (found++) {
			snprintf(why, whylen, "acmeIdentifier extension "
			    "appears twice");
			return -1;
		}
		if (!critical) {
			snprintf(why, whylen, "acmeIdentifier extension is not "
			    "critical");
			return -1;
		}
		if ((ret = gnutls_x509_crt_get_extension_data2(p->crt, i,
		    &ext)) < 0) {
			snprintf(why, whylen, "acmeIdentifier unreadable: %s",
			    gnutls_strerror(ret));
			return -1;
		}
		if (ext.size != 2 + DIGEST_LEN || ext.data[0] != 0x04 ||
		    ext.data[1] != DIGEST_LEN) {
			snprintf(why, whylen, "acmeIdentifier is not a 32-byte "
			    "OCTET STRING (%u bytes of DER)", ext.size);
			gnutls_free(ext.data);
			return -1;
		}
		memcpy(p->digest, ext.data + 2, DIGEST_LEN);
		gnutls_free(ext.data);
	}
	if (!found) {
		snprintf(why, whylen, "no acmeIdentifier extension (%s)",
		    ACME_OID);
		return -1;
	}
	return 0;
}

/*
 * RFC 8737 section 3 and RFC 8738 section 6: the only certificate ever
 * served is self-signed, carries exactly one subjectAltName entry equal to
 * the identifier (dNSName, or iPAddress for a reverse name) and exactly one
 * critical acmeIdentifier extension holding a 32-byte OCTET STRING, and
 * its key is the one in the key file.  The first check that fails says why.
 */
static int
check_pair(const struct ident *id, struct pair *p, char *why, size_t whylen)
{
	if (check_key_match(p, why, whylen) == -1 ||
	    check_self_signed(p, why, whylen) == -1 ||
	    check_san(id, p, why, whylen) == -1 ||
	    check_acme_ext(p, why, whylen) == -1)
		return -1;
	return 0;
}

/* Load NAME.crt.pem and NAME.key.pem from the directory and check them. */
static int
load_pair(int dirfd, const struct ident *id, struct pair *p, char *why,
    size_t whylen)
{
	gnutls_datum_t crtpem = { NULL, 0 }, keypem = { NULL, 0 };
	gnutls_x509_crt_t *list = NULL;
	unsigned n = 0, i;
	char fname[NAME_LEN + 16];
	int ret, rc = -1;

	memset(p, 0, sizeof(*p));
	snprintf(fname, sizeof(fname), "%s.crt.pem", id->name);
	if (read_file(dirfd, fname, &crtpem, why, whylen) == -1)
		goto out;
	snprintf(fname, sizeof(fname), "%s.key.pem", id->name);
	if (read_file(dirfd, fname, &keypem, why, whylen) == -1)
		goto out;

	ret = gnutls_x509_crt_list_import2(&list, &n, &crtpem,
	    GNUTLS_X509_FMT_PEM, 0);
	if (ret < 0) {
		snprintf(why, whylen, "%s.crt.pem: %s", id->name,
		    gnutls_strerror(ret));
		goto out;
	}
	if (n != 1) {
		snprintf(why, whylen, "%s.crt.pem holds %u certificates, a "
		    "challenge has one", id->name, n);
		goto out;
	}
	p->crt = list[0];
	list[0] = NULL;

	if ((ret = gnutls_x509_privkey_init(&p->key)) < 0 ||
	    (ret = gnutls_x509_privkey_import2(p->key, &keypem,
	    GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN)) < 0) {
		snprintf(why, whylen, "%s.key.pem: %s", id->name,
		    gnutls_strerror(ret));
		goto out;
	}
	describe_key(p->key, p->keydesc, sizeof(p->keydesc));
	if (check_pair(id, p, why, whylen) == -1)
		goto out;
	rc = 0;
 out:
	for (i = 0; i < n; i++)
		if (list[i] != NULL)
			gnutls_x509_crt_deinit(list[i]);
	gnutls_free(list);
	if (keypem.data != NULL) {
		gnutls_memset(keypem.data, 0, keypem.size);
		free(keypem.data);
	}
	free(crtpem.data);
	if (rc == -1)
		pair_free(p);
	return rc;
}

/* The one log line: to the journal, to syslog or to stderr. */
static void
log_session(struct session *s)
{
	double ms = elapsed_ms(&s->start);

	if (s->result == NULL)
		s->result = "error";

	if (stderr_is_journal()) {
		sd_journal_send(
		    "MESSAGE=%s %s %s \"%s\" %.1fms", s->client, s->sni,
		    s->result, s->why, ms,
		    "PRIORITY=%d", s->rc == 0 ? 6 : 5,
		    "SYSLOG_IDENTIFIER=%s", PROG,
		    "ALPND_CLIENT=%s", s->client,
		    "ALPND_SNI=%s", s->sni,
		    "ALPND_RESULT=%s", s->result,
		    "ALPND_REASON=%s", s->why,
		    "ALPND_KEY=%s", s->keydesc[0] ? s->keydesc : "-",
		    "ALPND_DURATION_MS=%.3f", ms,
		    "ALPND_EXIT=%d", s->rc,
		    NULL);
		return;
	}
	/*
	 * Under inetd/xinetd fd 2 is the client's socket: never write the
	 * log line there, send it to syslog (as alpnd does).
	 */
	if (stderr_is_conn) {
		openlog(PROG, LOG_PID, LOG_DAEMON);
		syslog(s->rc == 0 ? LOG_INFO : LOG_NOTICE,
		    "%s %s %s \"%s\" %.1fms", s->client, s->sni,
		    s->result, s->why, ms);
		return;
	}
	fprintf(stderr, "%s[%ld]: %s %s %s \"%s\" %.1fms\n", PROG,
	    (long)getpid(), s->client, s->sni, s->result, s->why, ms);
}

static void
peer_name(int fd, char *buf, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	const char *env;

	/* The router may know better (it consumed a PROXY header). */
	if ((env = getenv("ALPND_CLIENT")) != NULL && *env != '\0') {
		log_escape(buf, len, (const uint8_t *)env, strnlen(env, 64));
		return;
	}
	if (getpeername(fd, (struct sockaddr *)&ss, &sl) == -1)
		sl = 0;
	fmt_sockaddr(buf, len, (struct sockaddr *)&ss, sl);
}

/*
 * The parser refused the ClientHello: decode_error, and for the log the
 * extension at fault (its type), if the fault lies in one.
 */
static int
refuse_malformed(struct session *s, const struct alpn_hello *hello)
{
	s->result = "tls_error";
	if (hello->bad_ext == 0)
		snprintf(s->why, sizeof(s->why),
		    "malformed server_name extension");
	else if (hello->bad_ext == 16)
		snprintf(s->why, sizeof(s->why), "malformed ALPN extension");
	else if (hello->bad_ext > 0)
		snprintf(s->why, sizeof(s->why), "malformed ClientHello "
		    "(extension %d)", hello->bad_ext);
	else
		snprintf(s->why, sizeof(s->why), "malformed ClientHello");
	s->alert = GNUTLS_A_DECODE_ERROR;
	return GNUTLS_E_UNEXPECTED_PACKET;
}

/*
 * Make id's pair the certificate this session serves, once: a second
 * ClientHello (after HelloRetryRequest) must name the same identifier.
 * On failure the reason is in s->why.
 */
static int
use_pair(struct session *s, const struct ident *id)
{
	struct pair p;
	int ret;

	if (s->loaded[0] != '\0') {
		if (strcmp(s->loaded, id->name) != 0) {
			snprintf(s->why, sizeof(s->why), "SNI changed in the "
			    "second ClientHello");
			return -1;
		}
		return 0;
	}
	if (s->dirfd == -1) {
		snprintf(s->why, sizeof(s->why), "certs directory %s: %s",
		    s->dir, strerror(s->dir_errno));
		return -1;
	}
	if (load_pair(s->dirfd, id, &p, s->why, sizeof(s->why)) == -1)
		return -1;
	snprintf(s->keydesc, sizeof(s->keydesc), "%s", p.keydesc);
	ret = gnutls_certificate_set_x509_key(s->cred, &p.crt, 1, p.key);
	pair_free(&p);
	if (ret < 0) {
		snprintf(s->why, sizeof(s->why), "GnuTLS refused the pair: %s",
		    gnutls_strerror(ret));
		return -1;
	}
	memcpy(s->loaded, id->name, id->len + 1);
	return 0;
}

/*
 * What alpnd-respond accepts, in the order checked (alpnd-respond.8 says
 * the same):
 *   1. a well-formed ClientHello by alpnparse's one definition (see
 *      alpnparse.h: the same rules alpnd routes by), else decode_error;
 *   2. "acme-tls/1" among its ALPN names, else no_application_protocol;
 *   3. an SNI host_name that ident_from_name() turns into a usable name
 *      (alpn_valid_hostname and friends: here, where the name becomes a
 *      file name, and nowhere else), for which a servable pair exists,
 *      and in a second ClientHello the same name; else unrecognized_name.
 * GnuTLS then enforces TLS 1.2+ and the ALPN choice itself.
 *
 * Called by GnuTLS with each ClientHello body before it processes it.
 * Nothing is ever served for a name that fails.
 */
static int
client_hello_hook(gnutls_session_t tls, unsigned htype, unsigned when,
    unsigned incoming, const gnutls_datum_t *msg)
{
	/* Large (reassembly space) and one connection per process. */
	static struct alpn_hello hello;
	struct session *s = gnutls_session_get_ptr(tls);
	struct ident id;

	if (htype != GNUTLS_HANDSHAKE_CLIENT_HELLO || when != GNUTLS_HOOK_PRE ||
	    !incoming)
		return 0;
	s->hook_failed = 1;
	snprintf(s->sni, sizeof(s->sni), "-");
	/*
	 * A hello the parser refuses is refused, never waved through: GnuTLS
	 * accepts some (legacy_version 0x0403 in a second ClientHello after
	 * HelloRetryRequest) that would then skip every check below.
	 */
	if (alpn_parse_hello_body(msg->data, msg->size, &hello) != ALPN_OK)
		return refuse_malformed(s, &hello);
	if (hello.sni != NULL)
		log_escape(s->sni, sizeof(s->sni), hello.sni, hello.sni_len);
	if (!hello.has_acme) {
		s->result = "no_acme_alpn";
		snprintf(s->why, sizeof(s->why), "client did not offer %s%s",
		    ALPN_ACME, hello.alpn != NULL ? "" :
		    " (no ALPN extension)");
		s->alert = GNUTLS_A_NO_APPLICATION_PROTOCOL;
		return GNUTLS_E_NO_APPLICATION_PROTOCOL;
	}
	s->result = "unrecognized_name";
	s->alert = GNUTLS_A_UNRECOGNIZED_NAME;
	if (hello.sni == NULL) {
		snprintf(s->why, sizeof(s->why), "no SNI host_name");
		return GNUTLS_E_UNRECOGNIZED_NAME;
	}
	if (ident_from_name(hello.sni, hello.sni_len, &id, s->why,
	    sizeof(s->why)) == -1 || use_pair(s, &id) == -1)
		return GNUTLS_E_UNRECOGNIZED_NAME;
	s->hook_failed = 0;
	s->alert = -1;
	s->result = NULL;
	s->why[0] = '\0';
	return 0;
}

/* Shut our side; read what the client still sends until EOF, briefly. */
static void
drain(int fd)
{
	struct timespec start;
	struct pollfd pfd;
	char buf[4096];
	size_t total = 0;
	ssize_t n;
	double left;

	clock_gettime(CLOCK_MONOTONIC, &start);
	shutdown(fd, SHUT_WR);
	while (total < DRAIN_MAX) {
		left = DRAIN_MS - elapsed_ms(&start);
		if (left <= 0)
			break;
		pfd.fd = fd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, (int)left + 1) <= 0)
			break;
		n = read(fd, buf, sizeof(buf));
		if (n <= 0)
			break;
		total += (size_t)n;
	}
}

/*
 * The handshake is done: let the client close first.  A validator closes
 * as soon as it has the certificate (close_notify, then FIN).  Had our
 * close_notify reached it before its close(2), it would lie unread there
 * and the client's kernel would answer with a reset instead of a FIN,
 * which an alpnd relaying the connection logs as "reset".  So a client
 * that speaks or closes within CLOSE_WAIT_MS gets our FIN only; one that
 * waits for the server gets close_notify then.
 */
static void
close_after_client(gnutls_session_t tls, int fd)
{
	struct pollfd pfd;

	pfd.fd = fd;
	pfd.events = POLLIN;
	if (poll(&pfd, 1, CLOSE_WAIT_MS) != 1)
		gnutls_bye(tls, GNUTLS_SHUT_WR);
	drain(fd);
}

static int
connection_fd(void)
{
	int n, fd, fl, one, type = 0, acc = 0;
	socklen_t sl;
	struct stat st;

	if ((fd = inherited_fd(&n)) == -1) {
		fprintf(stderr, "%s: LISTEN_FDS=%d, expected one connection\n",
		    PROG, n);
		return -1;
	}
	if (fstat(fd, &st) == -1 || !S_ISSOCK(st.st_mode)) {
		fprintf(stderr, "%s: fd %d is not a socket; run me from alpnd, "
		    "inetd or a socket unit with Accept=yes\n", PROG, fd);
		return -1;
	}
	sl = sizeof(type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &sl) == -1 ||
	    type != SOCK_STREAM) {
		fprintf(stderr, "%s: fd %d is not a stream socket\n", PROG, fd);
		return -1;
	}
	sl = sizeof(acc);
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &sl) == 0 && acc) {
		fprintf(stderr, "%s: fd %d is a listening socket; I serve one "
		    "accepted connection (Accept=yes)\n", PROG, fd);
		return -1;
	}
	/* Whatever peeked before us: blocking reads, no low-water mark. */
	if ((fl = fcntl(fd, F_GETFL)) != -1 && (fl & O_NONBLOCK))
		(void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
	one = 1;
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
	return fd;
}

/* SIGPIPE ignored; SIGALRM a backstop two seconds after the deadline. */
static void
set_signals(int timeout)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	/* Backstop only; pull_timeout() ends the handshake first. */
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	alarm((unsigned)timeout + 2);
}

/*
 * A GnuTLS server session on fd: TLS 1.2 and 1.3, no tickets, acme-tls/1
 * mandatory, the certificate chosen by client_hello_hook, the handshake
 * held to its absolute deadline by pull_timeout.
 */
static int
tls_setup(struct session *s, int fd, int timeout, gnutls_session_t *tls)
{
	static const gnutls_datum_t acme = {
		(unsigned char *)(uintptr_t)ALPN_ACME, sizeof(ALPN_ACME) - 1
	};
	int ret;

	if ((ret = gnutls_certificate_allocate_credentials(&s->cred)) < 0 ||
	    (ret = gnutls_init(tls, GNUTLS_SERVER | GNUTLS_NO_TICKETS |
	    GNUTLS_NO_SIGNAL)) < 0 ||
	    (ret = gnutls_priority_set_direct(*tls,
	    "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2", NULL)) < 0 ||
	    (ret = gnutls_credentials_set(*tls, GNUTLS_CRD_CERTIFICATE,
	    s->cred)) < 0 ||
	    (ret = gnutls_alpn_set_protocols(*tls, &acme, 1,
	    GNUTLS_ALPN_MANDATORY | GNUTLS_ALPN_SERVER_PRECEDENCE)) < 0) {
		s->result = "error";
		snprintf(s->why, sizeof(s->why), "GnuTLS setup: %s",
		    gnutls_strerror(ret));
		s->rc = EX_SOFTWARE;
		return -1;
	}
	gnutls_session_set_ptr(*tls, s);
	gnutls_handshake_set_hook_function(*tls,
	    GNUTLS_HANDSHAKE_CLIENT_HELLO, GNUTLS_HOOK_PRE, client_hello_hook);
	gnutls_transport_set_int(*tls, fd);
	hs_start = s->start;
	hs_limit_ms = timeout * 1000.0;
	gnutls_transport_set_pull_timeout_function(*tls, pull_timeout);
	gnutls_handshake_set_timeout(*tls, (unsigned)timeout * 1000);
	return 0;
}

/* A failed handshake, sorted into the log's RESULT and the exit status. */
static void
handshake_failed(struct session *s, gnutls_session_t tls, int ret,
    int timeout)
{
	if (s->hook_failed) {
		/* Our refusal: the reason is already in s->why. */
		if (s->alert >= 0)
			gnutls_alert_send(tls, GNUTLS_AL_FATAL,
			    (gnutls_alert_description_t)s->alert);
		s->rc = s->dirfd == -1 ? EX_UNAVAILABLE : EX_DATAERR;
	} else if (ret == GNUTLS_E_TIMEDOUT) {
		s->result = "timeout";
		snprintf(s->why, sizeof(s->why), "no complete handshake "
		    "within %ds", timeout);
		s->rc = EX_TEMPFAIL;
	} else if (ret == GNUTLS_E_PREMATURE_TERMINATION ||
	    ret == GNUTLS_E_PULL_ERROR || ret == GNUTLS_E_PUSH_ERROR) {
		s->result = "io_error";
		snprintf(s->why, sizeof(s->why), "%s", gnutls_strerror(ret));
		s->rc = EX_IOERR;
	} else {
		if (ret == GNUTLS_E_NO_APPLICATION_PROTOCOL)
			s->result = "no_acme_alpn";
		else
			s->result = "tls_error";
		if (ret == GNUTLS_E_WARNING_ALERT_RECEIVED ||
		    ret == GNUTLS_E_FATAL_ALERT_RECEIVED)
			snprintf(s->why, sizeof(s->why), "%s: %s",
			    gnutls_strerror(ret),
			    gnutls_alert_get_name(gnutls_alert_get(tls)));
		else
			snprintf(s->why, sizeof(s->why), "%s",
			    gnutls_strerror(ret));
		gnutls_alert_send_appropriate(tls, ret);
		s->rc = EX_DATAERR;
	}
}

/*
 * A completed handshake: it did agree on acme-tls/1 (belt and braces);
 * then, RFC 8737 section 3, no application data: close right away.
 */
static void
handshake_done(struct session *s, gnutls_session_t tls, int fd)
{
	gnutls_datum_t proto;

	if (gnutls_alpn_get_selected_protocol(tls, &proto) != 0 ||
	    proto.size != sizeof(ALPN_ACME) - 1 ||
	    memcmp(proto.data, ALPN_ACME, proto.size) != 0) {
		s->result = "no_acme_alpn";
		snprintf(s->why, sizeof(s->why), "handshake ended without %s",
		    ALPN_ACME);
		s->rc = EX_DATAERR;
		return;
	}
	s->result = "ok";
	snprintf(s->why, sizeof(s->why), "%s %s %s",
	    gnutls_protocol_get_name(gnutls_protocol_get_version(tls)),
	    gnutls_cipher_get_name(gnutls_cipher_get(tls)), s->keydesc);
	s->rc = EX_OK;
	close_after_client(tls, fd);
}

/* Serve the one inherited connection; log it; its exit status. */
static int
serve(const char *dir, int dirfd, int dir_errno, int timeout)
{
	struct session s;
	gnutls_session_t tls = NULL;
	int fd, ret;

	memset(&s, 0, sizeof(s));
	clock_gettime(CLOCK_MONOTONIC, &s.start);
	snprintf(s.sni, sizeof(s.sni), "-");
	s.dirfd = dirfd;
	s.dir_errno = dir_errno;
	s.dir = dir;
	s.alert = -1;
	s.rc = EX_SOFTWARE;
	if ((fd = connection_fd()) == -1)
		return EX_USAGE;
	peer_name(fd, s.client, sizeof(s.client));
	stderr_is_conn = same_file(STDERR_FILENO, fd);
	set_signals(timeout);

	if (tls_setup(&s, fd, timeout, &tls) == -1)
		goto out;
	do {
		ret = gnutls_handshake(tls);
	} while (ret < 0 && gnutls_error_is_fatal(ret) == 0);
	if (ret < 0)
		handshake_failed(&s, tls, ret, timeout);
	else
		handshake_done(&s, tls, fd);
 out:
	alarm(0);
	log_session(&s);
	if (tls != NULL)
		gnutls_deinit(tls);
	if (s.cred != NULL)
		gnutls_certificate_free_credentials(s.cred);
	close(fd);
	return s.rc;
}

static int
b64url_val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '-')
		return 62;
	if (c == '_')
		return 63;
	return -1;
}

/*
 * AUTH: the key authorization "token.thumbprint" (RFC 8555 8.1), hashed
 * here; or its SHA-256 already, as unpadded base64url (43 characters) or
 * hex (64 digits, optionally colon-separated pairs).
 */
static int
parse_auth(const char *auth, uint8_t *digest, char *why, size_t whylen)
{
	size_t len = strlen(auth), i, nd;
	uint32_t acc = 0;
	int bits = 0, v, hi, lo;

	if (strchr(auth, '.') != NULL) {
		const char *dot = strchr(auth, '.');

		if (len > 1024 || dot == auth || dot[1] == '\0' ||
		    strchr(dot + 1, '.') != NULL) {
			snprintf(why, whylen, "key authorization is not "
			    "token.thumbprint");
			return -1;
		}
		for (i = 0; i < len; i++)
			if (auth[i] != '.' && b64url_val(auth[i]) < 0) {
				snprintf(why, whylen, "key authorization has a "
				    "character outside base64url");
				return -1;
			}
		if (gnutls_hash_fast(GNUTLS_DIG_SHA256, auth, len, digest) < 0) {
			snprintf(why, whylen, "SHA-256 failed");
			return -1;
		}
		return 0;
	}
	if (len == 43) {
		nd = 0;
		for (i = 0; i < len; i++) {
			if ((v = b64url_val(auth[i])) < 0)
				goto hex;
			acc = (acc << 6) | (uint32_t)v;
			bits += 6;
			if (bits >= 8) {
				bits -= 8;
				digest[nd++] = (uint8_t)(acc >> bits);
			}
		}
		if ((acc & ((1u << bits) - 1)) != 0) {
			snprintf(why, whylen, "base64url digest is not "
			    "canonical");
			return -1;
		}
		return 0;
	}
 hex:
	nd = 0;
	for (i = 0; i < len;) {
		if (nd == DIGEST_LEN || (hi = alpn_hexval((uint8_t)auth[i])) < 0 ||
		    (lo = alpn_hexval((uint8_t)auth[i + 1])) < 0)
			goto bad;
		digest[nd++] = (uint8_t)(hi << 4 | lo);
		i += 2;
		if (auth[i] == ':' && auth[i + 1] != '\0')
			i++;
		else if (auth[i] != '\0' && (auth[i] == ':' ||
		    strchr(auth, ':') != NULL))
			goto bad;
	}
	if (nd == DIGEST_LEN)
		return 0;
 bad:
	snprintf(why, whylen, "AUTH is neither a key authorization nor a "
	    "SHA-256 digest (43 base64url characters or 64 hex digits)");
	return -1;
}

/*
 * Write d to a new dot-file in DIR (never a valid name), synced; its name
 * goes to tmp for the caller to rename or remove.
 */
static int
write_temp(int dirfd, const gnutls_datum_t *d, mode_t mode, gid_t gid,
    char *tmp, size_t tmplen)
{
	uint8_t rnd[8];
	size_t off = 0;
	ssize_t n;
	int fd, rc = -1;

	tmp[0] = '\0';
	if (gnutls_rnd(GNUTLS_RND_NONCE, rnd, sizeof(rnd)) < 0) {
		fprintf(stderr, "%s: no random bytes for a temporary name\n",
		    PROG);
		return -1;
	}
	snprintf(tmp, tmplen, ".%s.%02x%02x%02x%02x%02x%02x%02x%02x",
	    PROG, rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6],
	    rnd[7]);
	if ((fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC |
	    O_NOFOLLOW, 0600)) == -1) {
		fprintf(stderr, "%s: %s: %s\n", PROG, tmp, strerror(errno));
		tmp[0] = '\0';
		return -1;
	}
	/* Group: the directory's (the certs group), if we may; else ours. */
	if (gid != (gid_t)-1 && fchown(fd, (uid_t)-1, gid) == -1)
		fprintf(stderr, "%s: warning: cannot give %s the certificate "
		    "directory's group %ld: %s\n", PROG, tmp, (long)gid,
		    strerror(errno));
	if (fchmod(fd, mode) == -1) {
		fprintf(stderr, "%s: %s: chmod: %s\n", PROG, tmp,
		    strerror(errno));
		goto out;
	}
	while (off < d->size) {
		n = write(fd, d->data + off, d->size - off);
		if (n == -1 && errno == EINTR)
			continue;
		if (n == -1) {
			fprintf(stderr, "%s: %s: %s\n", PROG, tmp,
			    strerror(errno));
			goto out;
		}
		off += (size_t)n;
	}
	if (fsync(fd) == -1) {
		fprintf(stderr, "%s: %s: fsync: %s\n", PROG, tmp,
		    strerror(errno));
		goto out;
	}
	rc = 0;
 out:
	close(fd);
	return rc;
}

/*
 * A new ECDSA P-256 key and its self-signed challenge certificate for id
 * (RFC 8737 section 3), carrying digest in the critical acmeIdentifier
 * extension; both as PEM, for the caller to free.
 */
static int
generate_pair(const struct ident *id, const uint8_t *digest,
    gnutls_datum_t *keypem, gnutls_datum_t *crtpem)
{
	gnutls_x509_privkey_t key = NULL;
	gnutls_x509_crt_t crt = NULL;
	uint8_t der[2 + DIGEST_LEN], serial[16];
	const char *cn;
	time_t now = time(NULL);
	int ret, rc = -1;

	der[0] = 0x04;			/* OCTET STRING */
	der[1] = DIGEST_LEN;
	memcpy(der + 2, digest, DIGEST_LEN);
	if ((ret = gnutls_rnd(GNUTLS_RND_NONCE, serial, sizeof(serial))) < 0)
		goto out;
	/* A positive INTEGER with a minimal DER encoding. */
	serial[0] = (uint8_t)((serial[0] & 0x7f) | 0x40);
	cn = id->len <= 64 ? id->name : "acme-tls/1 challenge";
	if ((ret = gnutls_x509_privkey_init(&key)) < 0 ||
	    (ret = gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA,
	    GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0)) < 0 ||
	    (ret = gnutls_x509_crt_init(&crt)) < 0 ||
	    (ret = gnutls_x509_crt_set_version(crt, 3)) < 0 ||
	    (ret = gnutls_x509_crt_set_serial(crt, serial,
	    sizeof(serial))) < 0 ||
	    (ret = gnutls_x509_crt_set_activation_time(crt, now - 3600)) < 0 ||
	    (ret = gnutls_x509_crt_set_expiration_time(crt,
	    now + CHALLENGE_DAYS * 86400)) < 0 ||
	    (ret = gnutls_x509_crt_set_dn_by_oid(crt,
	    GNUTLS_OID_X520_COMMON_NAME, 0, cn, (unsigned)strlen(cn))) < 0 ||
	    (ret = gnutls_x509_crt_set_key(crt, key)) < 0 ||
	    (ret = gnutls_x509_crt_set_subject_alt_name(crt,
	    id->is_ip ? GNUTLS_SAN_IPADDRESS : GNUTLS_SAN_DNSNAME,
	    id->is_ip ? (const void *)id->ip : (const void *)id->name,
	    id->is_ip ? (unsigned)id->ip_len : (unsigned)id->len,
	    GNUTLS_FSAN_SET)) < 0 ||
	    (ret = gnutls_x509_crt_set_basic_constraints(crt, 0, -1)) < 0 ||
	    (ret = gnutls_x509_crt_set_key_usage(crt,
	    GNUTLS_KEY_DIGITAL_SIGNATURE)) < 0 ||
	    (ret = gnutls_x509_crt_set_extension_by_oid(crt, ACME_OID, der,
	    sizeof(der), 1)) < 0 ||
	    (ret = gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256,
	    0)) < 0 ||
	    (ret = gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM,
	    NULL, GNUTLS_PKCS_PLAIN, keypem)) < 0 ||
	    (ret = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM,
	    crtpem)) < 0)
		goto out;
	rc = 0;
 out:
	if (rc == -1)
		fprintf(stderr, "%s: making the certificate: %s\n", PROG,
		    gnutls_strerror(ret));
	if (crt != NULL)
		gnutls_x509_crt_deinit(crt);
	if (key != NULL)
		gnutls_x509_privkey_deinit(key);
	return rc;
}

/*
 * Put id's new pair in place: both files complete on disk before either
 * is renamed into place, under a lock against a concurrent --make or
 * --clean; key first, and if the certificate cannot follow, no new key
 * stays beside an old certificate.  (A validation between the two renames
 * sees a mismatch and refuses: never a wrong pair.)  Files get the
 * directory's group gid.
 */
static int
install_pair(int dirfd, const struct ident *id, gid_t gid,
    const gnutls_datum_t *keypem, const gnutls_datum_t *crtpem)
{
	char kname[NAME_LEN + 16], cname[NAME_LEN + 16];
	char ktmp[64] = "", ctmp[64] = "";
	int rc = EX_IOERR;

	if (flock(dirfd, LOCK_EX) == -1)
		fprintf(stderr, "%s: warning: lock certs directory: %s\n", PROG,
		    strerror(errno));
	if (write_temp(dirfd, keypem, 0640, gid, ktmp, sizeof(ktmp)) == -1 ||
	    write_temp(dirfd, crtpem, 0644, gid, ctmp, sizeof(ctmp)) == -1)
		goto out;
	snprintf(kname, sizeof(kname), "%s.key.pem", id->name);
	if (renameat(dirfd, ktmp, dirfd, kname) == -1) {
		fprintf(stderr, "%s: rename %s: %s\n", PROG, kname,
		    strerror(errno));
		goto out;
	}
	ktmp[0] = '\0';
	snprintf(cname, sizeof(cname), "%s.crt.pem", id->name);
	if (renameat(dirfd, ctmp, dirfd, cname) == -1) {
		fprintf(stderr, "%s: rename %s: %s\n", PROG, cname,
		    strerror(errno));
		(void)unlinkat(dirfd, kname, 0);
		goto out;
	}
	ctmp[0] = '\0';
	if (fsync(dirfd) == -1 && errno != EINVAL)
		fprintf(stderr, "%s: fsync certs directory: %s\n", PROG,
		    strerror(errno));
	rc = EX_OK;
 out:
	if (ktmp[0] != '\0')
		(void)unlinkat(dirfd, ktmp, 0);
	if (ctmp[0] != '\0')
		(void)unlinkat(dirfd, ctmp, 0);
	return rc;
}

/* --make NAME AUTH: write NAME's challenge pair for the digest of AUTH. */
static int
make_pair(int dirfd, const char *name, const char *auth)
{
	gnutls_datum_t keypem = { NULL, 0 }, crtpem = { NULL, 0 };
	uint8_t digest[DIGEST_LEN];
	char why[WHY_LEN];
	struct ident id;
	struct stat st;
	int rc = EX_SOFTWARE;

	if (ident_from_arg(name, &id, why, sizeof(why)) == -1) {
		fprintf(stderr, "%s: %s: %s\n", PROG, name, why);
		return EX_DATAERR;
	}
	if (id.len + sizeof(".crt.pem") > NAME_MAX + 1) {
		fprintf(stderr, "%s: %s: too long for a file name (at most %zu "
		    "bytes)\n", PROG, id.name, NAME_MAX + 1 - sizeof(".crt.pem"));
		return EX_DATAERR;
	}
	if (parse_auth(auth, digest, why, sizeof(why)) == -1) {
		fprintf(stderr, "%s: %s\n", PROG, why);
		return EX_DATAERR;
	}
	if (fstat(dirfd, &st) == -1) {
		fprintf(stderr, "%s: certs directory: %s\n", PROG,
		    strerror(errno));
		return EX_IOERR;
	}
	if (generate_pair(&id, digest, &keypem, &crtpem) == 0)
		rc = install_pair(dirfd, &id, st.st_gid, &keypem, &crtpem);
	if (keypem.data != NULL) {
		gnutls_memset(keypem.data, 0, keypem.size);
		gnutls_free(keypem.data);
	}
	gnutls_free(crtpem.data);
	return rc;
}

/* --clean NAME: remove NAME's pair; files already gone are no error. */
static int
remove_pair(int dirfd, const char *name)
{
	char why[WHY_LEN], fname[NAME_LEN + 16];
	static const char *const sfx[] = { ".crt.pem", ".key.pem" };
	struct ident id;
	size_t i;
	int rc = EX_OK;

	if (ident_from_arg(name, &id, why, sizeof(why)) == -1) {
		fprintf(stderr, "%s: %s: %s\n", PROG, name, why);
		return EX_DATAERR;
	}
	/* The lock --make holds: never half of a pair being written. */
	if (flock(dirfd, LOCK_EX) == -1)
		fprintf(stderr, "%s: warning: lock certs directory: %s\n", PROG,
		    strerror(errno));
	for (i = 0; i < 2; i++) {
		snprintf(fname, sizeof(fname), "%s%s", id.name, sfx[i]);
		if (unlinkat(dirfd, fname, 0) == -1 && errno != ENOENT) {
			fprintf(stderr, "%s: %s: %s\n", PROG, fname,
			    strerror(errno));
			rc = EX_IOERR;
		}
	}
	return rc;
}

/* --check NAME: say whether NAME's pair would be served, and why not. */
static int
check_served(int dirfd, const char *name)
{
	char why[WHY_LEN], hex[2 * DIGEST_LEN + 1];
	struct ident id;
	struct pair p;
	size_t i;

	if (ident_from_arg(name, &id, why, sizeof(why)) == -1) {
		printf("%s: not served: %s\n", name, why);
		return EX_DATAERR;
	}
	if (load_pair(dirfd, &id, &p, why, sizeof(why)) == -1) {
		printf("%s: not served: %s\n", id.name, why);
		return EX_DATAERR;
	}
	for (i = 0; i < DIGEST_LEN; i++)
		snprintf(hex + 2 * i, 3, "%02x", p.digest[i]);
	printf("%s: ok: %s, %s %s, acmeIdentifier %s\n", id.name, p.keydesc,
	    id.is_ip ? "iPAddress for" : "dNSName", id.name, hex);
	pair_free(&p);
	return EX_OK;
}

static void
parse_options(int argc, char *argv[], struct options *o)
{
	static const struct option longopts[] = {
		{ "certs",		required_argument,	NULL, 'd' },
		{ "hello-timeout",	required_argument,	NULL, 't' },
		{ "make",		no_argument,		NULL, 'm' },
		{ "clean",		no_argument,		NULL, 'c' },
		{ "check",		no_argument,		NULL, 'k' },
		{ "version",		no_argument,		NULL, 'V' },
		{ "help",		no_argument,		NULL, 'h' },
		{ NULL,			0,			NULL, 0 }
	};
	char *end;
	int ch;

	memset(o, 0, sizeof(*o));
	o->timeout = 10;
	while ((ch = getopt_long(argc, argv, "+d:t:Vh", longopts, NULL)) != -1) {
		switch (ch) {
		case 'd':
			o->dir = optarg;
			break;
		case 't':
			errno = 0;
			o->timeout = strtol(optarg, &end, 10);
			if (errno != 0 || end == optarg || *end != '\0' ||
			    o->timeout < 1 || o->timeout > HELLO_TIMEOUT_MAX) {
				fprintf(stderr, "%s: --hello-timeout: 1..%d "
				    "seconds\n", PROG, HELLO_TIMEOUT_MAX);
				exit(EX_USAGE);
			}
			break;
		case 'm':
		case 'c':
		case 'k':
			if (o->mode != 0)
				usage();
			o->mode = ch;
			break;
		case 'V':
			printf("%s %s\n", PROG, ALPND_VERSION);
			exit(EX_OK);
		case 'h':
		default:
			usage();
		}
	}
	argc -= optind;
	o->args = argv + optind;
	if (o->dir == NULL)
		usage();
	if ((o->mode == 'm' && argc != 2) || ((o->mode == 'c' ||
	    o->mode == 'k') && argc != 1) || (o->mode == 0 && argc != 0))
		usage();
}

int
main(int argc, char *argv[])
{
	struct options o;
	int dirfd, rc;

	parse_options(argc, argv, &o);
	if ((dirfd = open(o.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) == -1) {
		/*
		 * Serving, still answer (unrecognized_name) and log it where
		 * connection lines go: stderr may be the client (inetd).
		 */
		if (o.mode == 0)
			return serve(o.dir, -1, errno, (int)o.timeout);
		fprintf(stderr, "%s: %s: %s\n", PROG, o.dir, strerror(errno));
		return EX_UNAVAILABLE;
	}
	switch (o.mode) {
	case 'm':
		rc = make_pair(dirfd, o.args[0], o.args[1]);
		break;
	case 'c':
		rc = remove_pair(dirfd, o.args[0]);
		break;
	case 'k':
		rc = check_served(dirfd, o.args[0]);
		break;
	default:
		rc = serve(o.dir, dirfd, 0, (int)o.timeout);
		break;
	}
	close(dirfd);
	return rc;
}
