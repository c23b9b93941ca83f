/*
 * listen.c - listening-socket mode (systemd Accept=no): accept within the
 * bounds, stop (drain), reload (a new binary, same PID, relays kept), exit
 * when idle.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sysexits.h>
#include <unistd.h>

#include "router.h"
#include "sources.h"

#define ACCEPT_BATCH	64
#define SUMMARY_US	(10 * SEC)
#define DRAIN_GRACE	SEC	/* for children, past --drain */

char		 listener_tag, signal_tag;

static int	accept_some(int64_t, unsigned);
static void	stop_accepting(int64_t);
static void	reload(const struct signalfd_siginfo *);
static void	save_drainers(pid_t);
static int	signal_setup(void);
static int	 lfd = -1;	/* the listening socket */
static int	 sfd = -1;	/* signalfd: SIGCHLD, SIGTERM, SIGINT, SIGHUP */
static int	 listen_paused;
static int	 listen_sockopts;	/* accepted sockets inherit TCP_NODELAY,
				   SO_OOBINLINE */
static int64_t	 resume_at;
static enum {
	RUNNING,
	STOPPING,	/* SIGTERM: no new connections, relays end by drain_at */
	REPLACED	/* reloaded: this copy only finishes its relays */
}		 run_state;
static int64_t	 drain_at;
static size_t	 max_conn;	/* --max-conn, or from the descriptor limit */
static int	 reserve_fd = -1;	/* given up to shed a client on EMFILE */
static char	 self_path[4096];	/* the binary a reload executes */
static char	**self_argv;
/*
 * Children left by reloads, each finishing the relays it was handed; a
 * stop is passed on to them (systemd's KillMode=mixed signals only the
 * main process).  Kept across the re-execution in ALPND_DRAINING.
 */
static pid_t	 drainers[32];
static size_t	 ndrainers;
/* Connections closed at once for a bound, logged once per SUMMARY_US. */
static struct {
	unsigned long	 total, source, fds;
	unsigned long	 evicted;	/* waiting ones closed for newcomers */
	unsigned long	 lines;		/* lines for early ends this interval */
	unsigned long	 quiet;		/* early ends past LINES_MAX, not logged */
	unsigned long	 relayed, resets;	/* clean relays (relay_counted) */
	unsigned long long up, dn;	/* their bytes */
	int64_t		 log_at;	/* 0: nothing to say */
} over;
#define LINES_MAX	10	/* early ends logged one by one per SUMMARY_US */

/*
 * Children (responders, a reloaded copy's relays) still running?  Asked
 * of the kernel only while there may be some (a responder or a reload
 * since the last answer "none"): the loop asks after every event batch
 * that leaves no connection open, i.e. once per connection at c=1.
 */
int		 maybe_children = 1;	/* a previous image may have left some */

static int
children(void)
{
	siginfo_t si;

	if (!maybe_children)
		return 0;
	if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0)
		return 1;
	if (errno == ECHILD)
		maybe_children = 0;
	return 0;
}

void
on_signal(int64_t now)
{
	struct signalfd_siginfo si;
	size_t i;
	int status;
	pid_t pid;

	while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
		switch (si.ssi_signo) {
		case SIGTERM:
		case SIGINT:
			if (run_state != STOPPING) {
				stop_accepting(now);
				run_state = STOPPING;
				drain_at = now + opt->drain;
				for (i = 0; i < ndrainers; i++)
					(void)kill(drainers[i], SIGTERM);
			}
			break;
		case SIGHUP:
			if (run_state == RUNNING)
				reload(&si);
			break;
		}
	}
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (i = 0; i < ndrainers; i++)
			if (drainers[i] == pid)
				drainers[i] = drainers[--ndrainers];
		if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
			logmsg(LOG_DEBUG, "child %ld exited %d", (long)pid,
			    WEXITSTATUS(status));
	}
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
	long long secs;

	if (over.log_at == 0 || (!force && now < over.log_at))
		return;
	/*
	 * The interval began with the first thing counted (log_at is set
	 * SUMMARY_US after it); forced out early (exit, stop, reload), it is
	 * shorter, and the lines say so.
	 */
	secs = (now - (over.log_at - SUMMARY_US) + SEC / 2) / SEC;
	if (secs < 1)
		secs = 1;
	if (over.total + over.source + over.fds + over.evicted > 0)
		logmsg(LOG_WARNING, "over the bounds in the last %lld s: %lu "
		    "closed at once (%lu over --max-conn %zu, %lu over "
		    "--max-per-source %u, %lu short of descriptors, %lu waiting "
		    "for a ClientHello closed for newer ones)",
		    secs, over.total + over.source +
		    over.fds + over.evicted, over.total, max_conn, over.source,
		    opt->max_per_source, over.fds, over.evicted);
	if (over.quiet > 0)
		logmsg(LOG_WARNING, "in the last %lld s: %lu more connections "
		    "that ended without a complete ClientHello (silent, "
		    "reset, or timed out) not logged one by one",
		    secs, over.quiet);
	if (over.relayed > 0)
		logmsg(LOG_INFO, "in the last %lld s: %lu connections relayed "
		    "to the fallback (%lu ended in a reset), %llu bytes up, "
		    "%llu down", secs, over.relayed,
		    over.resets, over.up, over.dn);
	over.total = over.source = over.fds = over.evicted = 0;
	over.lines = over.quiet = 0;
	over.relayed = over.resets = 0;
	over.up = over.dn = 0;
	over.log_at = 0;
}

