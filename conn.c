/*
 * conn.c - one connection: [PROXY header] -> peek the ClientHello ->
 * decide -> connect the backend (or hand over to alpnd-respond); its
 * queues and deadlines, and its one log line.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>
#include <sys/socket.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sysexits.h>
#include <unistd.h>

#include "router.h"
#include "sources.h"

#define RETRY_US	(10 * 1000)	/* a backend's full accept queue: try again */

int		 listening;
size_t		 nconn;
struct queue	 q_hello, q_connect, q_retry, q_relay;
struct conn	*dead;
int		 exit_code;
int		 single_done;

static void	start_connect(struct conn *);

static const char *const route_name[] = { "-", "respond", "acme", "fallback" };
static uint8_t	 peekbuf[ALPN_WIRE_MAX];
static struct alpn_hello hello;

/* Queues: FIFO by deadline, since every queue has one fixed timeout. */
void
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

void
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

void
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
	fmt_sockaddr(buf, sz, (struct sockaddr *)&c->peer, c->peerlen);
}

void
log_conn(struct conn *c, int64_t now)
{
	char client[INET6_ADDRSTRLEN + 16];
	int64_t d = now - c->t0;

	if (opt->verbose < 0 && c->code == EX_OK)
		return;
	if (listening && opt->verbose == 0 && c->code == EX_OK &&
	    c->route == R_FALLBACK && c->state == S_RELAY) {
		relay_counted(c, now);
		return;
	}
	client_name(c, client, sizeof(client));
	logmsg(c->code == EX_OK ? LOG_INFO : LOG_WARNING,
	    "%s %s %s %s %llu %llu %lld.%03llds %s", client,
	    c->sni[0] ? c->sni : "-", c->alpn[0] ? c->alpn : "-",
	    route_name[c->route], (unsigned long long)c->up.total,
	    (unsigned long long)c->dn.total, (long long)(d / SEC),
	    (long long)(d % SEC / 1000), c->result);
}

/* Log the connection, close everything it holds, free it later. */
void
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
	if (!c->quiet)
		log_conn(c, now);
	q_remove(c);
	relay_unqueue(c);
	if (!listening) {
		/* One connection: exit(2) closes everything at once. */
		if (c->cfd != -1 && c->state != S_RELAY)
			(void)recv(c->cfd, peekbuf, sizeof(peekbuf),
			    MSG_DONTWAIT | MSG_TRUNC);
		exit_code = code;
		single_done = 1;
	} else {
		source_put(c->src);
		c->src = NULL;
		if (c->bfd != -1)
			close(c->bfd);
		if (c->cfd != -1) {
			/*
			 * Never relayed: discard what the client sent, so
			 * that the close is a FIN rather than a reset.
			 */
			if (c->state != S_RELAY)
				(void)recv(c->cfd, peekbuf, sizeof(peekbuf),
				    MSG_DONTWAIT | MSG_TRUNC);
			close(c->cfd);
		}
		c->bfd = c->cfd = -1;
		close_pipe(&c->up);
		close_pipe(&c->dn);
		nconn--;
	}
	c->state = S_DEAD;
	c->next = dead;
	dead = c;
}

/*
 * A connection that ended before its ClientHello: in listening mode its
 * line is subject to log_budget(), so a flood costs a summary, not a line
 * per connection.
 */
static void
finish_early(struct conn *c, int code, const char *why)
{
	c->quiet = listening && !log_budget(now_us());
	finish(c, code, "%s", why);
}

struct conn *
conn_new(int fd, int64_t now)
{
	struct conn *c;

	if ((c = malloc(sizeof(*c))) == NULL)
		return NULL;
	/* Only the head of the struct needs zeroing; strings start empty. */
	memset(c, 0, offsetof(struct conn, sni));
	c->sni[0] = c->alpn[0] = c->result[0] = '\0';
	c->cfd = fd;
	c->bfd = -1;
	c->up.p[0] = c->up.p[1] = c->dn.p[0] = c->dn.p[1] = -1;
	c->t0 = now;
	c->state = opt->accept_proxy ? S_PROXY : S_HELLO;
	q_append(&q_hello, c, now);
	nconn++;
	return c;
}

void
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
		log_escape(c->sni, sizeof(c->sni), hello.sni, hello.sni_len);
	if (hello.alpn == NULL)
		return;
	while (alpn_next_proto(&hello, &off, &name, &len)) {
		if (n + 2 >= sizeof(c->alpn))
			break;
		if (n)
			c->alpn[n++] = ',';
		n += log_escape(c->alpn + n, sizeof(c->alpn) - n, name, len);
	}
}

