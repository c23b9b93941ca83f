/*
 * attack - hold many TCP connections to one address, for the attack suite
 * (tests/test_attack.py) and `make bench-attack` (tests/bench/attack).
 *
 *   attack -t IP:PORT [-s FIRST-SOURCE] [-n SOURCES] [-c CONNS] [-r RATE]
 *          [-m idle|trickle] [-H HELLO-FILE] [-i TRICKLE-MS] [-d SECS]
 *          [-L LATE-MS]
 *
 * Opens CONNS connections to IP:PORT (IPv4), spread round-robin over
 * SOURCES source addresses counted up from FIRST-SOURCE (127.1.0.1 by
 * default), at most RATE connect(2) calls a second (0: no limit), and
 * holds them.  idle: sends nothing.  trickle: sends HELLO-FILE one byte
 * every TRICKLE-MS milliseconds per connection (staggered), then waits.
 * Nothing is ever reopened.  Ends after SECS (default 30), or earlier
 * once every connection has been made and closed by the other side.
 *
 * Every 200 ms, and at the end, one line on stdout:
 *   tick t=SECS open=N maxopen=N connecting=N fin=N rst=N failed=N sent=BYTES
 * open: established and not closed by the server; fin / rst: closed by
 * the server with a FIN or a reset; failed: connect(2) failed.  The last
 * line starts with "done" and adds, for the connections the server closed
 * with a FIN and with a reset, their lifetimes from connect(2) to the
 * close seen here, in milliseconds (N, then min, median, 99th, max):
 *   fin_ms=N/MIN/P50/P99/MAX rst_ms=N/MIN/P50/P99/MAX
 *   late_ms=N/MIN/P50/P99/MAX soon_ms=N/MIN/P50/P99/MAX
 * late / soon: the closes (FIN or reset) after LATE-MS (default 1000) and
 * before.  A trickled byte that crosses the server's FIN on the way makes
 * the server answer with a reset, which recv(2) may report first: what
 * was closed at a deadline is told by its lifetime, not by FIN or reset.
 * Exit status 0, or 64 for a usage error, 71 for a system error.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT	24
#endif

enum cstate { C_NONE, C_CONNECTING, C_OPEN, C_FIN, C_RST, C_FAILED };

struct conn {
	int		 fd;
	enum cstate	 st;
	uint32_t	 sent;		/* bytes of the hello sent */
	int64_t		 t0;		/* connect(2) called, us */
	int64_t		 next;		/* next byte due, us */
};

static struct conn	*conns;
static int64_t		*fin_life, *rst_life, *late_life, *soon_life;
static int64_t		 late_us = 1000000;
static size_t		 nfin, nrst, nfailed, nopen, maxopen, nconnecting;
static size_t		 nlate, nsoon;
static unsigned long long sent_total;

int	main(int, char *[]);

static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void
usage(void)
{
	fputs("usage: attack -t IP:PORT [-s FIRST-SOURCE] [-n SOURCES] "
	    "[-c CONNS] [-r RATE]\n"
	    "              [-m idle|trickle] [-H HELLO-FILE] [-i TRICKLE-MS] "
	    "[-d SECS] [-L LATE-MS]\n", stderr);
	exit(64);
}

static void
die(const char *what)
{
	fprintf(stderr, "attack: %s: %s\n", what, strerror(errno));
	exit(71);
}

static int
cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

static void
quantiles(const char *name, int64_t *v, size_t n)
{
	if (n == 0) {
		printf(" %s=0/-/-/-/-", name);
		return;
	}
	qsort(v, n, sizeof(*v), cmp64);
	printf(" %s=%zu/%lld/%lld/%lld/%lld", name, n, (long long)v[0] / 1000,
	    (long long)v[n / 2] / 1000, (long long)v[n * 99 / 100] / 1000,
	    (long long)v[n - 1] / 1000);
}

static void
report(const char *tag, int64_t t0, int64_t now)
{
	printf("%s t=%.3f open=%zu maxopen=%zu connecting=%zu fin=%zu rst=%zu "
	    "failed=%zu sent=%llu", tag, (double)(now - t0) / 1e6, nopen,
	    maxopen, nconnecting, nfin, nrst, nfailed, sent_total);
	if (strcmp(tag, "done") == 0) {
		quantiles("fin_ms", fin_life, nfin);
		quantiles("rst_ms", rst_life, nrst);
		quantiles("late_ms", late_life, nlate);
		quantiles("soon_ms", soon_life, nsoon);
	}
	putchar('\n');
	fflush(stdout);
}

