/*
 * alpnd - route a connection on port 443 by its TLS ClientHello.
 *
 * Runs once per connection (inetd, tcpserver, systemd Accept=yes: the
 * connection is fd 0 or the one LISTEN_FDS descriptor) or, when that
 * descriptor is a listening socket, accepts and serves connections itself
 * until idle (systemd Accept=no).  Every connection goes through the same
 * state machine: [PROXY header] -> peek the ClientHello -> route:
 *   acme-tls/1 with --certs	execve alpnd-respond on the connection
 *   acme-tls/1 with --acme	splice relay to that address
 *   everything else		splice relay to --fallback
 * The ClientHello is only peeked (MSG_PEEK): it stays in the socket buffer
 * for whoever handles the connection next.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "alpnparse.h"
#include "sources.h"

#ifndef ALPND_VERSION
#define ALPND_VERSION		"unknown"
#endif
#ifndef ALPND_RESPOND_PATH
#define ALPND_RESPOND_PATH	"/usr/local/sbin/alpnd-respond"
#endif

#ifndef PIPE_SIZE
#define PIPE_SIZE	(256 * 1024)	/* asked for with F_SETPIPE_SZ */
#endif
#define MAX_EVENTS	64
#define ACCEPT_BATCH	64
#define SEC		1000000LL	/* times are in microseconds */
#define RETRY_US	(10 * 1000)	/* a backend's full accept queue: try again */

extern char **environ;

enum state {
	S_PROXY,	/* waiting for the PROXY protocol header */
	S_HELLO,	/* peeking the ClientHello */
	S_CONNECT,	/* backend connect(2) in progress */
	S_RELAY,	/* splicing both ways */
	S_DEAD		/* finished, freed after the current event batch */
};

enum route {
	R_NONE,
	R_RESPOND,
	R_ACME,
	R_FALLBACK
};

static const char *const route_name[] = { "-", "respond", "acme", "fallback" };

struct addr {
	const char		*spec;		/* as given on the command line */
	char			 host[256];	/* a name to resolve, or "" */
	char			 port[8];
	int			 resolved;
	size_t			 n;
	struct sockaddr_storage	*ss;		/* n addresses */
	socklen_t		*len;
	struct sockaddr_storage	 one;		/* a literal needs no malloc */
	socklen_t		 onelen;
};

struct queue;

/* One direction of a relay: src -> pipe -> dst. */
struct dir {
	int		 p[2];		/* pipe: [0] read end, [1] write end */
	size_t		 cap;		/* pipe capacity asked for */
	size_t		 inpipe;	/* bytes sitting in the pipe */
	uint64_t	 total;
	int		 eof;		/* src said EOF */
	int		 urg;		/* src got urgent data (EPOLLPRI) */
	int		 shut;		/* shutdown(dst, SHUT_WR) done */
};

struct conn {
	struct conn	*prev, *next;	/* in the queue of its state */
	struct conn	*again;		/* on the list of relays to resume */
	int		 queued;	/* on that list */
	struct queue	*q;
	enum state	 state;
	enum route	 route;
	int		 cfd, bfd;
	int		 lowat;		/* SO_RCVLOWAT raised on cfd */
	int		 nonblock;	/* O_NONBLOCK set on cfd by us */
	int		 registered;	/* cfd is in the epoll set */
	int		 bregistered;	/* bfd is in the epoll set */
	int64_t		 t0, deadline, active;
	struct addr	*dst;
	size_t		 ai;		/* address of dst being tried */
	int64_t		 connect_by;	/* a busy backend is retried until then */
	int		 cerr;		/* last connect error */
	struct dir	 up, dn;	/* client->backend, backend->client */
	struct sockaddr_storage peer;
	socklen_t	 peerlen;
	struct source	*src;		/* its client address, --max-per-source */
	struct alpn_proxy px;
	int		 have_px;	/* px holds a TCP4/TCP6 client */
	char		 sni[256];
	char		 alpn[128];
	int		 code;
	char		 result[96];
};

struct queue {
	struct conn	*head, *tail;
	int64_t		 timeout;	/* deadline = entry time + timeout */
};

/* Options. */
static struct addr	 fallback, acme;
static int		 have_acme;
static char		 default_respond[] = ALPND_RESPOND_PATH;
static char		*certs;
static char		*respond_path = default_respond;
static int		 accept_proxy;
static int		 send_proxy;	/* to the fallback: 0, 1 or 2 */
static int		 acme_send_proxy;	/* to --acme: 0, 1 or 2 */
static int64_t		 hello_timeout = 10 * SEC;
static int64_t		 idle_timeout;	/* 0: none */
static int64_t		 exit_idle = -1;	/* -1: never */
static int64_t		 drain = 30 * SEC;	/* stop: relays may finish */
static pid_t		 reload_pid;	/* --reload PID */
static size_t		 max_conn;	/* 0: from the descriptor limit */
static unsigned		 max_per_source = 256;	/* 0: no limit */
static int		 verbose;	/* -1 quiet, 0, 1 verbose */

/* State. */
static int		 ep = -1;
static int		 lfd = -1;	/* listening socket, listening mode */
static int		 sfd = -1;	/* signalfd: SIGCHLD, SIGTERM, SIGINT, SIGHUP */
static int		 listening;
static int		 use_syslog, use_journal;
static int		 grow_pipes = PIPE_SIZE > 65536;
static size_t		 nconn;
static struct queue	 q_hello, q_connect, q_retry, q_relay;
static struct conn	*dead;		/* freed after each event batch */
static struct conn	*again;		/* relays that stopped on their budget */
static int		 exit_code = EX_OK;
static int		 single_done;
static int		 listen_paused;
static int64_t		 resume_at;
static pid_t		 mypid;
static enum {
	RUNNING,
	STOPPING,	/* SIGTERM: no new connections, relays end by drain_at */
	REPLACED	/* reloaded: this copy only finishes its relays */
}			 run_state;
static int64_t		 drain_at;
static int		 reserve_fd = -1;	/* given up to shed a client on EMFILE */
/* Connections closed at once for a bound, logged once per SUMMARY_US. */
static struct {
	unsigned long	 total, source, fds;
	int64_t		 log_at;	/* 0: nothing to say */
} over;
#define SUMMARY_US	(10 * SEC)
static char		 self_path[4096];	/* the binary a reload executes */
static char		**self_argv;

/* Free pipes, kept in listening mode for the next connection. */
struct spare {
	int		 p[2];
	size_t		 cap;
};
static struct spare	 spares[64];
static size_t		 nspares;

static uint8_t		 peekbuf[ALPN_WIRE_MAX];
static struct alpn_hello hello;

static char		 listener_tag, signal_tag;

static void	usage(int) __attribute__((noreturn));
static void	logmsg(int, const char *, ...)
		    __attribute__((format(printf, 2, 3)));
static void	finish(struct conn *, int, const char *, ...)
		    __attribute__((format(printf, 3, 4)));
static void	hello_step(struct conn *, uint32_t);
static void	start_connect(struct conn *);
static void	connect_step(struct conn *);
static void	start_relay(struct conn *);
static void	relay_step(struct conn *);
static void	relay_done(struct conn *, int, int, int);
static void	peer_addr(struct conn *);

static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * SEC + ts.tv_nsec / 1000;
}

static void
usage(int code)
{
	FILE *f = code == 0 ? stdout : stderr;

	fputs("usage: alpnd [options] --fallback ADDR (--certs DIR | --acme ADDR)\n"
	    "  -f, --fallback ADDR       where everything that is not acme-tls/1 goes\n"
	    "  -d, --certs DIR           answer acme-tls/1 with alpnd-respond from DIR\n"
	    "  -a, --acme ADDR           relay acme-tls/1 to an ACME client's own TLS listener\n"
	    "  -p, --accept-proxy        expect a PROXY protocol v1 or v2 header first\n"
	    "  -P, --send-proxy v1|v2    send a PROXY header to the fallback first\n"
	    "  -A, --acme-send-proxy v1|v2  send a PROXY header to --acme ADDR first\n"
	    "  -t, --hello-timeout SECS  deadline for the whole ClientHello, and for\n"
	    "                            each backend connect (default 10)\n"
	    "  -i, --idle-timeout SECS   close a relay idle this long (default: none)\n"
	    "  -r, --respond PATH        the responder (default " ALPND_RESPOND_PATH ")\n"
	    "  -x, --exit-idle SECS      listening-socket mode: exit after SECS with no connection\n"
	    "  -D, --drain SECS          listening-socket mode: on SIGTERM, let relays finish\n"
	    "                            this long (default 30)\n"
	    "  -m, --max-conn N          listening-socket mode: connections held at once\n"
	    "                            (default: what the descriptor limit allows)\n"
	    "  -s, --max-per-source N    listening-socket mode: connections held per client\n"
	    "                            address (default 256, 0: no limit)\n"
	    "  -R, --reload PID          have the alpnd PID (listening-socket mode) run again\n"
	    "                            with the options that follow, relays untouched\n"
	    "  -v, --verbose / -q, --quiet / -V, --version / -h, --help\n"
	    "ADDR: 192.0.2.1:8443, [2001:db8::1]:8443, localhost:8443, unix:/run/https.sock\n"
	    "The connection is fd 0 (inetd, tcpserver) or the LISTEN_FDS descriptor\n"
	    "(systemd); a listening socket there means listening-socket mode.\n", f);
	exit(code);
}