void
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
decide(struct conn *c, int acme_hello, const char *why)
{
	/* Ask now: once both sides have closed, getpeername(2) fails. */
	if ((opt->verbose >= 0 || opt->send_proxy || opt->acme_send_proxy) && !c->have_px)
		peer_addr(c);
	if (acme_hello) {
		if (opt->certs) {
			c->route = R_RESPOND;
			maybe_children = 1;	/* children() asks again */
			(listening ? respond_spawn : respond_exec)(c, now_us());
			return;
		}
		c->route = R_ACME;
		c->dst = &acme_addr;
	} else {
		c->route = R_FALLBACK;
		c->dst = &fallback_addr;
	}
	if (why)
		logmsg(LOG_DEBUG, "%s: relayed as is", why);
	c->ai = 0;
	c->connect_by = now_us() + opt->hello_timeout;
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

/*
 * --accept-proxy: the PROXY header in the first len bytes of peekbuf.
 * Consumed once whole; returns 1 when ClientHello bytes follow it, 0 to
 * wait for more, -1 when the connection is finished.
 */
static ssize_t
proxy_step(struct conn *c, size_t len, int hup)
{
	size_t need = 0;

	switch (alpn_parse_proxy(peekbuf, len, &c->px, &need)) {
	case ALPN_OK:
		break;
	case ALPN_NEED_MORE:
		if (hup || len == sizeof(peekbuf)) {
			finish(c, EX_DATAERR, "truncated PROXY header (%zu bytes)",
			    len);
			return -1;
		}
		set_lowat(c, need > ALPN_PROXY_MAX ? ALPN_PROXY_MAX : (int)need);
		return 0;
	default:
		finish(c, EX_DATAERR, "bad PROXY header");
		return -1;
	}
	if (consume(c->cfd, c->px.hdr_len) == -1) {
		finish(c, EX_IOERR, "reading the PROXY header failed");
		return -1;
	}
	c->have_px = !c->px.local && c->px.family != ALPN_PROXY_UNKNOWN;
	c->state = S_HELLO;
	if (len > c->px.hdr_len)
		return 1;
	set_lowat(c, 1);
	if (hup)
		finish(c, EX_DATAERR, "closed after the PROXY header");
	return hup ? -1 : 0;
}

void
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
				finish_early(c, EX_OK, "closed before any data");
			return;
		}
		if (errno == ECONNRESET)
			finish_early(c, EX_OK, "reset before any data");
		else
			finish(c, EX_IOERR, "recv: %s", strerror(errno));
		return;
	}
	if (n == 0) {
		if (opt->accept_proxy && c->state == S_HELLO)
			finish(c, EX_DATAERR, "closed after the PROXY header");
		else
			finish_early(c, EX_OK, "closed before any data");
		return;
	}
	len = n;

	if (c->state == S_PROXY) {
		if ((n = proxy_step(c, len, hup)) <= 0)
			return;
		p += c->px.hdr_len;
		len -= c->px.hdr_len;
	}

	st = alpn_parse_hello(p, len, &hello, &need);
	switch (st) {
	case ALPN_OK:
		fill_names(c);
		decide(c, hello.has_acme, NULL);
		return;
	case ALPN_NEED_MORE:
		if (hup)
			decide(c, 0, "ClientHello cut short by the client");
		else if (len == sizeof(peekbuf) - (size_t)(p - peekbuf))
			decide(c, 0, "ClientHello over the size cap");
		else	/* wake up only when enough has arrived: no spinning */
			set_lowat(c, need > ALPN_WIRE_MAX ? ALPN_WIRE_MAX :
			    (int)need);
		return;
	case ALPN_NOT_TLS:
		decide(c, 0, "not a TLS ClientHello");
		return;
	default:
		decide(c, 0, "malformed ClientHello");
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

void
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

void
expire(int64_t now)
{
	struct conn *c;

	while ((c = q_hello.head) && c->deadline <= now) {
		if (c->state == S_PROXY)
			finish_early(c, EX_TEMPFAIL,
			    "timeout waiting for the PROXY header");
		else
			finish_early(c, EX_TEMPFAIL,
			    "timeout waiting for the ClientHello");
	}
	while ((c = q_connect.head) && c->deadline <= now)
		connect_failed(c, ETIMEDOUT);
	while ((c = q_retry.head) && c->deadline <= now) {
		q_remove(c);
		start_connect(c);
	}
	while (opt->idle_timeout > 0 && (c = q_relay.head) && c->deadline <= now)
		finish(c, EX_TEMPFAIL, "idle timeout");
}

void
queues_init(void)
{
	q_hello.timeout = opt->hello_timeout;
	q_connect.timeout = opt->hello_timeout;	/* each address tried */
	q_retry.timeout = RETRY_US;
	q_relay.timeout = opt->idle_timeout;
}

int64_t
next_deadline(void)
{
	int64_t d = INT64_MAX;

	if (q_hello.head && q_hello.head->deadline < d)
		d = q_hello.head->deadline;
	if (q_connect.head && q_connect.head->deadline < d)
		d = q_connect.head->deadline;
	if (q_retry.head && q_retry.head->deadline < d)
		d = q_retry.head->deadline;
	if (opt->idle_timeout > 0 && q_relay.head && q_relay.head->deadline < d)
		d = q_relay.head->deadline;
	return d;
}
