/*
 * relay.c - the relay: splice(2) from each socket through a pipe of its
 * own to the other, both directions in one process, half-close passed on,
 * resets passed on as resets, urgent bytes moved inline.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "router.h"

/*
 * Pipe sizes.  A pipe starts at the kernel's default (16 pages); a flow
 * that fills half of it in one splice(2) is moving bulk data and gets a
 * big pipe: fewer, larger splices and fewer wake-ups.  Relay CPU per GiB
 * on loopback (raw TCP, medians of interleaved transfers, 2 cores) with
 * 64 KiB / 256 KiB / 1 MiB pipes: 1.02 / 0.64 / 0.44 s under heavy load,
 * 0.94 / 0.58 / 0.45 s with little; the CPU of the whole transfer
 * (client + server + relay) moves less, 0-8%.  1 MiB is pipe-max-size's
 * default, the most an unprivileged process may ask for.
 *
 * The kernel charges pipe pages to the user (pipe-user-pages-soft, 16384
 * pages by default): once over it, growing fails (EPERM) and every new
 * pipe of that user gets 2 pages only.  So the pages that grown pipes
 * hold beyond the default are bounded per process (GROW_BUDGET, a quarter
 * of the default soft limit: 16 flows at 1 MiB), and a grown pipe shrinks
 * back before it goes to the spare pool.  /proc/sys is not read: the
 * shipped units hide it (ProcSubset=pid).  A failed F_SETPIPE_SZ keeps
 * the smaller pipe.
 */
#define PIPE_DEFAULT	65536
#ifndef PIPE_SIZE
#define PIPE_SIZE	(1024 * 1024)	/* pipe-max-size's default */
#endif
#ifndef GROW_BUDGET
#define GROW_BUDGET	(16 * 1024 * 1024)
#endif
#define PUMP_ROUNDS	16
#define COPY_LIMIT	(64 * 1024)	/* copied per direction, then spliced */

struct conn	*again;
static size_t	 pipe_ceiling = PIPE_SIZE;	/* lowered once asking failed */
static size_t	 grown;		/* bytes beyond the default, all flows */
static uint8_t	 copybuf[8192];	/* an empty pipe takes it whole (2 pages at least) */

/* Free pipes, kept in listening mode for the next connection. */
static struct {
	int		 p[2];
	size_t		 cap;
} spares[64];
static size_t	 nspares;

static void	relay_step(struct conn *);
static void	relay_done(struct conn *, int, int, int);
static int	pump(struct flow *, const struct flow *, int, int, int, int *,
		    int *);

/* Out of descriptors, or handing everything over: spare pipes go. */
void
drop_spare_pipes(void)
{
	while (nspares > 0) {
		nspares--;
		close(spares[nspares].p[0]);
		close(spares[nspares].p[1]);
	}
}

/* Off the list of relays to resume (the connection is finishing). */
void
relay_unqueue(struct conn *c)
{
	struct conn **pp;

	if (!c->queued)
		return;
	for (pp = &again; *pp; pp = &(*pp)->again)
		if (*pp == c) {
			*pp = c->again;
			break;
		}
	c->queued = 0;
}