/*
 * Diagnostics go to stderr, one write(2) per line, or to syslog when stderr
 * is the client's socket (inetd without a separate error stream).
 */
static void
vlogmsg(int pri, const char *fmt, va_list ap)
{
	char buf[1024];
	int n, m;

	if (use_syslog) {
		vsyslog(pri, fmt, ap);
		return;
	}
	if (use_journal)	/* sd-daemon(3) priority prefix */
		n = snprintf(buf, sizeof(buf), "<%d>", pri);
	else
		n = snprintf(buf, sizeof(buf), "alpnd[%ld]: ", (long)mypid);
	m = vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	if (m < 0)
		return;
	n += (size_t)m >= sizeof(buf) - n - 1 ? (int)(sizeof(buf) - n - 2) : m;
	buf[n++] = '\n';
	if (write(STDERR_FILENO, buf, n) == -1)
		return;	/* nowhere left to complain */
}

static void
logmsg(int pri, const char *fmt, ...)
{
	va_list ap;

	if (pri == LOG_DEBUG && verbose < 1)
		return;
	va_start(ap, fmt);
	vlogmsg(pri, fmt, ap);
	va_end(ap);
}

static void
die(int code, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 2, 3)));

static void
die(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (use_syslog || use_journal)	/* log_setup() chose: keep to it */
		vlogmsg(LOG_ERR, fmt, ap);
	else {
		fputs("alpnd: ", stderr);
		vfprintf(stderr, fmt, ap);
		fputc('\n', stderr);
	}
	va_end(ap);
	exit(code);
}

/* Queues: FIFO by deadline, since every queue has one fixed timeout. */
static void
q_remove(struct conn *c)
{
	struct queue *q = c->q;

	if (q == NULL)
		return;
	if (c->prev)
		c->prev->next = c->next;
	else
		q->head = c->next;
	if (c->next)
		c->next->prev = c->prev;
	else
		q->tail = c->prev;
	c->prev = c->next = NULL;
	c->q = NULL;
}

static void
q_append(struct queue *q, struct conn *c, int64_t now)
{
	q_remove(c);
	c->q = q;
	c->deadline = q->timeout > 0 ? now + q->timeout : 0;
	c->prev = q->tail;
	c->next = NULL;
	if (q->tail)
		q->tail->next = c;
	else
		q->head = c;
	q->tail = c;
}

/*
 * ADDR: 192.0.2.1:8443, [2001:db8::1]:8443, name:8443, unix:/path
 * (unix:@name for the abstract namespace).
 */
static void
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

static int
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

static int
proxy_version(const char *s, const char *opt)
{
	if (strcmp(s, "v1") == 0 || strcmp(s, "1") == 0)
		return 1;
	if (strcmp(s, "v2") == 0 || strcmp(s, "2") == 0)
		return 2;
	die(EX_USAGE, "%s %s: expected v1 or v2", opt, s);
}

static size_t
parse_count(const char *s, const char *opt, unsigned long min)
{
	unsigned long v;
	char *end;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (*s < '0' || *s > '9' || *end != '\0' || errno || v < min ||
	    v > 1000000000UL)
		die(EX_USAGE, "%s %s: expected a number", opt, s);
	return v;
}

static int64_t
parse_secs(const char *s, const char *opt, int zero_ok)
{
	char *end;
	double d;

	errno = 0;
	d = strtod(s, &end);
	if (*s == '\0' || *end != '\0' || errno || !isfinite(d) || d < 0 ||
	    (d == 0 && !zero_ok) || d > 1e7)
		die(EX_USAGE, "%s %s: expected a number of seconds", opt, s);
	return (int64_t)(d * SEC);
}

/* Printable form of an address, IPv4-mapped IPv6 shown as IPv4. */
static void
fmt_addr(char *buf, size_t sz, const struct sockaddr *sa, socklen_t len)
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
	char h[INET6_ADDRSTRLEN];

	if (len == 0 || sa->sa_family == AF_UNSPEC) {
		snprintf(buf, sz, "-");
	} else if (sa->sa_family == AF_INET) {
		inet_ntop(AF_INET, &sin->sin_addr, h, sizeof(h));
		snprintf(buf, sz, "%s:%u", h, ntohs(sin->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
			inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], h,
			    sizeof(h));
			snprintf(buf, sz, "%s:%u", h, ntohs(sin6->sin6_port));
		} else {
			inet_ntop(AF_INET6, &sin6->sin6_addr, h, sizeof(h));
			snprintf(buf, sz, "[%s]:%u", h, ntohs(sin6->sin6_port));
		}
	} else if (sa->sa_family == AF_UNIX) {
		snprintf(buf, sz, "unix");
	} else
		snprintf(buf, sz, "af%d", sa->sa_family);
}

static void
client_name(struct conn *c, char *buf, size_t sz)
{
	char h[INET6_ADDRSTRLEN];

	if (c->have_px) {
		if (c->px.family == ALPN_PROXY_TCP4) {
			inet_ntop(AF_INET, c->px.src, h, sizeof(h));
			snprintf(buf, sz, "%s:%u", h, c->px.sport);
		} else {
			inet_ntop(AF_INET6, c->px.src, h, sizeof(h));
			snprintf(buf, sz, "[%s]:%u", h, c->px.sport);
		}
		return;
	}
	peer_addr(c);
	fmt_addr(buf, sz, (struct sockaddr *)&c->peer, c->peerlen);
}

/* Copy an untrusted name for the log: printable, no spaces or commas. */
static size_t
clean(char *dst, size_t sz, const uint8_t *s, size_t len)
{
	size_t i;

	for (i = 0; i < len && i + 1 < sz; i++)
		dst[i] = (s[i] > 0x20 && s[i] < 0x7f && s[i] != ',') ?
		    (char)s[i] : '?';
	dst[i] = '\0';
	return i;
}

static void
log_conn(struct conn *c, int64_t now)
{
	char client[INET6_ADDRSTRLEN + 16];
	int64_t d = now - c->t0;

	if (verbose < 0 && c->code == EX_OK)
		return;
	client_name(c, client, sizeof(client));
	logmsg(c->code == EX_OK ? LOG_INFO : LOG_WARNING,
	    "%s %s %s %s %llu %llu %lld.%03llds %s", client,
	    c->sni[0] ? c->sni : "-", c->alpn[0] ? c->alpn : "-",
	    route_name[c->route], (unsigned long long)c->up.total,
	    (unsigned long long)c->dn.total, (long long)(d / SEC),
	    (long long)(d % SEC / 1000), c->result);
}

static void
close_pipe(struct dir *d)
{
	int *p = d->p;

	if (p[0] == -1)
		return;
	if (d->inpipe == 0 && listening &&
	    nspares < sizeof(spares) / sizeof(spares[0])) {
		spares[nspares].p[0] = p[0];
		spares[nspares].p[1] = p[1];
		spares[nspares].cap = d->cap;
		nspares++;
	} else {
		close(p[0]);
		close(p[1]);
	}
	p[0] = p[1] = -1;
}

/* Log the connection, close everything it holds, free it later. */
static void
finish(struct conn *c, int code, const char *fmt, ...)
{
	va_list ap;
	int64_t now = now_us();

	if (c->state == S_DEAD)
		return;
	c->code = code;
	va_start(ap, fmt);
	vsnprintf(c->result, sizeof(c->result), fmt, ap);
	va_end(ap);
	log_conn(c, now);
	q_remove(c);
	if (c->queued) {
		struct conn **pp;

		for (pp = &again; *pp; pp = &(*pp)->again)
			if (*pp == c) {
				*pp = c->again;
				break;
			}
		c->queued = 0;
	}
	if (!listening) {
		/* One connection: exit(2) closes everything at once. */
		if (c->cfd != -1 && c->state != S_RELAY)
			(void)recv(c->cfd, peekbuf, sizeof(peekbuf),
			    MSG_DONTWAIT | MSG_TRUNC);
		c->state = S_DEAD;
		exit_code = code;
		single_done = 1;
		return;
	}
	source_put(c->src);
	c->src = NULL;
	if (c->bfd != -1)
		close(c->bfd);
	if (c->cfd != -1) {
		/*
		 * Never relayed: discard what the client sent, so that the
		 * close is a FIN rather than a reset.
		 */
		if (c->state != S_RELAY)
			(void)recv(c->cfd, peekbuf, sizeof(peekbuf),
			    MSG_DONTWAIT | MSG_TRUNC);
		close(c->cfd);
	}
	c->bfd = c->cfd = -1;
	close_pipe(&c->up);
	close_pipe(&c->dn);
	c->state = S_DEAD;
	c->next = dead;
	dead = c;
	nconn--;
}