/*
 * A relay to the fallback that ended cleanly (or in the peers' own reset):
 * in listening mode, unless -v, counted for the summary line rather than
 * logged alone.  A busy host's journal would otherwise take a line per
 * visitor: journald's CPU (about 30 us per line measured under systemd,
 * some 3% of the whole machine's per connection), its rate limit
 * (journald.conf's RateLimitBurst=, per service: beyond it the warnings
 * are dropped with the rest) and its size limit, which rotates the other
 * services' lines away.  The web server logs the requests.
 */
void
relay_counted(const struct conn *c, int64_t now)
{
	over.relayed++;
	over.resets += strcmp(c->result, "reset") == 0;
	over.up += c->up.total;
	over.dn += c->dn.total;
	if (over.log_at == 0)
		over.log_at = now + SUMMARY_US;
}

/*
 * May a connection that ended before its ClientHello (silent, reset, timed
 * out: what a flood is made of) have a line of its own?  LINES_MAX per
 * interval do; the rest are counted in the summary.
 */
int
log_budget(int64_t now)
{
	if (over.log_at == 0)
		over.log_at = now + SUMMARY_US;
	if (over.lines < LINES_MAX) {
		over.lines++;
		return 1;
	}
	over.quiet++;
	return 0;
}

/*
 * --max-conn reached: the connection that has waited longest for its
 * ClientHello (the head of q_hello; not one accepted in this very batch)
 * makes room, reset and counted, not logged.  Only when none waits is the
 * newcomer refused, so idle connections cannot lock everyone else out:
 * that would take max_conn new ones per legitimate round trip.
 */
