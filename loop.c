/*
 * loop.c - the one event loop (epoll), for one connection or for a
 * listening socket.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "router.h"

#define MAX_EVENTS	64

int		 ep = -1;

int
ep_add(int fd, void *tag, uint32_t events)
{
	struct epoll_event ev;

	if (ep == -1 && (ep = epoll_create1(EPOLL_CLOEXEC)) == -1)
		return -1;
	ev.events = events;
	ev.data.ptr = tag;
	return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void
dispatch(void *tag, uint32_t events, int64_t now)
{
	struct conn *c;
	int backend;

	if (tag == &listener_tag) {
		accept_ready(now);
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
	/* an EOF may be pending although this edge is gone: copy_some() */
	if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		(backend ? &c->dn : &c->up)->hup = 1;
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
void
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
		if (listening)
			d = listen_deadline(d, idle_since);
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
		if (log_due && now >= log_due)
			log_flush();
		if (listening && listen_tick(now, &idle_since)) {
			log_flush();
			return;
		}
	}
}