static struct conn *
conn_new(int fd, int64_t now)
{
	static struct conn single;	/* per-connection mode: no malloc */
	struct conn *c = &single;

	if (listening && (c = malloc(sizeof(*c))) == NULL)
		return NULL;
	/* Only the head of the struct needs zeroing; strings start empty. */
	memset(c, 0, offsetof(struct conn, sni));
	c->sni[0] = c->alpn[0] = c->result[0] = '\0';
	c->cfd = fd;
	c->bfd = -1;
	c->up.p[0] = c->up.p[1] = c->dn.p[0] = c->dn.p[1] = -1;
	c->t0 = now;
	c->state = accept_proxy ? S_PROXY : S_HELLO;
	q_append(&q_hello, c, now);
	nconn++;
	return c;
}

static int
ep_add(int fd, void *tag, uint32_t events)
{
	struct epoll_event ev;

	if (ep == -1 && (ep = epoll_create1(EPOLL_CLOEXEC)) == -1)
		return -1;
	ev.events = events;
	ev.data.ptr = tag;
	return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

#define TAG_CLIENT(c)	((void *)(c))
#define TAG_BACKEND(c)	((void *)((char *)(c) + 1))
#define EV_CONN		(EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET)

static void
set_lowat(struct conn *c, int v)
{
	if (v <= 1 && !c->lowat)
		return;
	(void)setsockopt(c->cfd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof(v));
	c->lowat = v > 1;
}

static void
fill_names(struct conn *c)
{
	const uint8_t *name;
	size_t off = 0, len, n = 0;

	if (hello.sni)
		clean(c->sni, sizeof(c->sni), hello.sni, hello.sni_len);
	if (hello.alpn == NULL)
		return;
	while (alpn_next_proto(&hello, &off, &name, &len)) {
		if (n + 2 >= sizeof(c->alpn))
			break;
		if (n)
			c->alpn[n++] = ',';
		n += clean(c->alpn + n, sizeof(c->alpn) - n, name, len);
	}
}

/*
 * Our environment without LISTEN_* and ALPND_CLIENT, for responders in
 * listening mode, with one spare slot at env[child_nenv] for ALPND_CLIENT.
 */
static size_t	 child_nenv;

static char **
child_env(void)
{
	static char **env;
	size_t n = 0, i;

	if (env)
		return env;
	while (environ[n])
		n++;
	if ((env = calloc(n + 2, sizeof(*env))) == NULL)
		return environ;
	for (i = n = 0; environ[i]; i++)
		if (strncmp(environ[i], "LISTEN_", 7) != 0 &&
		    strncmp(environ[i], "ALPND_CLIENT=", 13) != 0)
			env[n++] = environ[i];
	child_nenv = n;
	return env;
}

static void
respond(struct conn *c, int64_t now)
{
	static char opt_certs[] = "--certs", opt_timeout[] = "--hello-timeout";
	char secs[32], *argv[6], client[INET6_ADDRSTRLEN + 16];
	char envclient[sizeof(client) + 16], **envp;
	int64_t left = c->q == &q_hello ? c->deadline - now : hello_timeout;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t set;
	pid_t pid;
	int e;

	snprintf(secs, sizeof(secs), "%lld",
	    (long long)(left <= 0 ? 1 : (left + SEC - 1) / SEC));
	argv[0] = respond_path;
	argv[1] = opt_certs;
	argv[2] = certs;
	argv[3] = opt_timeout;
	argv[4] = secs;
	argv[5] = NULL;
	set_lowat(c, 1);

	if (!listening) {
		/*
		 * Same process, same connection: fd 0, or fd 3 with
		 * LISTEN_FDS/LISTEN_PID intact (the pid survives execve).
		 * The line below is this connection's log line, so a missing
		 * responder is found before it is written, not after.
		 */
		if (access(respond_path, X_OK) == -1) {
			finish(c, EX_UNAVAILABLE, "exec: %s: %s",
			    strerror(errno), respond_path);
			return;
		}
		snprintf(c->result, sizeof(c->result), "exec %s", respond_path);
		log_conn(c, now);
		if (c->nonblock)
			(void)fcntl(c->cfd, F_SETFL, O_RDWR);
		if (c->have_px) {
			/* The responder cannot see the PROXY header we ate. */
			client_name(c, client, sizeof(client));
			(void)setenv("ALPND_CLIENT", client, 1);
		} else	/* only ever from a PROXY header we accepted */
			(void)unsetenv("ALPND_CLIENT");
		signal(SIGPIPE, SIG_DFL);
		execve(respond_path, argv, environ);
		e = errno;
		signal(SIGPIPE, SIG_IGN);
		finish(c, EX_UNAVAILABLE, "exec: %s: %s", strerror(e),
		    respond_path);
		return;
	}

	/*
	 * Listening mode: a child gets the connection as fd 0, blocking,
	 * without LISTEN_* (that was our listening socket), default signals.
	 * posix_spawn(3) keeps us suspended until the exec, so no descriptor
	 * of another connection lingers in a half-made child.  The epoll
	 * registration goes first: it lives as long as the child's copy.
	 */
	(void)epoll_ctl(ep, EPOLL_CTL_DEL, c->cfd, NULL);
	c->registered = 0;
	(void)fcntl(c->cfd, F_SETFL, O_RDWR);
	if ((e = posix_spawn_file_actions_init(&fa)) != 0)
		goto fail;
	if ((e = posix_spawnattr_init(&attr)) != 0) {
		posix_spawn_file_actions_destroy(&fa);
		goto fail;
	}
	if ((e = posix_spawn_file_actions_adddup2(&fa, c->cfd,
	    STDIN_FILENO)) != 0)
		goto out;
	sigemptyset(&set);
	(void)posix_spawnattr_setsigmask(&attr, &set);
	sigaddset(&set, SIGPIPE);
	sigaddset(&set, SIGCHLD);
	(void)posix_spawnattr_setsigdefault(&attr, &set);
	(void)posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK |
	    POSIX_SPAWN_SETSIGDEF);
	envp = child_env();
	if (c->have_px && envp != environ) {
		/* One more variable: the slot child_env() keeps free. */
		client_name(c, client, sizeof(client));
		snprintf(envclient, sizeof(envclient), "ALPND_CLIENT=%s",
		    client);
		envp[child_nenv] = envclient;
	}
	e = posix_spawn(&pid, respond_path, &fa, &attr, argv, envp);
	if (envp != environ)
		envp[child_nenv] = NULL;
out:
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
fail:
	if (e != 0) {
		finish(c, e == ENOMEM ? EX_OSERR : EX_UNAVAILABLE,
		    "exec: %s: %s", strerror(e), respond_path);
		return;
	}
	/* The child has the connection now: no draining its bytes. */
	close(c->cfd);
	c->cfd = -1;
	finish(c, EX_OK, "exec pid %ld %s", (long)pid, respond_path);
}

static void
peer_addr(struct conn *c)
{
	if (c->peerlen != 0 || c->cfd == -1)
		return;
	c->peerlen = sizeof(c->peer);
	if (getpeername(c->cfd, (struct sockaddr *)&c->peer, &c->peerlen) == -1)
		c->peerlen = 0;
}

/*
 * The one routing rule: a complete ClientHello that offers acme-tls/1 goes
 * to the ACME route; everything else (not TLS, malformed, over the cap, cut
 * short, odd SNI) goes to the fallback as it came, so the client gets the
 * web server's own answer.  why says what alpnd could not parse.
 */
static void
route(struct conn *c, int acme_hello, const char *why)
{
	/* Ask now: once both sides have closed, getpeername(2) fails. */
	if ((verbose >= 0 || send_proxy || acme_send_proxy) && !c->have_px)
		peer_addr(c);
	if (acme_hello) {
		if (certs) {
			c->route = R_RESPOND;
			respond(c, now_us());
			return;
		}
		c->route = R_ACME;
		c->dst = &acme;
	} else {
		c->route = R_FALLBACK;
		c->dst = &fallback;
	}
	if (why)
		logmsg(LOG_DEBUG, "%s: relayed as is", why);
	c->ai = 0;
	c->connect_by = now_us() + hello_timeout;
	start_connect(c);
}

