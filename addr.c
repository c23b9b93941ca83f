/*
 * addr.c - backend addresses (ADDR on the command line): parsed at start,
 * names resolved once and cached; printable forms of socket addresses.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/socket.h>
#include <sys/un.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sysexits.h>

#include "router.h"

struct addr	 fallback_addr, acme_addr;

/*
 * ADDR: 192.0.2.1:8443, [2001:db8::1]:8443, name:8443, unix:/path
 * (unix:@name for the abstract namespace).
 */
void
parse_addr(struct addr *a, const char *spec)
{
	struct sockaddr_in *sin;
	struct sockaddr_in6 *sin6;
	struct sockaddr_un *sun;
	const char *colon, *host, *p;
	char hbuf[256];
	size_t hlen, plen;
	long port;
	char *end;

	memset(a, 0, sizeof(*a));
	a->spec = spec;
	a->ss = &a->one;
	a->len = &a->onelen;
	a->n = 1;
	a->resolved = 1;

	if (strncmp(spec, "unix:", 5) == 0) {
		p = spec + 5;
		plen = strlen(p);
		sun = (struct sockaddr_un *)a->ss;
		if (plen == 0 || plen >= sizeof(sun->sun_path))
			die(EX_USAGE, "%s: bad unix socket path", spec);
		sun->sun_family = AF_UNIX;
		memcpy(sun->sun_path, p, plen);
		if (p[0] == '@') {
			sun->sun_path[0] = '\0';
			a->len[0] = offsetof(struct sockaddr_un, sun_path) + plen;
		} else
			a->len[0] = sizeof(*sun);
		return;
	}

	if (spec[0] == '[') {
		if ((p = strchr(spec, ']')) == NULL || p[1] != ':')
			die(EX_USAGE, "%s: expected [IPv6]:port", spec);
		host = spec + 1;
		hlen = p - host;
		colon = p + 1;
	} else {
		if ((colon = strrchr(spec, ':')) == NULL)
			die(EX_USAGE, "%s: expected host:port or unix:/path",
			    spec);
		host = spec;
		hlen = colon - spec;
		if (memchr(host, ':', hlen) != NULL)
			die(EX_USAGE, "%s: put IPv6 addresses in brackets", spec);
	}
	errno = 0;
	port = strtol(colon + 1, &end, 10);
	if (colon[1] == '\0' || *end != '\0' || errno || port < 1 ||
	    port > 65535)
		die(EX_USAGE, "%s: bad port", spec);
	if (hlen == 0 || hlen >= sizeof(hbuf) || hlen >= sizeof(a->host))
		die(EX_USAGE, "%s: bad host", spec);
	memcpy(hbuf, host, hlen);
	hbuf[hlen] = '\0';
	snprintf(a->port, sizeof(a->port), "%ld", port);

	sin = (struct sockaddr_in *)a->ss;
	sin6 = (struct sockaddr_in6 *)a->ss;
	if (spec[0] != '[' && inet_pton(AF_INET, hbuf, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		a->len[0] = sizeof(*sin);
	} else if (spec[0] == '[') {
		if (inet_pton(AF_INET6, hbuf, &sin6->sin6_addr) != 1)
			die(EX_USAGE, "%s: bad IPv6 address", spec);
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		a->len[0] = sizeof(*sin6);
	} else {
		/* A name: resolved when first needed, every address tried. */
		memcpy(a->host, hbuf, hlen + 1);
		a->resolved = 0;
		a->n = 0;
	}
}

int
resolve(struct addr *a)
{
	struct addrinfo hints, *res, *ai;
	size_t n;
	int e;

	if (a->resolved)
		return 0;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	if ((e = getaddrinfo(a->host, a->port, &hints, &res)) != 0) {
		logmsg(LOG_ERR, "%s: %s", a->spec, gai_strerror(e));
		return -1;
	}
	for (n = 0, ai = res; ai; ai = ai->ai_next)
		n++;
	a->ss = calloc(n, sizeof(*a->ss));
	a->len = calloc(n, sizeof(*a->len));
	if (a->ss == NULL || a->len == NULL) {
		freeaddrinfo(res);
		logmsg(LOG_ERR, "out of memory");
		return -1;
	}
	for (n = 0, ai = res; ai; ai = ai->ai_next) {
		if (ai->ai_addrlen > sizeof(*a->ss))
			continue;
		memcpy(&a->ss[n], ai->ai_addr, ai->ai_addrlen);
		a->len[n++] = ai->ai_addrlen;
	}
	freeaddrinfo(res);
	a->n = n;
	a->resolved = 1;	/* cached for the life of the process */
	return 0;
}