static void
closed(struct conn *c, enum cstate how, int64_t now)
{
	if (c->st == C_OPEN)
		nopen--;
	else
		nconnecting--;
	if (how == C_FIN)
		fin_life[nfin++] = now - c->t0;
	else if (how == C_RST)
		rst_life[nrst++] = now - c->t0;
	else
		nfailed++;
	if (how == C_FIN || how == C_RST) {
		if (now - c->t0 >= late_us)
			late_life[nlate++] = now - c->t0;
		else
			soon_life[nsoon++] = now - c->t0;
	}
	c->st = how;
	close(c->fd);	/* also takes it out of the epoll set */
	c->fd = -1;
}

static void
established(struct conn *c, int ep, int64_t now)
{
	struct epoll_event ev;

	nconnecting--;
	nopen++;
	if (nopen > maxopen)
		maxopen = nopen;
	(void)now;
	c->st = C_OPEN;
	ev.events = EPOLLIN | EPOLLRDHUP;
	ev.data.ptr = c;
	if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == -1)
		die("epoll_ctl");
}

static void
on_event(struct conn *c, uint32_t events, int ep, int64_t now)
{
	char buf[4096];
	socklen_t sl = sizeof(int);
	ssize_t n;
	int err = 0;

	if (c->st == C_CONNECTING) {
		if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) == -1)
			err = errno;
		if (err == ECONNRESET) {
			closed(c, C_RST, now);
			return;
		}
		if (err != 0) {
			closed(c, C_FAILED, now);
			return;
		}
		if ((events & EPOLLOUT) == 0)
			return;
		established(c, ep, now);
		/* a reset or FIN may already be waiting: look below */
	}
	if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) == 0)
		return;
	for (;;) {
		n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n > 0)
			continue;	/* whatever the server says: read on */
		if (n == 0)
			closed(c, C_FIN, now);
		else if (errno == ECONNRESET || errno == EPIPE)
			closed(c, C_RST, now);
		else if (errno != EAGAIN && errno != EINTR)
			closed(c, C_FAILED, now);
		return;
	}
}

static int
start_conn(struct conn *c, const struct sockaddr_in *src,
    const struct sockaddr_in *dst, int ep)
{
	struct epoll_event ev;
	int one = 1, fd;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd == -1) {
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS)
			return -1;
		die("socket");
	}
	(void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
	    sizeof(one));
	if (bind(fd, (const struct sockaddr *)src, sizeof(*src)) == -1)
		die("bind (the source address)");
	c->fd = fd;
	c->st = C_CONNECTING;
	c->t0 = now_us();
	nconnecting++;
	if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) == -1 &&
	    errno != EINPROGRESS) {
		closed(c, errno == ECONNRESET ? C_RST : C_FAILED, now_us());
		return 0;
	}
	ev.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP;
	ev.data.ptr = c;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == -1)
		die("epoll_ctl");
	return 0;
}