/* Consume exactly n bytes that are known to be queued (the PROXY header). */
static int
consume(int fd, size_t n)
{
	ssize_t r;

	while (n > 0) {
		r = recv(fd, peekbuf, n, MSG_DONTWAIT);
		if (r == -1 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		n -= r;
	}
	return 0;
}

static void
hello_step(struct conn *c, uint32_t ev)
{
	enum alpn_status st;
	const uint8_t *p = peekbuf;
	ssize_t n;
	size_t len, need = 0;
	int hup = (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;

	do
		n = recv(c->cfd, peekbuf, sizeof(peekbuf), MSG_PEEK | MSG_DONTWAIT);
	while (n == -1 && errno == EINTR);
	if (n == -1) {
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (hup)
				finish(c, EX_OK, "closed before any data");
			return;
		}
		if (errno == ECONNRESET)
			finish(c, EX_OK, "reset before any data");
		else
			finish(c, EX_IOERR, "recv: %s", strerror(errno));
		return;
	}
	if (n == 0) {
		if (accept_proxy && c->state == S_HELLO)
			finish(c, EX_DATAERR, "closed after the PROXY header");
		else
			finish(c, EX_OK, "closed before any data");
		return;
	}
	len = n;

	if (c->state == S_PROXY) {
		st = alpn_parse_proxy(p, len, &c->px, &need);
		switch (st) {
		case ALPN_OK:
			break;
		case ALPN_NEED_MORE:
			if (hup || len == sizeof(peekbuf)) {
				finish(c, EX_DATAERR,
				    "truncated PROXY header (%zu bytes)", len);
				return;
			}
			set_lowat(c, need > ALPN_PROXY_MAX ? ALPN_PROXY_MAX :
			    (int)need);
			return;
		default:
			finish(c, EX_DATAERR, "bad PROXY header");
			return;
		}
		if (consume(c->cfd, c->px.hdr_len) == -1) {
			finish(c, EX_IOERR, "reading the PROXY header failed");
			return;
		}
		c->have_px = !c->px.local && c->px.family != ALPN_PROXY_UNKNOWN;
		c->state = S_HELLO;
		p += c->px.hdr_len;
		len -= c->px.hdr_len;
		if (len == 0) {
			set_lowat(c, 1);
			if (hup)
				finish(c, EX_DATAERR,
				    "closed after the PROXY header");
			return;
		}
	}

	st = alpn_parse_hello(p, len, &hello, &need);
	switch (st) {
	case ALPN_OK:
		fill_names(c);
		route(c, hello.has_acme, NULL);
		return;
	case ALPN_NEED_MORE:
		if (hup)
			route(c, 0, "ClientHello cut short by the client");
		else if (len == sizeof(peekbuf) - (size_t)(p - peekbuf))
			route(c, 0, "ClientHello over the size cap");
		else	/* wake up only when enough has arrived: no spinning */
			set_lowat(c, need > ALPN_WIRE_MAX ? ALPN_WIRE_MAX :
			    (int)need);
		return;
	case ALPN_NOT_TLS:
		route(c, 0, "not a TLS ClientHello");
		return;
	default:
		route(c, 0, "malformed ClientHello");
		return;
	}
}

static void
start_connect(struct conn *c)
{
	struct addr *a = c->dst;
	const struct sockaddr *sa;
	int fd, one = 1;

	if (!a->resolved && resolve(a) == -1) {
		finish(c, EX_UNAVAILABLE, "backend %s: cannot resolve", a->spec);
		return;
	}
	for (; c->ai < a->n; c->ai++) {
		sa = (const struct sockaddr *)&a->ss[c->ai];
		fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK |
		    SOCK_CLOEXEC, 0);
		if (fd == -1) {
			c->cerr = errno;
			continue;
		}
		if (sa->sa_family != AF_UNIX)
			(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
			    sizeof(one));
		if (connect(fd, sa, a->len[c->ai]) == 0 ||
		    (errno == EINPROGRESS && sa->sa_family != AF_UNIX &&
		    (connect(fd, sa, a->len[c->ai]) == 0 || errno == EISCONN))) {
			/*
			 * On loopback the handshake has usually completed by
			 * the time connect(2) returns: asking again saves a
			 * trip through epoll.  EALREADY: still on its way.
			 */
			c->bfd = fd;
			start_relay(c);
			return;
		}
		if (errno == EINPROGRESS || errno == EALREADY) {
			if (ep_add(fd, TAG_BACKEND(c), EV_CONN) == -1) {
				c->cerr = errno;
				close(fd);
				continue;
			}
			c->bfd = fd;
			c->bregistered = 1;
			c->state = S_CONNECT;
			q_append(&q_connect, c, now_us());
			return;
		}
		c->cerr = errno;
		close(fd);
		if (c->cerr == EAGAIN && now_us() + RETRY_US < c->connect_by) {
			/*
			 * A unix socket whose accept queue is full says EAGAIN
			 * where TCP would queue the SYN: wait and try the
			 * same address again, as TCP would.
			 */
			if (c->state != S_CONNECT)
				logmsg(LOG_DEBUG, "backend %s: accept queue "
				    "full, waiting", a->spec);
			c->state = S_CONNECT;
			q_append(&q_retry, c, now_us());
			return;
		}
		logmsg(LOG_DEBUG, "connect %s (address %zu): %s", a->spec,
		    c->ai, strerror(c->cerr));
	}
	finish(c, EX_UNAVAILABLE, "backend %s: %s", a->spec,
	    strerror(c->cerr ? c->cerr : EADDRNOTAVAIL));
}

static void
connect_failed(struct conn *c, int err)
{
	c->cerr = err;
	logmsg(LOG_DEBUG, "connect %s (address %zu): %s", c->dst->spec, c->ai,
	    strerror(err));
	close(c->bfd);	/* also leaves the epoll set */
	c->bfd = -1;
	c->bregistered = 0;
	c->ai++;
	start_connect(c);
}

static void
connect_step(struct conn *c)
{
	socklen_t sl = sizeof(int);
	int err = 0;

	if (getsockopt(c->bfd, SOL_SOCKET, SO_ERROR, &err, &sl) == -1)
		err = errno;
	if (err == EINPROGRESS || err == EALREADY)
		return;
	if (err) {
		connect_failed(c, err);
		return;
	}
	start_relay(c);
}

static size_t
put_addr(char *buf, size_t sz, int af, const uint8_t *a)
{
	if (inet_ntop(af, a, buf, sz) == NULL)
		return 0;
	return strlen(buf);
}

/*
 * The PROXY header for the backend: the client as received in an accepted
 * PROXY header, else this connection's own addresses; UNKNOWN (v1) or
 * LOCAL (v2) for clients that are not TCP.
 */
static int
send_proxy_header(struct conn *c, int version)
{
	static const uint8_t sig[12] = "\r\n\r\n\0\r\nQUIT\n";
	struct sockaddr_storage local;
	socklen_t llen = sizeof(local);
	uint8_t src[16], dst[16], buf[232];
	uint16_t sport = 0, dport = 0;
	int fam = 0;	/* 4, 6 or 0 (unknown) */
	size_t n = 0, alen;
	char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
	ssize_t w;

	if (c->have_px) {
		fam = c->px.family == ALPN_PROXY_TCP4 ? 4 : 6;
		memcpy(src, c->px.src, 16);
		memcpy(dst, c->px.dst, 16);
		sport = c->px.sport;
		dport = c->px.dport;
	} else {
		peer_addr(c);
		if (c->peerlen && getsockname(c->cfd, (struct sockaddr *)&local,
		    &llen) == 0 && local.ss_family == c->peer.ss_family) {
			const struct sockaddr_in *a4 =
			    (const struct sockaddr_in *)&c->peer;
			const struct sockaddr_in *b4 =
			    (const struct sockaddr_in *)&local;
			const struct sockaddr_in6 *a6 =
			    (const struct sockaddr_in6 *)&c->peer;
			const struct sockaddr_in6 *b6 =
			    (const struct sockaddr_in6 *)&local;

			if (local.ss_family == AF_INET) {
				fam = 4;
				memcpy(src, &a4->sin_addr, 4);
				memcpy(dst, &b4->sin_addr, 4);
				sport = ntohs(a4->sin_port);
				dport = ntohs(b4->sin_port);
			} else if (local.ss_family == AF_INET6) {
				sport = ntohs(a6->sin6_port);
				dport = ntohs(b6->sin6_port);
				if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr) &&
				    IN6_IS_ADDR_V4MAPPED(&b6->sin6_addr)) {
					fam = 4;
					memcpy(src, &a6->sin6_addr.s6_addr[12], 4);
					memcpy(dst, &b6->sin6_addr.s6_addr[12], 4);
				} else {
					fam = 6;
					memcpy(src, &a6->sin6_addr, 16);
					memcpy(dst, &b6->sin6_addr, 16);
				}
			}
		}
	}

	if (version == 1) {
		if (fam == 0) {
			n = (size_t)snprintf((char *)buf, sizeof(buf),
			    "PROXY UNKNOWN\r\n");
		} else {
			int af = fam == 4 ? AF_INET : AF_INET6;

			if (put_addr(s, sizeof(s), af, src) == 0 ||
			    put_addr(d, sizeof(d), af, dst) == 0)
				return -1;
			n = (size_t)snprintf((char *)buf, sizeof(buf),
			    "PROXY TCP%d %s %s %u %u\r\n", fam, s, d, sport,
			    dport);
		}
	} else {
		memcpy(buf, sig, sizeof(sig));
		alen = fam == 4 ? 12 : fam == 6 ? 36 : 0;
		buf[12] = fam ? 0x21 : 0x20;		/* v2, PROXY or LOCAL */
		buf[13] = fam == 4 ? 0x11 : fam == 6 ? 0x21 : 0x00;
		buf[14] = alen >> 8;
		buf[15] = alen & 0xff;
		n = 16;
		if (fam) {
			size_t l = fam == 4 ? 4 : 16;

			memcpy(buf + n, src, l);
			memcpy(buf + n + l, dst, l);
			n += 2 * l;
			buf[n++] = sport >> 8;
			buf[n++] = sport & 0xff;
			buf[n++] = dport >> 8;
			buf[n++] = dport & 0xff;
		}
	}
	/* A fresh socket's send buffer takes these few bytes at once. */
	do
		w = send(c->bfd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (w == -1 && errno == EINTR);
	return w == (ssize_t)n ? 0 : -1;
}