void
close_pipe(struct flow *d)
{
	int *p = d->p;

	if (p[0] == -1)
		return;
	if (d->cap > PIPE_DEFAULT) {
		grown -= d->cap - PIPE_DEFAULT;
		/* Empty pipes may always shrink; the pool keeps small ones. */
		if (d->inpipe == 0 &&
		    fcntl(p[1], F_SETPIPE_SZ, PIPE_DEFAULT) == PIPE_DEFAULT)
			d->cap = PIPE_DEFAULT;
	}
	if (d->inpipe == 0 && d->cap <= PIPE_DEFAULT &&
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
	d->cap = 0;
}

static int
get_pipe(struct flow *d)
{
	d->nogrow = 0;
	if (nspares > 0) {
		nspares--;
		d->p[0] = spares[nspares].p[0];
		d->p[1] = spares[nspares].p[1];
		d->cap = spares[nspares].cap;
		return 0;
	}
	d->cap = PIPE_DEFAULT;
	return pipe2(d->p, O_NONBLOCK | O_CLOEXEC);
}

/*
 * A flow that filled half its pipe in one splice(2) gets a big pipe,
 * within the budget; short exchanges never pay for the fcntl(2).  Asked
 * once per flow: a refusal (pipe-max-size lowered, or the user over
 * pipe-user-pages-soft) keeps the pipe as it is, and the next flows ask
 * for a quarter as much.
 */
static void
grow_pipe(struct flow *d)
{
	long n;

	d->nogrow = 1;
	/*
	 * One process per connection: the budget is per process, the kernel's
	 * limit per user, so each asks for a quarter (256 pipes fill it).
	 */
	if (!listening && pipe_ceiling > PIPE_SIZE / 4)
		pipe_ceiling = PIPE_SIZE / 4;
	if (grown + pipe_ceiling - d->cap > GROW_BUDGET)
		return;
	if ((n = fcntl(d->p[1], F_SETPIPE_SZ, (int)pipe_ceiling)) == -1) {
		if (pipe_ceiling > 4 * PIPE_DEFAULT)
			pipe_ceiling /= 4;
		return;
	}
	if ((size_t)n > d->cap) {
		grown += (size_t)n - d->cap;
		d->cap = (size_t)n;
	}
}

/*
 * The PROXY header for the backend (alpn_build_proxy() writes it): the
 * client as received in an accepted PROXY header, else this connection's
 * own addresses; UNKNOWN (v1) or LOCAL (v2) for clients that are not TCP.
 */
static int
send_proxy_header(struct conn *c, int version)
{
	struct sockaddr_storage local;
	socklen_t llen = sizeof(local);
	const struct sockaddr_in *a4 = (const struct sockaddr_in *)&c->peer;
	const struct sockaddr_in *b4 = (const struct sockaddr_in *)&local;
	const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)&c->peer;
	const struct sockaddr_in6 *b6 = (const struct sockaddr_in6 *)&local;
	struct alpn_proxy px;
	uint8_t buf[ALPN_PROXY_BUILD_MAX];
	size_t n;
	ssize_t w;

	memset(&px, 0, sizeof(px));
	if (!c->have_px)
		peer_addr(c);
	if (c->have_px)
		px = c->px;
	else if (c->peerlen && getsockname(c->cfd, (struct sockaddr *)&local,
	    &llen) == 0 && local.ss_family == c->peer.ss_family) {
		if (local.ss_family == AF_INET) {
			px.family = ALPN_PROXY_TCP4;
			memcpy(px.src, &a4->sin_addr, 4);
			memcpy(px.dst, &b4->sin_addr, 4);
			px.sport = ntohs(a4->sin_port);
			px.dport = ntohs(b4->sin_port);
		} else if (local.ss_family == AF_INET6) {
			px.sport = ntohs(a6->sin6_port);
			px.dport = ntohs(b6->sin6_port);
			if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr) &&
			    IN6_IS_ADDR_V4MAPPED(&b6->sin6_addr)) {
				px.family = ALPN_PROXY_TCP4;
				memcpy(px.src, &a6->sin6_addr.s6_addr[12], 4);
				memcpy(px.dst, &b6->sin6_addr.s6_addr[12], 4);
			} else {
				px.family = ALPN_PROXY_TCP6;
				memcpy(px.src, &a6->sin6_addr, 16);
				memcpy(px.dst, &b6->sin6_addr, 16);
			}
		}
	}
	if ((n = alpn_build_proxy(buf, sizeof(buf), version, &px)) == 0)
		return -1;
	/* A fresh socket's send buffer takes these few bytes at once. */
	do
		w = send(c->bfd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (w == -1 && errno == EINTR);
	return w == (ssize_t)n ? 0 : -1;
}

void
start_relay(struct conn *c)
{
	int64_t now = now_us();
	int one = 1, proxy, moved = 0, more = 0, r;
	int waited = c->bregistered;	/* connected in S_CONNECT */

	set_lowat(c, 1);
	c->up.copy = c->dn.copy = 1;	/* pipes come when needed */
	if ((proxy = c->route == R_FALLBACK ? opt->send_proxy : opt->acme_send_proxy) &&
	    send_proxy_header(c, proxy) == -1) {
		finish(c, EX_IOERR, "cannot send the PROXY header");
		return;
	}
	/*
	 * Forward segments as they come, like the backend side: Nagle here
	 * would hold back the tail of a TLS flight until the client ACKs.
	 */
	if (c->peer.ss_family != AF_UNIX && !c->sockopts) {
		(void)setsockopt(c->cfd, IPPROTO_TCP, TCP_NODELAY, &one,
		    sizeof(one));
		/* recv(2) must not skip an urgent byte: see copy_some() */
		(void)setsockopt(c->cfd, SOL_SOCKET, SO_OOBINLINE, &one,
		    sizeof(one));
	}
	(void)setsockopt(c->bfd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one));
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
	q_append(&q_relay, c, now);
	/*
	 * The first step.  The ClientHello waits in the client's socket:
	 * copied with what came with it; a short read ends it (copy_some())
	 * unless an EOF or urgent byte was seen in an event already consumed
	 * (dispatch() notes those in every state).  A backend socket added
	 * to the epoll set just now is reported by epoll if anything is there
	 * already (EPOLL_CTL_ADD polls it): nothing to ask it yet.  One that
	 * connected in S_CONNECT may have had data in the event that said so:
	 * read until EAGAIN.
	 */
	r = pump(&c->up, &c->dn, c->cfd, c->bfd, 0, &moved, &more);
	if (r == 0 && waited)
		r = pump(&c->dn, &c->up, c->bfd, c->cfd, 1, &moved, &more);
	relay_done(c, r, moved, more);
}