static int
evict_oldest(int64_t now)
{
	const struct linger lg = { 1, 0 };
	struct conn *old = q_hello.head;

	if (old == NULL || old->t0 >= now)
		return -1;
	(void)setsockopt(old->cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	old->quiet = 1;
	over.evicted++;
	if (over.log_at == 0)
		over.log_at = now + SUMMARY_US;
	finish(old, EX_TEMPFAIL, "closed for a newer connection");
	return 0;
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

	drop_spare_pipes();		/* a luxury now */
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

/*
 * Accept up to max connections: 1 when it stopped there (more may wait),
 * 0 when the queue is empty (EAGAIN) or accepting is paused.
 */
static int
accept_some(int64_t now, unsigned max)
{
	struct sockaddr_storage ss;
	struct source *src;
	socklen_t sl;
	struct conn *c;
	unsigned i;
	int fd;

	for (i = 0; i < max; i++) {
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
		if (nconn >= max_conn && evict_oldest(now) == -1) {
			shed(fd, &over.total, now);
			continue;
		}
		src = NULL;
		if (opt->max_per_source && !opt->accept_proxy &&
		    source_get((struct sockaddr *)&ss, opt->max_per_source,
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
		c->sockopts = listen_sockopts;
		if (ep_add(fd, TAG_CLIENT(c), EV_CONN) == -1) {
			finish(c, EX_OSERR, "epoll: %s", strerror(errno));
			continue;
		}
		c->registered = 1;
	}
	return 1;
}

/*
 * The listening socket is readable.  Accepting until EAGAIN costs a failed
 * accept4(2) per wake-up: per connection when they come one at a time.
 * Instead take up to accept_limit and let the listener, level-triggered,
 * be reported again when more wait.  The limit follows the queue: doubled
 * when the listener is reported again right after a batch that stopped at
 * the limit, halved when a batch empties the queue before it (a flood
 * reaches ACCEPT_BATCH in six wake-ups).
 */
static unsigned	 accept_limit = 1;
static int	 accept_full;	/* 1: this batch stopped at the limit;
				   2: the one before this event batch did */

void
accept_ready(int64_t now)
{
	if (accept_full == 2 && accept_limit < ACCEPT_BATCH)
		accept_limit *= 2;
	accept_full = accept_some(now, accept_limit);
	if (!accept_full && accept_limit > 1)
		accept_limit /= 2;
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
	while (!listen_paused && accept_some(now, ACCEPT_BATCH) && ++batches < 1024)
		;
	(void)epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
	close(lfd);
	lfd = -1;
	listen_paused = 0;
	logmsg(LOG_INFO, "stopping: %zu connections to finish, for up to "
	    "%lld s (--drain)", nconn, (long long)(opt->drain / SEC));
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
	drop_spare_pipes();
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
	maybe_children = 1;
	over_summary(now_us(), 1);	/* or both would count it */
	log_flush();		/* or both processes would write them */
	if ((pid = fork()) == -1) {
		logmsg(LOG_ERR, "reload: fork: %s", strerror(errno));
		goto out;
	}
	if (pid == 0) {
		mypid = getpid();
		ndrainers = 0;		/* those are our siblings now */
		run_state = REPLACED;
		(void)epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
		close(lfd);
		lfd = -1;
		listen_paused = 0;
		/*
		 * A signalfd wakes the epoll set that added it through the
		 * adder's signal queue: the one inherited is the parent's, and
		 * our own SIGTERM would never wake us.  A new one of our own.
		 */
		(void)epoll_ctl(ep, EPOLL_CTL_DEL, sfd, NULL);
		close(sfd);
		if (signal_setup() == -1)
			die(EX_OSERR, "reload: signalfd: %s", strerror(errno));
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
	save_drainers(pid);
	if (lfd == 3) {
		char v[24];

		snprintf(v, sizeof(v), "%ld", (long)mypid);
		(void)setenv("LISTEN_PID", v, 1);
		(void)setenv("LISTEN_FDS", "1", 1);
	}
	log_flush();
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

/* The drainers, and the new one, for the re-executed process. */
static void
save_drainers(pid_t pid)
{
	char list[sizeof(drainers) / sizeof(drainers[0]) * 12 + 1];
	size_t i, n = 0;

	if (ndrainers < sizeof(drainers) / sizeof(drainers[0]))
		drainers[ndrainers++] = pid;
	list[0] = '\0';
	for (i = 0; i < ndrainers; i++)
		n += snprintf(list + n, sizeof(list) - n, "%s%ld", i ? "," : "",
		    (long)drainers[i]);
	(void)setenv("ALPND_DRAINING", list, 1);
}

/* Those a previous process image left: ours to stop, not the responders'. */
static void
load_drainers(void)
{
	const char *s = getenv("ALPND_DRAINING");
	char *end;
	long v;

	while (s && *s && ndrainers < sizeof(drainers) / sizeof(drainers[0])) {
		v = strtol(s, &end, 10);
		if (end == s || v <= 1)
			break;
		drainers[ndrainers++] = (pid_t)v;
		s = *end == ',' ? end + 1 : end;
	}
	(void)unsetenv("ALPND_DRAINING");
}

/*
 * alpnd --reload PID OPTIONS...: the options are valid (we got here), so
 * ask PID to take them (SIGHUP; it reads them from our command line) and
 * wait for its answer.
 */
int
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

	if (resolve(&fallback_addr) == -1 || (acme_addr.spec && resolve(&acme_addr) == -1))
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

void
listen_save_argv(int argc, char *argv[])
{
	ssize_t n;

	if ((self_argv = calloc(argc + 1, sizeof(*self_argv))) == NULL)
		die(EX_OSERR, "out of memory");
	memcpy(self_argv, argv, argc * sizeof(*argv));
	n = readlink("/proc/self/exe", self_path, sizeof(self_path) - 1);
	if (n > 0 && (size_t)n < sizeof(self_path) - 1)
		self_path[n] = '\0';
	else if (strchr(argv[0], '/') != NULL)
		snprintf(self_path, sizeof(self_path), "%s", argv[0]);
}

/*
 * The descriptors: take what we may have (up to six a relay), then bound
 * the connections so that relays fit, with 64 to spare; beyond that the
 * reserve sheds.
 */
static void
limits_setup(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
	max_conn = opt->max_conn;
	if (max_conn == 0 && getrlimit(RLIMIT_NOFILE, &rl) == 0)
		max_conn = rl.rlim_cur == RLIM_INFINITY ||
		    rl.rlim_cur > 6000000 ? 1000000 :
		    rl.rlim_cur > 64 + 6 * 16 ? (rl.rlim_cur - 64) / 6 : 16;
	sources_init();
	reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/* SIGCHLD, SIGTERM, SIGINT, SIGHUP through a signalfd in the epoll set. */
static int
signal_setup(void)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if ((sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) == -1)
		return -1;
	return ep_add(sfd, &signal_tag, EPOLLIN);
}

/* Listening-socket mode, once, before the loop: fd is the socket. */
void
listen_start(int fd)
{
	int fl;

	lfd = fd;
	log_hold = 1;		/* lines leave in batches: log.c */
	load_drainers();
	listen_setup();
	limits_setup();
	(void)fcntl(lfd, F_SETFD, FD_CLOEXEC);
	/*
	 * accept_some() loops until EAGAIN; systemd (without NonBlocking=yes)
	 * and systemd-socket-activate hand over a blocking socket, which
	 * would block the whole loop.
	 */
	if ((fl = fcntl(lfd, F_GETFL)) == -1 ||
	    fcntl(lfd, F_SETFL, fl | O_NONBLOCK) == -1)
		die(EX_OSERR, "fcntl: %s", strerror(errno));
	/*
	 * The relay wants TCP_NODELAY and SO_OOBINLINE on every client
	 * socket; set on the listening socket (systemd's NoDelay=yes sets the
	 * first), accepted sockets inherit them: two setsockopt(2) calls
	 * here, not two per connection.
	 */
	{
		int one = 1, proto = 0;
		socklen_t pl = sizeof(proto);

		if (getsockopt(lfd, SOL_SOCKET, SO_PROTOCOL, &proto, &pl) == 0 &&
		    proto == IPPROTO_TCP && setsockopt(lfd, IPPROTO_TCP,
		    TCP_NODELAY, &one, sizeof(one)) == 0 && setsockopt(lfd,
		    SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one)) == 0)
			listen_sockopts = 1;
	}
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) == -1)
		die(EX_OSERR, "epoll_create1: %s", strerror(errno));
	/* An inherited SIG_IGN would reap children unseen. */
	signal(SIGCHLD, SIG_DFL);
	if (signal_setup() == -1 || ep_add(lfd, &listener_tag, EPOLLIN) == -1)
		die(EX_OSERR, "signals: %s", strerror(errno));
	logmsg(LOG_DEBUG, "listening-socket mode on fd %d", lfd);
}

/* The loop's next wake-up, given the connections' own (d). */
int64_t
listen_deadline(int64_t d, int64_t idle_since)
{
	if (run_state == RUNNING && opt->exit_idle >= 0 && nconn == 0 &&
	    idle_since + opt->exit_idle < d)
		d = idle_since + opt->exit_idle;
	if (run_state == STOPPING) {
		int64_t t = now_us() < drain_at ? drain_at :
		    drain_at + DRAIN_GRACE;

		if (t < d)
			d = t;
	}
	if (listen_paused && resume_at < d)
		d = resume_at;
	if (over.log_at && over.log_at < d)
		d = over.log_at;
	if (log_due && log_due < d)
		d = log_due;
	return d;
}

/*
 * After each event batch: the summary, the paused listener, and whether
 * to end (1): stopped or replaced and done, the drain over, or idle (with
 * a last look at the queue: a client that came just now is served).
 */
int
listen_tick(int64_t now, int64_t *idle_since)
{
	/* not reported again after a full batch: nobody was waiting */
	accept_full = accept_full == 1 ? 2 : 0;
	over_summary(now, 0);
	if (listen_paused && now >= resume_at) {
		if (ep_add(lfd, &listener_tag, EPOLLIN) == 0)
			listen_paused = 0;
		else
			resume_at = now + SEC / 10;
	}
	if (run_state != RUNNING) {
		if (nconn == 0 && !children())
			return 1;
		if (run_state == STOPPING && now >= drain_at && nconn > 0) {
			logmsg(LOG_WARNING, "stopping: %zu connections cut "
			    "after the drain (--drain %lld s)", nconn,
			    (long long)(opt->drain / SEC));
			forget_connections();
		}
		/*
		 * Children left: a reload's, draining by the same clock (each
		 * counts what it cuts), or a responder: wait a little longer,
		 * so that nothing outlives the main process (systemd would
		 * kill it uncounted, and on cgroup v1 wait for the empty
		 * cgroup until TimeoutStopSec=).
		 */
		return (nconn == 0 && !children()) ||
		    (run_state == STOPPING && now >= drain_at + DRAIN_GRACE);
	}
	if (nconn > 0 || (opt->exit_idle >= 0 && children())) {
		*idle_since = now;
		return 0;
	}
	if (opt->exit_idle >= 0 && now - *idle_since >= opt->exit_idle &&
	    !accept_some(now, ACCEPT_BATCH) && nconn == 0) {
		logmsg(LOG_DEBUG, "idle for %lld ms: exiting",
		    (long long)(opt->exit_idle / 1000));
		return 1;
	}
	return 0;
}

void
listen_end(void)
{
	over_summary(now_us(), 1);
	log_flush();
}