static int
get_pipe(struct dir *d)
{
	if (nspares > 0) {
		nspares--;
		d->p[0] = spares[nspares].p[0];
		d->p[1] = spares[nspares].p[1];
		d->cap = spares[nspares].cap;
		return 0;
	}
	d->cap = 65536;		/* the default: 16 pages */
	return pipe2(d->p, O_NONBLOCK | O_CLOEXEC);
}

/*
 * A relay moving bulk data gets a larger pipe (fewer splice calls per
 * byte); short exchanges never pay for the extra fcntl(2).
 */
static void
grow_pipe(struct dir *d)
{
	if (fcntl(d->p[1], F_SETPIPE_SZ, PIPE_SIZE) == -1) {
		grow_pipes = 0;	/* over the limit: stop asking */
		return;
	}
	d->cap = PIPE_SIZE;
}

static void
start_relay(struct conn *c)
{
	int64_t now = now_us();
	int one = 1, proxy;

	set_lowat(c, 1);
	if (get_pipe(&c->up) == -1 || get_pipe(&c->dn) == -1) {
		finish(c, EX_OSERR, "pipe: %s", strerror(errno));
		return;
	}
	if ((proxy = c->route == R_FALLBACK ? send_proxy : acme_send_proxy) &&
	    send_proxy_header(c, proxy) == -1) {
		finish(c, EX_IOERR, "cannot send the PROXY header");
		return;
	}
	/*
	 * Forward segments as they come, like the backend side: Nagle here
	 * would hold back the tail of a TLS flight until the client ACKs.
	 */
	if (c->peer.ss_family != AF_UNIX)
		(void)setsockopt(c->cfd, IPPROTO_TCP, TCP_NODELAY, &one,
		    sizeof(one));
	if (!c->nonblock) {
		/* splice(2) follows the socket's own O_NONBLOCK. */
		(void)fcntl(c->cfd, F_SETFL, O_RDWR | O_NONBLOCK);
		c->nonblock = 1;
	}
	if (!c->registered) {
		if (ep_add(c->cfd, TAG_CLIENT(c), EV_CONN) == -1) {
			finish(c, EX_OSERR, "epoll: %s", strerror(errno));
			return;
		}
		c->registered = 1;
	}
	if (!c->bregistered) {
		/*
		 * Connected at once (maybe after an earlier address failed
		 * in S_CONNECT): this socket is not in the epoll set yet.
		 */
		if (ep_add(c->bfd, TAG_BACKEND(c), EV_CONN) == -1) {
			finish(c, EX_OSERR, "epoll: %s", strerror(errno));
			return;
		}
		c->bregistered = 1;
	}
	c->state = S_RELAY;
	c->active = now;
	q_append(&q_relay, c, now);
	relay_step(c);
}

/*
 * Move what can be moved from src to dst through the pipe, until both the
 * read and the write would block, or the budget is spent (then *more is
 * set: edge-triggered epoll will not tell us again).  Returns 0, or -1
 * with errno set.
 */
#define PUMP_ROUNDS	16

/*
 * TCP urgent data: splice(2) stops at the urgent mark (it says EAGAIN, or
 * 0 once a FIN follows), so the byte there is moved by hand, inline
 * (SO_OOBINLINE): nothing after it is lost or stalled.  Checked when
 * splice claims EOF, and on EAGAIN only for a side that ever sent urgent
 * data (EPOLLPRI, in any state): the common path pays nothing.
 */
static int
urgent_step(struct dir *d, int src, int eof)
{
	int mark = 0, one = 1;
	uint8_t b;

	if (!d->urg && !eof)
		return 0;
	if (ioctl(src, SIOCATMARK, &mark) == -1 || !mark)
		return 0;
	/* Read-time flag: the byte at the mark is now ordinary data. */
	(void)setsockopt(src, SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one));
	d->urg = 1;
	/*
	 * Peek, write, then consume: a pipe counts its room in pages, not
	 * bytes, so it can be full although inpipe < cap.  Then the byte
	 * stays in the socket until the pipe drains (-1: wait).
	 */
	if (recv(src, &b, 1, MSG_DONTWAIT | MSG_PEEK) != 1)
		return 0;
	if (write(d->p[1], &b, 1) != 1)
		return -1;
	(void)recv(src, &b, 1, MSG_DONTWAIT);
	d->inpipe++;
	d->total++;
	return 1;
}

