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
#include <sys/epoll.h>
#include <sys/socket.h>

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "router.h"

static char		 default_respond[] = ALPND_RESPOND_PATH;
static struct options	 o = {
	.respond_path = default_respond,
	.hello_timeout = 10 * SEC,
	.exit_idle = -1,
	.drain = 30 * SEC,
	.max_per_source = 1024,
};
const struct options *const opt = &o;

static void usage(int) __attribute__((noreturn));

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
	    "                            address (default 1024, 0: no limit)\n"
	    "  -R, --reload PID          have the alpnd PID (listening-socket mode) run again\n"
	    "                            with the options that follow, relays untouched\n"
	    "  -v, --verbose             log every connection (listening-socket mode sums\n"
	    "                            up clean relays otherwise); -vv: debugging detail\n"
	    "  -q, --quiet               log only what did not end cleanly, and errors\n"
	    "  -V, --version / -h, --help\n"
	    "ADDR: 192.0.2.1:8443, [2001:db8::1]:8443, localhost:8443, unix:/run/https.sock\n"
	    "The connection is fd 0 (inetd, tcpserver) or the LISTEN_FDS descriptor\n"
	    "(systemd); a listening socket there means listening-socket mode.\n", f);
	exit(code);
}

static int
proxy_version(const char *s, const char *name)
{
	if (strcmp(s, "v1") == 0 || strcmp(s, "1") == 0)
		return 1;
	if (strcmp(s, "v2") == 0 || strcmp(s, "2") == 0)
		return 2;
	die(EX_USAGE, "%s %s: expected v1 or v2", name, s);
}

static size_t
parse_count(const char *s, const char *name, unsigned long min)
{
	unsigned long v;
	char *end;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (*s < '0' || *s > '9' || *end != '\0' || errno || v < min ||
	    v > 1000000000UL)
		die(EX_USAGE, "%s %s: expected a number", name, s);
	return v;
}

static int64_t
parse_secs(const char *s, const char *name, int zero_ok)
{
	char *end;
	double d;

	errno = 0;
	d = strtod(s, &end);
	if (*s == '\0' || *end != '\0' || errno || !isfinite(d) || d < 0 ||
	    (d == 0 && !zero_ok) || d > 1e7)
		die(EX_USAGE, "%s %s: expected a number of seconds", name, s);
	return (int64_t)(d * SEC);
}

/* What the options say together; the addresses parsed. */
static void
check_options(const char *fb, const char *ac)
{
	if (fb == NULL) {
		fprintf(stderr, "alpnd: --fallback is required\n");
		usage(EX_USAGE);
	}
	if ((o.certs == NULL) == (ac == NULL)) {
		fprintf(stderr, "alpnd: give one of --certs and --acme\n");
		usage(EX_USAGE);
	}
	if (o.acme_send_proxy && ac == NULL) {
		fprintf(stderr, "alpnd: --acme-send-proxy needs --acme\n");
		usage(EX_USAGE);
	}
	parse_addr(&fallback_addr, fb);
	if (ac)
		parse_addr(&acme_addr, ac);
}

/*
 * The command line into o, once; *reload_pid for --reload PID.  Longer
 * than the rest: one case per option, beside the option table.
 */
static void
parse_options(int argc, char *argv[], pid_t *reload_pid)
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
	const char *fb = NULL, *ac = NULL;
	int ch;

	while ((ch = getopt_long(argc, argv, "f:d:a:pP:A:t:i:r:x:D:m:s:R:vqVh",
	    longopts, NULL)) != -1) {
		switch (ch) {
		case 'f':
			fb = optarg;
			break;
		case 'd':
			o.certs = optarg;
			break;
		case 'a':
			ac = optarg;
			break;
		case 'p':
			o.accept_proxy = 1;
			break;
		case 'P':
			o.send_proxy = proxy_version(optarg, "--send-proxy");
			break;
		case 'A':
			o.acme_send_proxy = proxy_version(optarg,
			    "--acme-send-proxy");
			break;
		case 't':
			o.hello_timeout = parse_secs(optarg, "--hello-timeout", 0);
			/* alpnd-respond's limit: refused here, not per ACME connection */
			if (o.hello_timeout > HELLO_TIMEOUT_MAX * SEC)
				die(EX_USAGE, "--hello-timeout %s: at most %d "
				    "seconds", optarg, HELLO_TIMEOUT_MAX);
			break;
		case 'i':
			o.idle_timeout = parse_secs(optarg, "--idle-timeout", 1);
			break;
		case 'r':
			o.respond_path = optarg;
			break;
		case 'x':
			o.exit_idle = parse_secs(optarg, "--exit-idle", 1);
			break;
		case 'D':
			o.drain = parse_secs(optarg, "--drain", 1);
			break;
		case 'm':
			o.max_conn = parse_count(optarg, "--max-conn", 1);
			break;
		case 's':
			o.max_per_source = parse_count(optarg, "--max-per-source", 0);
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
			*reload_pid = (pid_t)v;
			break;
		}
		case 'v':
			if (o.verbose < 2)
				o.verbose++;
			break;
		case 'q':
			o.verbose = -1;
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
	check_options(fb, ac);
}

/*
 * The connection (or the listening socket): the LISTEN_FDS descriptor, or
 * fd 0; and whether it is a listening socket.  Anything else is a usage
 * error.
 */
static int
connection_fd(int *listening_socket)
{
	socklen_t sl;
	int fd, n;

	if ((fd = inherited_fd(&n)) == -1)
		die(EX_USAGE, "LISTEN_FDS=%d: expected exactly one socket", n);
	sl = sizeof(*listening_socket);
	*listening_socket = 0;
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, listening_socket,
	    &sl) == -1) {
		if (errno == ENOTSOCK || errno == EBADF)
			die(EX_USAGE, "fd %d is not a socket: alpnd serves a "
			    "connection handed over by systemd (Accept=yes or "
			    "no), inetd or tcpserver; see alpnd(8)", fd);
		die(EX_USAGE, "fd %d: %s", fd, strerror(errno));
	}
	return fd;
}

int
main(int argc, char *argv[])
{
	struct conn *c;
	pid_t reload_pid = 0;
	int fd, acc;

	listen_save_argv(argc, argv);	/* before getopt_long() permutes it */
	parse_options(argc, argv, &reload_pid);
	if (reload_pid)
		return reload_client(reload_pid);

	/*
	 * A relay writes to sockets that may be gone, and a log line may go
	 * to a pipe nobody reads any more: errors, never a fatal signal.
	 */
	signal(SIGPIPE, SIG_IGN);
	mypid = getpid();
	fd = connection_fd(&acc);
	queues_init();
	log_setup(fd);
	if (acc) {
		listening = 1;
		listen_start(fd);
		loop();
		listen_end();
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