int
main(int argc, char *argv[])
{
	struct sockaddr_in dst, src;
	struct epoll_event evs[256];
	struct rlimit rl;
	struct stat st;
	const char *target = NULL, *first = "127.1.0.1", *mode = "idle";
	const char *hello_file = NULL;
	uint8_t *hello = NULL;
	size_t nconns = 1000, nsrc = 1, made = 0, i, hello_len = 0;
	double rate = 0, secs = 30;
	int64_t t0, now, end, next_tick, trickle_us = 500000, last_trickle;
	uint32_t base;
	char *colon;
	int ep, ch, n, trickle, fd;

	while ((ch = getopt(argc, argv, "t:s:n:c:r:m:H:i:d:L:")) != -1) {
		switch (ch) {
		case 't': target = optarg; break;
		case 's': first = optarg; break;
		case 'n': nsrc = strtoul(optarg, NULL, 10); break;
		case 'c': nconns = strtoul(optarg, NULL, 10); break;
		case 'r': rate = strtod(optarg, NULL); break;
		case 'm': mode = optarg; break;
		case 'H': hello_file = optarg; break;
		case 'i': trickle_us = strtoll(optarg, NULL, 10) * 1000; break;
		case 'd': secs = strtod(optarg, NULL); break;
		case 'L': late_us = strtoll(optarg, NULL, 10) * 1000; break;
		default: usage();
		}
	}
	if (target == NULL || (colon = strrchr(target, ':')) == NULL ||
	    nsrc == 0 || nconns == 0 || trickle_us <= 0 || secs <= 0)
		usage();
	trickle = strcmp(mode, "trickle") == 0;
	if (!trickle && strcmp(mode, "idle") != 0)
		usage();
	if (trickle) {
		if (hello_file == NULL)
			usage();
		if ((fd = open(hello_file, O_RDONLY)) == -1 ||
		    fstat(fd, &st) == -1 || st.st_size <= 0 ||
		    (hello = malloc(st.st_size)) == NULL ||
		    read(fd, hello, st.st_size) != st.st_size)
			die(hello_file);
		hello_len = st.st_size;
		close(fd);
	}
	memset(&dst, 0, sizeof(dst));
	dst.sin_family = AF_INET;
	dst.sin_port = htons((uint16_t)atoi(colon + 1));
	*colon = '\0';
	if (inet_pton(AF_INET, target, &dst.sin_addr) != 1)
		usage();
	memset(&src, 0, sizeof(src));
	src.sin_family = AF_INET;
	if (inet_pton(AF_INET, first, &src.sin_addr) != 1)
		usage();
	base = ntohl(src.sin_addr.s_addr);

	/* As many descriptors as we may have. */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
	if ((conns = calloc(nconns, sizeof(*conns))) == NULL ||
	    (fin_life = calloc(nconns, sizeof(*fin_life))) == NULL ||
	    (rst_life = calloc(nconns, sizeof(*rst_life))) == NULL ||
	    (late_life = calloc(nconns, sizeof(*late_life))) == NULL ||
	    (soon_life = calloc(nconns, sizeof(*soon_life))) == NULL)
		die("calloc");
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) == -1)
		die("epoll_create1");

	t0 = last_trickle = now_us();
	end = t0 + (int64_t)(secs * 1e6);
	next_tick = t0 + 200000;
	for (;;) {
		now = now_us();
		/* Connect as many as the rate allows by now. */
		for (i = 0; i < 128 && made < nconns && (rate <= 0 ||
		    (double)made < (double)(now - t0) * rate / 1e6 + 1); i++) {
			struct conn *c = &conns[made];

			src.sin_addr.s_addr = htonl(base + (uint32_t)(made % nsrc));
			if (start_conn(c, &src, &dst, ep) == -1) {
				/* out of descriptors: count it, go on */
				c->st = C_FAILED;
				nfailed++;
			}
			/* stagger the trickles over one interval */
			c->next = now + (int64_t)(made % 64) * trickle_us / 64;
			made++;
		}
		/* One byte for every trickling connection that is due. */
		if (trickle && now - last_trickle >= 10000) {
			last_trickle = now;
			for (i = 0; i < made; i++) {
				struct conn *c = &conns[i];

				if (c->st != C_OPEN || c->sent >= hello_len ||
				    c->next > now)
					continue;
				if (send(c->fd, hello + c->sent, 1,
				    MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
					c->sent++;
					sent_total++;
				} else if (errno == ECONNRESET || errno == EPIPE) {
					/* the reset is ours to count, not recv's */
					closed(c, C_RST, now);
					continue;
				}
				c->next = now + trickle_us;
			}
		}
		if (now >= next_tick) {
			report("tick", t0, now);
			next_tick += 200000;
		}
		if (now >= end ||
		    (made == nconns && nopen == 0 && nconnecting == 0))
			break;
		/* (128 connects at most between two looks at the events) */
		n = epoll_wait(ep, evs, sizeof(evs) / sizeof(evs[0]),
		    made < nconns ? (i == 128 ? 0 : 1) : 10);
		if (n == -1 && errno != EINTR)
			die("epoll_wait");
		now = now_us();
		for (ch = 0; ch < n; ch++)
			on_event(evs[ch].data.ptr, evs[ch].events, ep, now);
	}
	report("done", t0, now_us());
	return 0;
}