static int
pump(struct dir *d, int src, int dst, int *moved, int *more)
{
	ssize_t n;
	int progress, rounds = 0;

	do {
		if (++rounds > PUMP_ROUNDS) {
			*more = 1;
			return 0;
		}
		progress = 0;
		if (!d->eof && d->inpipe < d->cap) {
			n = splice(src, NULL, d->p[1], NULL, d->cap - d->inpipe,
			    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			if (n > 0) {
				d->inpipe += n;
				d->total += n;
				progress = 1;
				if (d->inpipe >= d->cap / 2 && d->cap < PIPE_SIZE &&
				    grow_pipes)
					grow_pipe(d);
			} else if (n == 0 || errno == EAGAIN) {
				int u = urgent_step(d, src, n == 0);

				if (u > 0)
					progress = 1;
				else if (u == 0 && n == 0)
					d->eof = 1;
			} else if (errno != EINTR)
				return -1;
		}
		if (d->inpipe > 0) {
			n = splice(d->p[0], NULL, dst, NULL, d->inpipe,
			    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			if (n > 0) {
				d->inpipe -= n;
				progress = 1;
			} else if (n == -1 && errno != EAGAIN &&
			    errno != EINTR)
				return -1;
		}
		*moved |= progress;
	} while (progress);
	if (d->eof && d->inpipe == 0 && !d->shut) {
		/* Half-close: pass the EOF on once everything got through. */
		if (shutdown(dst, SHUT_WR) == -1 && errno != ENOTCONN)
			return -1;
		d->shut = 1;
	}
	return 0;
}

/*
 * Pump what an event calls for (both directions when events is 0): data or
 * EOF on a socket moves its own direction; room to write into a socket
 * matters only to a direction that has bytes waiting for it.  Edge-
 * triggered epoll reports every readiness bit at each edge, so this saves
 * a splice(2) that would only say EAGAIN.
 */
static void
relay_event(struct conn *c, int backend, uint32_t events)
{
	const uint32_t rd = EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLHUP |
	    EPOLLERR;
	const uint32_t wr = EPOLLOUT | EPOLLHUP | EPOLLERR;
	int up, dn, moved = 0, more = 0, r = 0;

	if (events == 0)
		up = dn = 1;
	else if (!backend) {
		up = (events & rd) != 0;
		dn = (events & wr) && c->dn.inpipe > 0;
	} else {
		dn = (events & rd) != 0;
		up = (events & wr) && c->up.inpipe > 0;
	}
	if (up)
		r = pump(&c->up, c->cfd, c->bfd, &moved, &more);
	if (r == 0 && dn)
		r = pump(&c->dn, c->bfd, c->cfd, &moved, &more);
	relay_done(c, r, moved, more);
}

static void
relay_step(struct conn *c)
{
	relay_event(c, 0, 0);
}

/*
 * One side reset: hand on what the pipes already hold, as far as it goes
 * without waiting, then close both sides with a reset (SO_LINGER 0), so
 * that a cut-off stream never looks like a complete one.
 */
static void
abort_relay(struct conn *c)
{
	const struct linger lg = { 1, 0 };

	if (c->up.inpipe > 0)
		(void)splice(c->up.p[0], NULL, c->bfd, NULL, c->up.inpipe,
		    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	if (c->dn.inpipe > 0)
		(void)splice(c->dn.p[0], NULL, c->cfd, NULL, c->dn.inpipe,
		    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	(void)setsockopt(c->cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	(void)setsockopt(c->bfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

static void
relay_done(struct conn *c, int r, int moved, int more)
{
	if (r == -1) {
		if (errno == ECONNRESET || errno == EPIPE) {
			abort_relay(c);
			finish(c, EX_OK, "reset");
		} else
			finish(c, EX_IOERR, "relay: %s", strerror(errno));
		return;
	}
	if (c->up.shut && c->dn.shut) {
		finish(c, EX_OK, "ok");
		return;
	}
	if (moved && idle_timeout > 0)
		q_append(&q_relay, c, now_us());	/* LRU order */
	if (more && !c->queued) {
		/* Fairness: the others get their turn, then we go on. */
		c->queued = 1;
		c->again = again;
		again = c;
	}
}

static void
resume_relays(void)
{
	struct conn *c, *list = again;

	again = NULL;
	while ((c = list) != NULL) {
		list = c->again;
		c->queued = 0;
		if (c->state == S_RELAY)
			relay_step(c);
	}
}

static void
expire(int64_t now)
{
	struct conn *c;

	while ((c = q_hello.head) && c->deadline <= now) {
		if (c->state == S_PROXY)
			finish(c, EX_TEMPFAIL, "timeout waiting for the PROXY header");
		else
			finish(c, EX_TEMPFAIL, "timeout waiting for the ClientHello");
	}
	while ((c = q_connect.head) && c->deadline <= now)
		connect_failed(c, ETIMEDOUT);
	while ((c = q_retry.head) && c->deadline <= now) {
		q_remove(c);
		start_connect(c);
	}
	while (idle_timeout > 0 && (c = q_relay.head) && c->deadline <= now)
		finish(c, EX_TEMPFAIL, "idle timeout");
}

static int64_t
next_deadline(void)
{
	int64_t d = INT64_MAX;

	if (q_hello.head && q_hello.head->deadline < d)
		d = q_hello.head->deadline;
	if (q_connect.head && q_connect.head->deadline < d)
		d = q_connect.head->deadline;
	if (q_retry.head && q_retry.head->deadline < d)
		d = q_retry.head->deadline;
	if (idle_timeout > 0 && q_relay.head && q_relay.head->deadline < d)
		d = q_relay.head->deadline;
	if (listen_paused && resume_at < d)
		d = resume_at;
	if (over.log_at && over.log_at < d)
		d = over.log_at;
	return d;
}

/* Children (responders, a reloaded copy's relays) still running? */
static int
children(void)
{
	siginfo_t si;

	return waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0;
}

static void	stop_accepting(int64_t);
static void	reload(const struct signalfd_siginfo *);

static void
on_signal(int64_t now)
{
	struct signalfd_siginfo si;
	int status;
	pid_t pid;

	while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
		switch (si.ssi_signo) {
		case SIGTERM:
		case SIGINT:
			if (run_state != STOPPING) {
				stop_accepting(now);
				run_state = STOPPING;
				drain_at = now + drain;
			}
			break;
		case SIGHUP:
			if (run_state == RUNNING)
				reload(&si);
			break;
		}
	}
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
			logmsg(LOG_DEBUG, "child %ld exited %d", (long)pid,
			    WEXITSTATUS(status));
}

/* A client over a bound: closed at once, counted, summarised later. */
static void
shed(int fd, unsigned long *counter, int64_t now)
{
	const struct linger lg = { 1, 0 };

	(void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
	(*counter)++;
	if (over.log_at == 0)
		over.log_at = now + SUMMARY_US;
}

static void
over_summary(int64_t now, int force)
{
	if (over.log_at == 0 || (!force && now < over.log_at))
		return;
	logmsg(LOG_WARNING, "over the bounds in the last %lld s: %lu closed "
	    "at once (%lu over --max-conn %zu, %lu over --max-per-source %u, "
	    "%lu short of descriptors)", (long long)(SUMMARY_US / SEC),
	    over.total + over.source + over.fds, over.total, max_conn,
	    over.source, max_per_source, over.fds);
	over.total = over.source = over.fds = 0;
	over.log_at = 0;
}

/*
 * Out of descriptors: give up the reserve, take the client that is first
 * in the queue and close it, take the reserve back (1; 0: the queue was
 * empty; -1: no reserve to give).  The queue keeps
 * moving (nothing spins on EMFILE, nothing waits behind it) and those who
 * came too many are told at once.
 */
static int
shed_one(int64_t now)
{
	int fd, e;

	while (nspares > 0) {		/* spare pipes are a luxury now */
		nspares--;
		close(spares[nspares].p[0]);
		close(spares[nspares].p[1]);
	}
	if (reserve_fd == -1)
		return -1;
	close(reserve_fd);
	fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	e = errno;
	if (fd != -1)
		shed(fd, &over.fds, now);
	reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (fd != -1)
		return 1;
	errno = e;
	return e == EAGAIN || e == EWOULDBLOCK ? 0 : -1;
}

static int
accept_some(int64_t now)
{
	struct sockaddr_storage ss;
	struct source *src;
	socklen_t sl;
	struct conn *c;
	int fd, i;

	for (i = 0; i < ACCEPT_BATCH; i++) {
		sl = sizeof(ss);
		fd = accept4(lfd, (struct sockaddr *)&ss, &sl,
		    SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd == -1) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EMFILE || errno == ENFILE) {
				int r = shed_one(now);

				if (r > 0)
					continue;
				if (r == 0)
					return 0;
			}
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM) {
				logmsg(LOG_ERR, "accept: %s: pausing",
				    strerror(errno));
				epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
				listen_paused = 1;
				resume_at = now + SEC / 10;
				return 0;
			}
			if (errno == EINTR || errno == ECONNABORTED ||
			    errno == EPROTO || errno == EPERM)
				continue;
			logmsg(LOG_ERR, "accept: %s", strerror(errno));
			return 0;
		}
		if (nconn >= max_conn) {
			shed(fd, &over.total, now);
			continue;
		}
		src = NULL;
		if (max_per_source && !accept_proxy &&
		    source_get((struct sockaddr *)&ss, max_per_source,
		    &src) == -1) {
			shed(fd, &over.source, now);
			continue;
		}
		if ((c = conn_new(fd, now)) == NULL) {
			logmsg(LOG_ERR, "out of memory");
			source_put(src);
			close(fd);
			continue;
		}
		c->src = src;
		memcpy(&c->peer, &ss, sl < sizeof(ss) ? sl : sizeof(ss));
		c->peerlen = sl;
		c->nonblock = 1;
		if (ep_add(fd, TAG_CLIENT(c), EV_CONN) == -1) {
			finish(c, EX_OSERR, "epoll: %s", strerror(errno));
			continue;
		}
		c->registered = 1;
	}
	return 1;
}

/*
 * Stop: take what is already queued (those clients connected before the
 * stop), then let go of the listening socket.  With systemd the socket
 * stays open in PID 1, so what arrives later waits for the next start.
 */
static void
stop_accepting(int64_t now)
{
	int batches = 0;

	if (lfd == -1)
		return;
	while (!listen_paused && accept_some(now) && ++batches < 1024)
		;
	(void)epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
	close(lfd);
	lfd = -1;
	listen_paused = 0;
	logmsg(LOG_INFO, "stopping: %zu connections to finish, for up to "
	    "%lld s (--drain)", nconn, (long long)(drain / SEC));
}

/* Close this process's copies of every connection, without a word. */
static void
forget_connections(void)
{
	struct queue *qs[] = { &q_hello, &q_connect, &q_retry, &q_relay };
	struct conn *c;
	size_t i;

	for (i = 0; i < sizeof(qs) / sizeof(qs[0]); i++)
		while ((c = qs[i]->head) != NULL) {
			q_remove(c);
			source_put(c->src);
			if (c->cfd != -1)
				close(c->cfd);
			if (c->bfd != -1)
				close(c->bfd);
			if (c->up.p[0] != -1) {
				close(c->up.p[0]);
				close(c->up.p[1]);
			}
			if (c->dn.p[0] != -1) {
				close(c->dn.p[0]);
				close(c->dn.p[1]);
			}
			free(c);
		}
	while ((c = dead) != NULL) {
		dead = c->next;
		free(c);
	}
	while (nspares > 0) {
		nspares--;
		close(spares[nspares].p[0]);
		close(spares[nspares].p[1]);
	}
	again = NULL;
	nconn = 0;
}

/*
 * The options of `alpnd --reload PID OPTIONS...` (the sender of the
 * SIGHUP), read from its /proc/PID/cmdline, with our own argv[0]; NULL
 * when the sender is something else (kill -HUP: keep our options).
 */
static char **
reload_argv(pid_t pid, char **bufp)
{
	char path[64], *buf, **v, *p, me[24];
	size_t n = 0, cap = 65536, i, argc = 0;
	ssize_t r;
	int fd;

	*bufp = NULL;
	snprintf(path, sizeof(path), "/proc/%ld/cmdline", (long)pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
		return NULL;
	if ((buf = malloc(cap + 1)) == NULL) {
		close(fd);
		return NULL;
	}
	while (n < cap && (r = read(fd, buf + n, cap - n)) > 0)
		n += r;
	close(fd);
	buf[n] = '\0';
	for (i = 0; i < n; i++)
		argc += buf[i] == '\0';
	snprintf(me, sizeof(me), "%ld", (long)mypid);
	p = buf + strlen(buf) + 1;		/* argv[1] */
	if (n == cap || argc < 3 || strcmp(p, "--reload") != 0 ||
	    strcmp(p + 9, me) != 0 || (v = calloc(argc, sizeof(*v))) == NULL) {
		free(buf);
		return NULL;
	}
	v[0] = self_argv[0];
	p += 9 + strlen(me) + 1;		/* argv[3] */
	for (i = 1; i + 2 < argc; i++, p += strlen(p) + 1)
		v[i] = p;
	*bufp = buf;
	return v;
}

/*
 * Reload (SIGHUP): a child keeps every connection this process holds and
 * finishes them; this process, same PID (systemd's main PID), executes
 * the binary at its path again (a new one after an upgrade) with the
 * listening socket, which never closes: nothing is refused or cut.
 */
static void
reload(const struct signalfd_siginfo *si)
{
	char **argv = NULL, *buf = NULL;
	pid_t pid;
	int e;

	if (si->ssi_uid == getuid() || si->ssi_uid == 0)
		argv = reload_argv((pid_t)si->ssi_pid, &buf);
	if ((pid = fork()) == -1) {
		logmsg(LOG_ERR, "reload: fork: %s", strerror(errno));
		goto out;
	}
	if (pid == 0) {
		mypid = getpid();
		run_state = REPLACED;
		(void)epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
		close(lfd);
		lfd = -1;
		listen_paused = 0;
		goto out;
	}
	if (argv)			/* the reloader waits for this */
		(void)kill((pid_t)si->ssi_pid, SIGUSR1);
	logmsg(LOG_INFO, "reload: %zu connections stay with pid %ld; "
	    "executing %s", nconn, (long)pid, self_path);
	forget_connections();
	close(ep);
	ep = -1;
	(void)fcntl(lfd, F_SETFD, 0);
	if (lfd == 3) {
		char v[24];

		snprintf(v, sizeof(v), "%ld", (long)mypid);
		(void)setenv("LISTEN_PID", v, 1);
		(void)setenv("LISTEN_FDS", "1", 1);
	}
	execv(self_path, argv ? argv : self_argv);
	e = errno;
	(void)fcntl(lfd, F_SETFD, FD_CLOEXEC);
	if (ep_add(sfd, &signal_tag, EPOLLIN) == -1 ||
	    ep_add(lfd, &listener_tag, EPOLLIN) == -1)
		die(EX_OSERR, "reload: epoll: %s", strerror(errno));
	logmsg(LOG_ERR, "reload: exec %s: %s: going on as before", self_path,
	    strerror(e));
out:
	free(argv);
	free(buf);
}

/*
 * alpnd --reload PID OPTIONS...: the options are valid (we got here), so
 * ask PID to take them (SIGHUP; it reads them from our command line) and
 * wait for its answer.
 */
static int
reload_client(pid_t pid)
{
	struct timespec ts = { 10, 0 };
	siginfo_t si;
	sigset_t set;
	int r;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if (kill(pid, SIGHUP) == -1)
		die(EX_UNAVAILABLE, "--reload %ld: %s", (long)pid,
		    strerror(errno));
	for (;;) {
		r = sigtimedwait(&set, &si, &ts);
		if (r == SIGUSR1 && si.si_pid == pid)
			return EX_OK;
		if (r == -1 && errno == EAGAIN)
			die(EX_TEMPFAIL, "--reload %ld: no answer in 10 s",
			    (long)pid);
	}
}

static void
dispatch(void *tag, uint32_t events, int64_t now)
{
	struct conn *c;
	int backend;

	if (tag == &listener_tag) {
		accept_some(now);
		return;
	}
	if (tag == &signal_tag) {
		on_signal(now);
		return;
	}
	backend = ((uintptr_t)tag & 1) != 0;
	c = (struct conn *)((uintptr_t)tag & ~(uintptr_t)1);
	if (events & EPOLLPRI)		/* urgent data: see urgent_step() */
		(backend ? &c->dn : &c->up)->urg = 1;
	switch (c->state) {
	case S_PROXY:
	case S_HELLO:
		if (!backend)
			hello_step(c, events);
		break;
	case S_CONNECT:
		if (backend)
			connect_step(c);
		break;
	case S_RELAY:
		relay_event(c, backend, events);
		break;
	case S_DEAD:
		break;
	}
}

/* The one event loop, for one connection or for a listening socket. */
static void
loop(void)
{
	struct epoll_event evs[MAX_EVENTS];
	struct conn *c;
	int64_t now, d, idle_since = now_us();
	int i, n, timeout;

	for (;;) {
		if (!listening && single_done)
			return;
		now = now_us();
		d = again ? now : next_deadline();
		if (run_state == RUNNING && exit_idle >= 0 && nconn == 0 &&
		    idle_since + exit_idle < d)
			d = idle_since + exit_idle;
		if (run_state == STOPPING && drain_at < d)
			d = drain_at;
		if (d == INT64_MAX)
			timeout = -1;
		else if (d <= now)
			timeout = 0;
		else
			timeout = (int)((d - now + 999) / 1000 > 86400000 ?
			    86400000 : (d - now + 999) / 1000);
		n = epoll_wait(ep, evs, MAX_EVENTS, timeout);
		if (n == -1) {
			if (errno == EINTR)
				continue;
			die(EX_OSERR, "epoll_wait: %s", strerror(errno));
		}
		now = now_us();
		for (i = 0; i < n; i++)
			dispatch(evs[i].data.ptr, evs[i].events, now);
		resume_relays();
		expire(now);
		while ((c = dead) != NULL) {
			dead = c->next;
			free(c);
		}
		if (!listening)
			continue;
		over_summary(now, 0);
		if (listen_paused && now >= resume_at) {
			if (ep_add(lfd, &listener_tag, EPOLLIN) == 0)
				listen_paused = 0;
			else
				resume_at = now + SEC / 10;
		}
		if (run_state != RUNNING) {
			if (nconn == 0 && !children())
				return;
			if (run_state == STOPPING && now >= drain_at) {
				logmsg(LOG_WARNING, "stopping: %zu connections "
				    "cut after the drain (--drain %lld s)", nconn,
				    (long long)(drain / SEC));
				return;
			}
		} else if (nconn > 0 || (exit_idle >= 0 && children()))
			idle_since = now;
		else if (exit_idle >= 0 && now - idle_since >= exit_idle &&
		    !accept_some(now) && nconn == 0) {
			/* (a last look: a client that came just now is served) */
			logmsg(LOG_DEBUG, "idle for %lld ms: exiting",
			    (long long)(exit_idle / 1000));
			return;
		}
	}
}

/*
 * Where log lines go: syslog when fd 2 is the very socket we serve (inetd
 * without an error stream), the journal's stream without our own prefix,
 * else stderr.  A closed fd 2 gets /dev/null, lest a backend socket become
 * "stderr".
 */
static void
log_setup(int cfd)
{
	struct stat a, b;
	unsigned long long dev, ino;
	const char *js;
	int fd;

	if (fstat(STDERR_FILENO, &a) == -1) {
		if (errno == EBADF &&
		    (fd = open("/dev/null", O_RDWR | O_CLOEXEC)) != -1 &&
		    fd != STDERR_FILENO) {
			(void)dup2(fd, STDERR_FILENO);
			close(fd);
		}
		return;
	}
	if (fstat(cfd, &b) == 0 && a.st_dev == b.st_dev &&
	    a.st_ino == b.st_ino) {
		/* inetd/xinetd: stderr is the client; never write there. */
		use_syslog = 1;
		openlog("alpnd", LOG_PID, LOG_DAEMON);
		return;
	}
	/* systemd.exec(5) JOURNAL_STREAM: journald adds "alpnd[PID]: ". */
	if ((js = getenv("JOURNAL_STREAM")) != NULL &&
	    sscanf(js, "%llu:%llu", &dev, &ino) == 2 &&
	    dev == (unsigned long long)a.st_dev &&
	    ino == (unsigned long long)a.st_ino)
		use_journal = 1;
}

/*
 * Listening-socket mode, once: resolve backend names now (getaddrinfo(3)
 * would stop every connection while it waits; a name that does not
 * resolve is a start-up error, and systemd starts us again on the next
 * connection), and keep the listening socket out of the responders: with
 * StandardInput=socket, fds 1 and 2 are that socket too.
 */
static void
listen_setup(void)
{
	struct stat l, o;
	int fd, null = -1;

	if (resolve(&fallback) == -1 || (have_acme && resolve(&acme) == -1))
		die(EX_UNAVAILABLE, "cannot resolve the backend addresses");
	if (fstat(lfd, &l) == -1)
		return;
	for (fd = STDOUT_FILENO; fd <= STDERR_FILENO; fd++) {
		if (fd == lfd || fstat(fd, &o) == -1 ||
		    o.st_dev != l.st_dev || o.st_ino != l.st_ino)
			continue;
		if (null == -1 &&
		    (null = open("/dev/null", O_RDWR | O_CLOEXEC)) == -1)
			return;
		(void)dup2(null, fd);
	}
	if (null > STDERR_FILENO)
		close(null);
}

int
main(int argc, char *argv[])
{
	static const struct option longopts[] = {
		{ "fallback",		required_argument,	NULL, 'f' },
		{ "certs",		required_argument,	NULL, 'd' },
		{ "acme",		required_argument,	NULL, 'a' },
		{ "accept-proxy",	no_argument,		NULL, 'p' },
		{ "send-proxy",		required_argument,	NULL, 'P' },
		{ "acme-send-proxy",	required_argument,	NULL, 'A' },
		{ "hello-timeout",	required_argument,	NULL, 't' },
		{ "idle-timeout",	required_argument,	NULL, 'i' },
		{ "respond",		required_argument,	NULL, 'r' },
		{ "exit-idle",		required_argument,	NULL, 'x' },
		{ "drain",		required_argument,	NULL, 'D' },
		{ "max-conn",		required_argument,	NULL, 'm' },
		{ "max-per-source",	required_argument,	NULL, 's' },
		{ "reload",		required_argument,	NULL, 'R' },
		{ "verbose",		no_argument,		NULL, 'v' },
		{ "quiet",		no_argument,		NULL, 'q' },
		{ "version",		no_argument,		NULL, 'V' },
		{ "help",		no_argument,		NULL, 'h' },
		{ NULL,			0,			NULL, 0 }
	};
	const char *fb = NULL, *ac = NULL, *env;
	struct conn *c;
	ssize_t n;
	socklen_t sl;
	int ch, fd = STDIN_FILENO, acc = 0;

	/* getopt_long(3) permutes argv: keep it as given, for a reload */
	if ((self_argv = calloc(argc + 1, sizeof(*self_argv))) == NULL)
		die(EX_OSERR, "out of memory");
	memcpy(self_argv, argv, argc * sizeof(*argv));
	while ((ch = getopt_long(argc, argv, "f:d:a:pP:A:t:i:r:x:D:m:s:R:vqVh", longopts,
	    NULL)) != -1) {
		switch (ch) {
		case 'f':
			fb = optarg;
			break;
		case 'd':
			certs = optarg;
			break;
		case 'a':
			ac = optarg;
			break;
		case 'p':
			accept_proxy = 1;
			break;
		case 'P':
			send_proxy = proxy_version(optarg, "--send-proxy");
			break;
		case 'A':
			acme_send_proxy = proxy_version(optarg,
			    "--acme-send-proxy");
			break;
		case 't':
			hello_timeout = parse_secs(optarg, "--hello-timeout", 0);
			/* alpnd-respond takes 1..3600: refuse here, not per ACME connection. */
			if (hello_timeout > 3600 * SEC)
				die(EX_USAGE, "--hello-timeout %s: at most 3600 "
				    "seconds", optarg);
			break;
		case 'i':
			idle_timeout = parse_secs(optarg, "--idle-timeout", 1);
			break;
		case 'r':
			respond_path = optarg;
			break;
		case 'x':
			exit_idle = parse_secs(optarg, "--exit-idle", 1);
			break;
		case 'D':
			drain = parse_secs(optarg, "--drain", 1);
			break;
		case 'm':
			max_conn = parse_count(optarg, "--max-conn", 1);
			break;
		case 's':
			max_per_source = parse_count(optarg, "--max-per-source", 0);
			break;
		case 'R': {
			char *end;
			long v;

			errno = 0;
			v = strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || errno || v <= 1 ||
			    v > INT32_MAX)
				die(EX_USAGE, "--reload %s: expected a process ID",
				    optarg);
			reload_pid = (pid_t)v;
			break;
		}
		case 'v':
			verbose = 1;
			break;
		case 'q':
			verbose = -1;
			break;
		case 'V':
			printf("alpnd %s\n", ALPND_VERSION);
			exit(EX_OK);
		case 'h':
			usage(EX_OK);
		default:
			usage(EX_USAGE);
		}
	}
	if (optind != argc) {
		fprintf(stderr, "alpnd: unexpected argument: %s\n", argv[optind]);
		usage(EX_USAGE);
	}
	if (fb == NULL) {
		fprintf(stderr, "alpnd: --fallback is required\n");
		usage(EX_USAGE);
	}
	if ((certs == NULL) == (ac == NULL)) {
		fprintf(stderr, "alpnd: give one of --certs and --acme\n");
		usage(EX_USAGE);
	}
	if (acme_send_proxy && ac == NULL) {
		fprintf(stderr, "alpnd: --acme-send-proxy needs --acme\n");
		usage(EX_USAGE);
	}
	parse_addr(&fallback, fb);
	if (ac) {
		parse_addr(&acme, ac);
		have_acme = 1;
	}
	if (reload_pid)
		return reload_client(reload_pid);

	/*
	 * A relay writes to sockets that may be gone, and a log line may go
	 * to a pipe nobody reads any more: errors, never a fatal signal.
	 */
	signal(SIGPIPE, SIG_IGN);

	/* The connection: the LISTEN_FDS descriptor, or fd 0. */
	mypid = getpid();
	if ((env = getenv("LISTEN_FDS")) != NULL) {
		const char *pidenv = getenv("LISTEN_PID");

		if (pidenv && strtol(pidenv, NULL, 10) == (long)mypid) {
			if (strcmp(env, "1") != 0)
				die(EX_USAGE, "LISTEN_FDS=%s: expected exactly "
				    "one socket", env);
			fd = 3;
		}
	}
	sl = sizeof(acc);
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &sl) == -1) {
		if (errno == ENOTSOCK || errno == EBADF)
			die(EX_USAGE, "fd %d is not a socket: alpnd serves a "
			    "connection handed over by systemd (Accept=yes or "
			    "no), inetd or tcpserver; see alpnd(8)", fd);
		die(EX_USAGE, "fd %d: %s", fd, strerror(errno));
	}
	q_hello.timeout = hello_timeout;
	q_connect.timeout = hello_timeout;
	q_retry.timeout = RETRY_US;
	q_relay.timeout = idle_timeout;

	log_setup(fd);
	if (acc) {
		struct rlimit rl;
		sigset_t set;

		listening = 1;
		lfd = fd;
		listen_setup();
		/* Up to six descriptors a relay: take what we may have. */
		if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
			rl.rlim_cur = rl.rlim_max;
			(void)setrlimit(RLIMIT_NOFILE, &rl);
		}
		/*
		 * A relay holds six descriptors (two sockets, two pipes);
		 * keep 64 for the rest.  Beyond that, the reserve sheds.
		 */
		if (max_conn == 0 && getrlimit(RLIMIT_NOFILE, &rl) == 0)
			max_conn = rl.rlim_cur == RLIM_INFINITY ||
			    rl.rlim_cur > 6000000 ? 1000000 :
			    rl.rlim_cur > 64 + 6 * 16 ? (rl.rlim_cur - 64) / 6 : 16;
		sources_init();
		reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		(void)fcntl(lfd, F_SETFD, FD_CLOEXEC);
		/*
		 * accept_some() loops until EAGAIN; systemd (without
		 * NonBlocking=yes) and systemd-socket-activate hand over a
		 * blocking socket, which would block the whole loop.
		 */
		if ((acc = fcntl(lfd, F_GETFL)) == -1 ||
		    fcntl(lfd, F_SETFL, acc | O_NONBLOCK) == -1)
			die(EX_OSERR, "fcntl: %s", strerror(errno));
		if ((ep = epoll_create1(EPOLL_CLOEXEC)) == -1)
			die(EX_OSERR, "epoll_create1: %s", strerror(errno));
		/* An inherited SIG_IGN would reap children unseen. */
		signal(SIGCHLD, SIG_DFL);
		sigemptyset(&set);
		sigaddset(&set, SIGCHLD);
		sigaddset(&set, SIGTERM);
		sigaddset(&set, SIGINT);
		sigaddset(&set, SIGHUP);
		sigprocmask(SIG_BLOCK, &set, NULL);
		n = readlink("/proc/self/exe", self_path, sizeof(self_path) - 1);
		if (n > 0 && (size_t)n < sizeof(self_path) - 1)
			self_path[n] = '\0';
		else if (strchr(argv[0], '/') != NULL)
			snprintf(self_path, sizeof(self_path), "%s", argv[0]);
		if ((sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) == -1)
			die(EX_OSERR, "signalfd: %s", strerror(errno));
		if (ep_add(sfd, &signal_tag, EPOLLIN) == -1 ||
		    ep_add(lfd, &listener_tag, EPOLLIN) == -1)
			die(EX_OSERR, "epoll_ctl: %s", strerror(errno));
		logmsg(LOG_DEBUG, "listening-socket mode on fd %d", lfd);
		loop();
		over_summary(now_us(), 1);
		return EX_OK;
	}

	if ((c = conn_new(fd, now_us())) == NULL)
		die(EX_OSERR, "out of memory");
	/* The ClientHello is usually there already: try before any epoll. */
	hello_step(c, 0);
	if (single_done)
		return exit_code;
	if (!c->registered) {
		if (ep_add(fd, TAG_CLIENT(c), EV_CONN) == -1)
			die(EX_OSERR, "epoll_ctl: %s", strerror(errno));
		c->registered = 1;
	}
	loop();
	return exit_code;
}