/*
 * TCP urgent data: splice(2) stops at the urgent mark (it says EAGAIN, or
 * 0 once a FIN follows), so the byte there is moved by hand, inline
 * (SO_OOBINLINE): nothing after it is lost or stalled.  Checked when
 * splice claims EOF, and on EAGAIN only for a side that ever sent urgent
 * data (EPOLLPRI, in any state): the common path pays nothing.
 */
static int
urgent_step(struct flow *d, int src, int eof)
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

/*
 * The first COPY_LIMIT bytes of a direction (a TLS handshake, a small
 * request and answer) are copied with recv(2) and send(2): no pipe, two
 * calls per chunk, and a short read means the socket was empty (edge-
 * triggered epoll reports what comes later), which saves the call that
 * says EAGAIN.  Not so when an EOF or an urgent byte may be pending
 * (their edge may be one already consumed: dispatch() notes both in every
 * state, and recv(2) stops short at an urgent mark), or when the caller
 * asks for all (resuming a relay that had to wait its turn): then it
 * reads until EAGAIN or EOF.  SO_OOBINLINE is on, so recv(2) never drops
 * an urgent byte.  What send(2) does not take, and
 * everything after COPY_LIMIT, goes through a pipe as before.
 */
static int
copy_some(struct flow *d, int src, int dst, int all, int *moved, int *more)
{
	ssize_t n, w;
	int rounds = 0;

	for (;;) {
		if (++rounds > PUMP_ROUNDS) {
			*more = 1;
			return 0;
		}
		n = recv(src, copybuf, sizeof(copybuf), MSG_DONTWAIT);
		if (n == -1) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		if (n == 0) {
			d->eof = 1;
			return 0;
		}
		*moved = 1;
		d->total += n;
		do
			w = send(dst, copybuf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
		while (w == -1 && errno == EINTR);
		if (w == -1) {
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return -1;
			w = 0;
		}
		if (w < n || d->total >= COPY_LIMIT) {
			d->copy = 0;
			if (get_pipe(d) == -1)
				return -1;
			/* an empty pipe takes copybuf whole: the rest waits there */
			if (w < n) {
				if (write(d->p[1], copybuf + w, n - w) != n - w)
					return -1;
				d->inpipe = n - w;
			}
			return 0;
		}
		if ((size_t)n < sizeof(copybuf) && !all && !d->urg && !d->hup)
			return 0;
	}
}

static int
pump(struct flow *d, const struct flow *o, int src, int dst, int all,
    int *moved, int *more)
{
	ssize_t n;
	int progress, rounds = 0;

	if (d->copy && !d->eof) {
		if (copy_some(d, src, dst, all, moved, more) == -1)
			return -1;
		if (*more)
			return 0;
	}
	if (d->copy)
		goto tail;
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
				if (d->inpipe >= d->cap / 2 && !d->nogrow &&
				    d->cap < pipe_ceiling)
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
 tail:
	if (d->eof && d->inpipe == 0 && !d->shut) {
		/*
		 * Half-close: pass the EOF on once everything got through.
		 * In listening mode, when the other way has ended already,
		 * both sockets close next and close(2) sends this FIN (dst
		 * has nothing unread, and no other process holds it).  Not
		 * so per connection: the service manager may hold the
		 * client's socket too (systemd's Accept=yes does, until
		 * the unit ends), and only shutdown(2) sends the FIN now.
		 */
		if ((!o->shut || !listening) && shutdown(dst, SHUT_WR) == -1 &&
		    errno != ENOTCONN)
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
void
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
		r = pump(&c->up, &c->dn, c->cfd, c->bfd, events == 0, &moved,
		    &more);
	if (r == 0 && dn)
		r = pump(&c->dn, &c->up, c->bfd, c->cfd, events == 0, &moved,
		    &more);
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
	if (moved && opt->idle_timeout > 0)
		q_append(&q_relay, c, now_us());	/* LRU order */
	if (more && !c->queued) {
		/* Fairness: the others get their turn, then we go on. */
		c->queued = 1;
		c->again = again;
		again = c;
	}
}

void
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
