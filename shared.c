/*
 * shared.c - what alpnd and alpnd-respond both need: untrusted text made
 * safe for a log line, socket addresses in print, where stderr goes, and
 * which descriptor is the connection.  libc only.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/stat.h>
#include <sys/socket.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shared.h"

/*
 * Untrusted bytes for a log line: printable ASCII as is; space, '"', '\',
 * ',' (alpnd's ALPN list separator) and everything else as \xNN, so one
 * field stays one field and nothing forges a line.  Stops, NUL-terminated,
 * where the next character would not fit.  Returns the length written.
 */
size_t
log_escape(char *dst, size_t sz, const uint8_t *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	size_t i, o = 0;

	if (sz == 0)
		return 0;
	for (i = 0; i < len; i++) {
		uint8_t c = s[i];

		if (c > 0x20 && c < 0x7f && c != '"' && c != '\\' && c != ',') {
			if (o + 1 >= sz)
				break;
			dst[o++] = (char)c;
		} else {
			if (o + 4 >= sz)
				break;
			dst[o++] = '\\';
			dst[o++] = 'x';
			dst[o++] = hex[c >> 4];
			dst[o++] = hex[c & 0xf];
		}
	}
	dst[o] = '\0';
	return o;
}

/* 192.0.2.1:443, [2001:db8::1]:443 (IPv4-mapped shown as IPv4), unix, -. */
void
fmt_sockaddr(char *buf, size_t sz, const struct sockaddr *sa, socklen_t len)
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
	char h[INET6_ADDRSTRLEN];

	if (len == 0 || sa->sa_family == AF_UNSPEC) {
		snprintf(buf, sz, "-");
	} else if (sa->sa_family == AF_INET) {
		inet_ntop(AF_INET, &sin->sin_addr, h, sizeof(h));
		snprintf(buf, sz, "%s:%u", h, ntohs(sin->sin_port));
	} else if (sa->sa_family == AF_INET6 &&
	    IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
		inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], h, sizeof(h));
		snprintf(buf, sz, "%s:%u", h, ntohs(sin6->sin6_port));
	} else if (sa->sa_family == AF_INET6) {
		inet_ntop(AF_INET6, &sin6->sin6_addr, h, sizeof(h));
		snprintf(buf, sz, "[%s]:%u", h, ntohs(sin6->sin6_port));
	} else if (sa->sa_family == AF_UNIX)
		snprintf(buf, sz, "unix");
	else
		snprintf(buf, sz, "af%d", sa->sa_family);
}

/* Are the two descriptors the same file (say, stderr and the client)? */
int
same_file(int a, int b)
{
	struct stat sa, sb;

	return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 &&
	    sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* systemd.exec(5): JOURNAL_STREAM=dev:ino names stderr if it still matches. */
int
stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	return js != NULL && sscanf(js, "%llu:%llu", &dev, &ino) == 2 &&
	    fstat(STDERR_FILENO, &st) == 0 &&
	    (unsigned long long)st.st_dev == dev &&
	    (unsigned long long)st.st_ino == ino;
}

/*
 * The descriptor a service manager handed over: 3 with LISTEN_FDS=1 for
 * this process (sd_listen_fds(3)), else 0 (inetd, tcpserver, systemd
 * StandardInput=socket).  -1 when LISTEN_FDS names this process but not
 * exactly one descriptor (*n then says how many).
 */
int
inherited_fd(int *n)
{
	const char *fds = getenv("LISTEN_FDS"), *pid = getenv("LISTEN_PID");

	*n = 0;
	if (fds == NULL || pid == NULL || strtol(pid, NULL, 10) != getpid())
		return STDIN_FILENO;
	*n = atoi(fds);
	return *n == 1 ? 3 : -1;
}
