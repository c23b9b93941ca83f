/*
 * log.c - where alpnd's log lines go (stderr, the journal's stream, or
 * syslog when stderr is the client), and untrusted text made safe for them.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "router.h"

pid_t		 mypid;
static int	 use_syslog, use_journal;
/*
 * Listening mode: informational lines (one per connection) wait up to
 * LOG_DELAY and leave together in one write(2).  A line written alone
 * wakes its reader (journald) each time: measured under systemd, that
 * write costs alpnd some 25 us per connection, 7% of its CPU.  Warnings
 * and errors go at once, with what waits before them.
 */
#define LOG_DELAY	(SEC / 20)
int		 log_hold;
int64_t		 log_due;	/* the held lines leave by then; 0: none */
static char	 held[32768];
static size_t	 nheld;

void
log_flush(void)
{
	size_t off = 0;
	ssize_t w;

	while (off < nheld) {
		w = write(STDERR_FILENO, held + off, nheld - off);
		if (w <= 0)
			break;	/* nowhere left to complain */
		off += (size_t)w;
	}
	nheld = 0;
	log_due = 0;
}

int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * SEC + ts.tv_nsec / 1000;
}

/*
 * Diagnostics go to stderr, one write(2) per line (listening mode: held
 * lines together, see log_hold), or to syslog when stderr is the client's
 * socket (inetd without a separate error stream).
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
	if (log_hold) {
		if (nheld + n > sizeof(held))
			log_flush();
		memcpy(held + nheld, buf, n);
		nheld += n;
		if (pri <= LOG_WARNING)
			log_flush();
		else if (log_due == 0)
			log_due = now_us() + LOG_DELAY;
		return;
	}
	if (write(STDERR_FILENO, buf, n) == -1)
		return;	/* nowhere left to complain */
}

void
logmsg(int pri, const char *fmt, ...)
{
	va_list ap;

	if (pri == LOG_DEBUG && opt->verbose < 2)
		return;
	va_start(ap, fmt);
	vlogmsg(pri, fmt, ap);
	va_end(ap);
}

void
die(int code, const char *fmt, ...)
{
	va_list ap;

	log_flush();
	log_hold = 0;
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

/*
 * Where log lines go: syslog when fd 2 is the very socket we serve (inetd
 * without an error stream), the journal's stream without our own prefix,
 * else stderr.  A closed fd 2 gets /dev/null, lest a backend socket become
 * "stderr".
 */
void
log_setup(int cfd)
{
	struct stat st;
	int fd;

	if (fstat(STDERR_FILENO, &st) == -1) {
		if (errno == EBADF &&
		    (fd = open("/dev/null", O_RDWR | O_CLOEXEC)) != -1 &&
		    fd != STDERR_FILENO) {
			(void)dup2(fd, STDERR_FILENO);
			close(fd);
		}
		return;
	}
	if (same_file(STDERR_FILENO, cfd)) {
		/* inetd/xinetd: stderr is the client; never write there. */
		use_syslog = 1;
		openlog("alpnd", LOG_PID, LOG_DAEMON);
		return;
	}
	/* journald adds "alpnd[PID]: " itself. */
	use_journal = stderr_is_journal();
}
