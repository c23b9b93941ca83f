/*
 * handoff.c - an acme-tls/1 ClientHello with --certs: alpnd-respond takes
 * the connection, ClientHello still unread in the socket.  Per connection
 * alpnd becomes the responder (execve, same PID); in listening-socket mode
 * it spawns one with the connection as fd 0.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/epoll.h>

#include <netinet/in.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "router.h"

extern char **environ;

#define CLIENT_MAX	(INET6_ADDRSTRLEN + 16)

/*
 * The responder's command line: it gets what is left of the hello
 * deadline (the whole of it once the hello is in).
 */
static void
responder_argv(struct conn *c, int64_t now, char *argv[6], char secs[32])
{
	static char opt_certs[] = "--certs", opt_timeout[] = "--hello-timeout";
	int64_t left = c->q == &q_hello ? c->deadline - now :
	    opt->hello_timeout;

	snprintf(secs, 32, "%lld",
	    (long long)(left <= 0 ? 1 : (left + SEC - 1) / SEC));
	argv[0] = (char *)(uintptr_t)opt->respond_path;
	argv[1] = opt_certs;
	argv[2] = (char *)(uintptr_t)opt->certs;
	argv[3] = opt_timeout;
	argv[4] = secs;
	argv[5] = NULL;
}

/*
 * Per connection: this process becomes the responder, same connection
 * (fd 0, or fd 3 with LISTEN_FDS/LISTEN_PID intact: the pid survives
 * execve).  The line logged before execve is the connection's one log
 * line, so a missing responder is found before it is written, not after.
 */
void
respond_exec(struct conn *c, int64_t now)
{
	char secs[32], *argv[6], client[CLIENT_MAX];
	int e;

	responder_argv(c, now, argv, secs);
	set_lowat(c, 1);
	if (access(opt->respond_path, X_OK) == -1) {
		finish(c, EX_UNAVAILABLE, "exec: %s: %s", strerror(errno),
		    opt->respond_path);
		return;
	}
	snprintf(c->result, sizeof(c->result), "exec %s", opt->respond_path);
	log_conn(c, now);
	if (c->nonblock)
		(void)fcntl(c->cfd, F_SETFL, O_RDWR);
	if (c->have_px) {
		/* The responder cannot see the PROXY header we ate. */
		client_name(c, client, sizeof(client));
		(void)setenv("ALPND_CLIENT", client, 1);
	} else		/* only ever from a PROXY header we accepted */
		(void)unsetenv("ALPND_CLIENT");
	signal(SIGPIPE, SIG_DFL);
	execve(opt->respond_path, argv, environ);
	e = errno;
	signal(SIGPIPE, SIG_IGN);
	finish(c, EX_UNAVAILABLE, "exec: %s: %s", strerror(e),
	    opt->respond_path);
}

/*
 * Our environment without LISTEN_* (that was our listening socket) and
 * ALPND_CLIENT, for responders in listening mode, with ALPND_CLIENT=client
 * at the end when client is not NULL.  Made once; the last slot is
 * rewritten per call.
 */
static char **
child_env(const char *client)
{
	static char **env, envclient[CLIENT_MAX + 16];
	static size_t n;
	size_t i;

	if (env == NULL) {
		for (i = 0; environ[i]; i++)
			;
		if ((env = calloc(i + 2, sizeof(*env))) == NULL)
			return NULL;
		for (i = 0; environ[i]; i++)
			if (strncmp(environ[i], "LISTEN_", 7) != 0 &&
			    strncmp(environ[i], "ALPND_CLIENT=", 13) != 0)
				env[n++] = environ[i];
	}
	env[n] = NULL;
	if (client) {
		snprintf(envclient, sizeof(envclient), "ALPND_CLIENT=%s",
		    client);
		env[n] = envclient;
	}
	return env;
}

/*
 * Listening mode: a child gets the connection as fd 0, blocking, default
 * signals.  posix_spawn(3) keeps us suspended until the exec, so no
 * descriptor of another connection lingers in a half-made child.  The
 * epoll registration goes first: it lives as long as the child's copy.
 */
void
respond_spawn(struct conn *c, int64_t now)
{
	char secs[32], *argv[6], client[CLIENT_MAX], **envp;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t set;
	pid_t pid;
	int e;

	responder_argv(c, now, argv, secs);
	set_lowat(c, 1);
	(void)epoll_ctl(ep, EPOLL_CTL_DEL, c->cfd, NULL);
	c->registered = 0;
	(void)fcntl(c->cfd, F_SETFL, O_RDWR);
	if (c->have_px)
		client_name(c, client, sizeof(client));
	if ((envp = child_env(c->have_px ? client : NULL)) == NULL) {
		e = ENOMEM;
		goto fail;
	}
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
	e = posix_spawn(&pid, opt->respond_path, &fa, &attr, argv, envp);
out:
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
fail:
	if (e != 0) {
		finish(c, e == ENOMEM ? EX_OSERR : EX_UNAVAILABLE,
		    "exec: %s: %s", strerror(e), opt->respond_path);
		return;
	}
	/* The child has the connection now: no draining its bytes. */
	close(c->cfd);
	c->cfd = -1;
	finish(c, EX_OK, "exec pid %ld %s", (long)pid, opt->respond_path);
}
