/*
 * tlsload - the load generator and helpers used by tests/bench/run.
 *
 *   tlsload rate  [-a IPV4] -p PORT -c CONC -d SECS [-w WARMUP] [-u PATH] [-m MINBYTES]
 *	(-a: the server's IPv4 address for rate, bulk, rawbulk and hold;
 *	default 127.0.0.1)
 *	new TLS connection per request (full handshake, no resumption),
 *	"GET PATH" with Connection: close, read to EOF; CONC threads.
 *	Counts completions inside the window after WARMUP, records each
 *	connection's latency from socket() to close().
 *   tlsload bulk  -p PORT [-u PATH]
 *	one TLS connection, GET PATH, read to EOF: bytes and seconds.
 *   tlsload rawbulk -p PORT
 *	send a genuine ClientHello (made by OpenSSL into memory), then
 *	discard everything the server sends (recv MSG_TRUNC) until EOF.
 *   tlsload source -f FILE -n BYTES
 *	raw bulk server for rawbulk: listens on 127.0.0.1:0 and prints the
 *	port; per connection reads one TLS record, then sendfile()s BYTES
 *	from FILE (repeating it), half-closes and waits for the peer's EOF.
 *   tlsload hold  -p PORT -n N [-u PATH]
 *	open N TLS connections, one keep-alive request each, print
 *	"ready N", hold them until stdin reaches EOF.
 *   tlsload cpuid
 *	the cost of one CPUID instruction (traps to the hypervisor in a VM).
 *   tlsload spawn -n N -- PROG ARGS... [:: PROG ARGS...]...
 *	inetd-style spawn benchmark: per iteration a loopback connection
 *	carrying a ClientHello is accepted, PROG is fork+exec'd with it on
 *	fd 0 and 1, the client reads to EOF, the child is reaped with
 *	wait4().  Reports the child's own CPU time (rusage) and the wall
 *	time fork..reap.  Argument "@BACKEND" in ARGS is replaced by the
 *	address of a built-in backend that reads the hello and answers
 *	with 100 bytes.
 *
 * Output: one JSON object on stdout.
 */
#include <sys/types.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

static void	usage(void);
static int	port;
static struct in_addr host = { .s_addr = 0 };	/* 0: loopback */
static int	conc = 1;
static double	secs = 3, warmup = 0.5;
static const char *path = "/small";
static long	minbytes = 1;
static SSL_CTX	*ctx;

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
die(const char *what)
{
	fprintf(stderr, "tlsload: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int
tcp_connect(int p)
{
	struct sockaddr_in sin;
	int fd, one = 1;

	if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(p);
	sin.sin_addr.s_addr = host.s_addr ? host.s_addr : htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) == -1) {
		close(fd);
		return -1;
	}
	return fd;
}

static void
ctx_init(void)
{
	static const unsigned char alpn[] = "\x02h2\x08http/1.1";

	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL) {
		ERR_print_errors_fp(stderr);
		exit(1);
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
	SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn) - 1);
}

/*
 * One request on a new TLS connection; returns bytes received or -1.
 * The response must be a 200 whose length matches its Content-Length.
 */
static long
one_request(const char *reqpath, int keep, SSL **keepssl, int *keepfd)
{
	char req[256], buf[65536], head[4096], *e, *cl;
	SSL *ssl = NULL;
	long total = 0, want = -1;
	size_t hlen = 0;
	int fd, n;

	if ((fd = tcp_connect(port)) == -1)
		return -1;
	if ((ssl = SSL_new(ctx)) == NULL)
		goto fail;
	SSL_set_fd(ssl, fd);
	SSL_set_tlsext_host_name(ssl, "bench.test");
	if (SSL_connect(ssl) != 1)
		goto fail;
	n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: bench.test\r\n"
	    "Connection: %s\r\n\r\n", reqpath, keep ? "keep-alive" : "close");
	if (SSL_write(ssl, req, n) != n)
		goto fail;
	for (;;) {
		n = SSL_read(ssl, buf, sizeof(buf));
		if (n <= 0) {
			int err = SSL_get_error(ssl, n);

			if (err == SSL_ERROR_ZERO_RETURN ||
			    (err == SSL_ERROR_SYSCALL && errno == 0) ||
			    err == SSL_ERROR_SSL)
				break;
			goto fail;
		}
		if (want < 0 && hlen < sizeof(head) - 1) {
			size_t k = sizeof(head) - 1 - hlen;

			if ((size_t)n < k)
				k = n;
			memcpy(head + hlen, buf, k);
			hlen += k;
			head[hlen] = '\0';
			if ((e = strstr(head, "\r\n\r\n")) != NULL) {
				if (strncmp(head, "HTTP/1.1 200", 12) != 0 ||
				    (cl = strcasestr(head, "\r\ncontent-length:"))
				    == NULL || cl > e)
					goto fail;
				want = (e + 4 - head) + atol(cl + 17);
			}
		}
		total += n;
		if (want >= 0 && total >= want && keep)
			break;
	}
	if (want < 0 || total != want || total < minbytes)
		goto fail;
	if (keep) {
		*keepssl = ssl;
		*keepfd = fd;
		return total;
	}
	SSL_free(ssl);
	close(fd);
	return total;
 fail:
	ERR_clear_error();
	SSL_free(ssl);
	close(fd);
	return -1;
}

struct worker {
	pthread_t	 tid;
	double		 mstart, end;
	double		*lat;
	size_t		 nlat, cap;
	long		 errors, total;
};

static void *
worker_main(void *arg)
{
	struct worker *w = arg;
	double t0, t1;

	for (;;) {
		t0 = now();
		if (t0 >= w->end)
			break;
		if (one_request(path, 0, NULL, NULL) < 0) {
			w->errors++;
			continue;
		}
		t1 = now();
		w->total++;
		if (t1 < w->mstart || t1 > w->end)
			continue;
		if (w->nlat == w->cap) {
			w->cap = w->cap ? w->cap * 2 : 4096;
			w->lat = realloc(w->lat, w->cap * sizeof(double));
			if (w->lat == NULL)
				die("realloc");
		}
		w->lat[w->nlat++] = t1 - t0;
	}
	return NULL;
}

static int
cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double
pct(const double *v, size_t n, double p)
{
	size_t i;

	if (n == 0)
		return 0;
	i = (size_t)(p * (n - 1) + 0.5);
	return v[i];
}

static int
do_rate(void)
{
	struct worker *w;
	double start, *all, sum = 0;
	size_t n = 0, k;
	long errors = 0, total = 0;
	int i;

	ctx_init();
	if ((w = calloc(conc, sizeof(*w))) == NULL)
		die("calloc");
	start = now();
	for (i = 0; i < conc; i++) {
		w[i].mstart = start + warmup;
		w[i].end = start + warmup + secs;
		if (pthread_create(&w[i].tid, NULL, worker_main, &w[i]) != 0)
			die("pthread_create");
	}
	for (i = 0; i < conc; i++) {
		pthread_join(w[i].tid, NULL);
		n += w[i].nlat;
		errors += w[i].errors;
		total += w[i].total;
	}
	if ((all = malloc((n + 1) * sizeof(double))) == NULL)
		die("malloc");
	for (i = 0, k = 0; i < conc; i++) {
		memcpy(all + k, w[i].lat, w[i].nlat * sizeof(double));
		k += w[i].nlat;
	}
	qsort(all, n, sizeof(double), cmpd);
	for (k = 0; k < n; k++)
		sum += all[k];
	printf("{\"conns\": %zu, \"total\": %ld, \"errors\": %ld, \"secs\": %.6f, "
	    "\"rate\": %.2f, \"mean_us\": %.1f, \"p50_us\": %.1f, "
	    "\"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f}\n",
	    n, total, errors, secs, n / secs, n ? sum / n * 1e6 : 0,
	    pct(all, n, .5) * 1e6, pct(all, n, .9) * 1e6,
	    pct(all, n, .99) * 1e6, n ? all[n - 1] * 1e6 : 0);
	return n > 0 && errors == 0 ? 0 : 1;
}

static int
do_bulk(void)
{
	double t0, t1;
	long got;

	ctx_init();
	t0 = now();
	got = one_request(path, 0, NULL, NULL);
	t1 = now();
	printf("{\"bytes\": %ld, \"secs\": %.6f}\n", got, t1 - t0);
	return got > 0 ? 0 : 1;
}

/* A real ClientHello from OpenSSL, written into a memory BIO. */
static size_t
make_hello(unsigned char *out, size_t cap)
{
	BIO *rb, *wb;
	SSL *ssl;
	char *p;
	long n;

	ctx_init();
	ssl = SSL_new(ctx);
	rb = BIO_new(BIO_s_mem());
	wb = BIO_new(BIO_s_mem());
	if (ssl == NULL || rb == NULL || wb == NULL)
		exit(1);
	SSL_set_bio(ssl, rb, wb);
	SSL_set_tlsext_host_name(ssl, "bench.test");
	SSL_set_connect_state(ssl);
	(void)SSL_do_handshake(ssl);
	n = BIO_get_mem_data(wb, &p);
	if (n <= 0 || (size_t)n > cap)
		exit(1);
	memcpy(out, p, n);
	SSL_free(ssl);
	return n;
}

static int
do_rawbulk(void)
{
	unsigned char hello[4096];
	static char buf[1 << 20];
	size_t hlen;
	double t0, t1;
	long total = 0;
	ssize_t n;
	int fd;

	hlen = make_hello(hello, sizeof(hello));
	t0 = now();
	if ((fd = tcp_connect(port)) == -1)
		die("connect");
	if (write(fd, hello, hlen) != (ssize_t)hlen)
		die("write");
	while ((n = recv(fd, buf, sizeof(buf), MSG_TRUNC)) > 0)
		total += n;
	t1 = now();
	close(fd);
	printf("{\"bytes\": %ld, \"secs\": %.6f}\n", total, t1 - t0);
	return n == 0 && total > 0 ? 0 : 1;
}

static int
listen_any(int *portp)
{
	struct sockaddr_in sin;
	socklen_t sl = sizeof(sin);
	int fd, one = 1;

	if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) == -1 ||
	    listen(fd, 1024) == -1 ||
	    getsockname(fd, (struct sockaddr *)&sin, &sl) == -1)
		die("listen");
	*portp = ntohs(sin.sin_port);
	return fd;
}

/* Read one TLS record (5-byte header + length); 0 on success. */
static int
read_record(int fd)
{
	unsigned char hdr[5], buf[16384 + 2048];
	size_t want, got = 0;
	ssize_t n;

	while (got < 5) {
		if ((n = read(fd, hdr + got, 5 - got)) <= 0)
			return -1;
		got += n;
	}
	want = (hdr[3] << 8) | hdr[4];
	if (want > sizeof(buf))
		return -1;
	got = 0;
	while (got < want) {
		if ((n = read(fd, buf + got, want - got)) <= 0)
			return -1;
		got += n;
	}
	return 0;
}

static void
do_source(const char *file, long long bytes)
{
	struct timeval tv = { 20, 0 };
	struct stat st;
	char buf[4096];
	long long left;
	off_t off;
	ssize_t n;
	int lfd, fd, ffd, p;

	if ((ffd = open(file, O_RDONLY | O_CLOEXEC)) == -1 ||
	    fstat(ffd, &st) == -1 || st.st_size == 0)
		die(file);
	lfd = listen_any(&p);
	printf("%d\n", p);
	fflush(stdout);
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		if ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) == -1)
			continue;
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		if (read_record(fd) == -1)
			goto next;
		left = bytes;
		off = 0;
		while (left > 0) {
			size_t chunk = st.st_size - off;

			if ((long long)chunk > left)
				chunk = left;
			if ((n = sendfile(fd, ffd, &off, chunk)) <= 0)
				break;
			left -= n;
			if (off >= st.st_size)
				off = 0;
		}
		shutdown(fd, SHUT_WR);
		while (read(fd, buf, sizeof(buf)) > 0)
			;
 next:
		close(fd);
	}
}

static int
do_hold(int count)
{
	SSL **ssl;
	int *fds, i;
	char c;

	ctx_init();
	if ((ssl = calloc(count, sizeof(*ssl))) == NULL ||
	    (fds = calloc(count, sizeof(*fds))) == NULL)
		die("calloc");
	for (i = 0; i < count; i++) {
		if (one_request(path, 1, &ssl[i], &fds[i]) < 0) {
			fprintf(stderr, "tlsload: hold: connection %d failed\n", i);
			return 1;
		}
	}
	printf("ready %d\n", count);
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	for (i = 0; i < count; i++) {
		SSL_free(ssl[i]);
		close(fds[i]);
	}
	return 0;
}

/* Built-in backend for spawn: read the hello record, answer, close. */
static void *
spawn_backend(void *arg)
{
	static const char resp[100] = "HTTP/1.1 200 OK\r\n";
	int lfd = *(int *)arg, fd;

	for (;;) {
		if ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) == -1)
			continue;
		if (read_record(fd) == 0)
			(void)!write(fd, resp, sizeof(resp));
		close(fd);
	}
	return NULL;
}

/* Spawn one inetd-style child for one connection; wall and child CPU. */
static int
spawn_one(int lfd, int lport, const unsigned char *hello, size_t hlen,
    char **argv, double *wall, double *cpu, double *flt)
{
	char buf[4096];
	struct rusage ru;
	double t0;
	int c, s, st;
	pid_t pid;

	if ((c = tcp_connect(lport)) == -1)
		die("connect");
	if (write(c, hello, hlen) != (ssize_t)hlen)
		die("write");
	if ((s = accept4(lfd, NULL, NULL, 0)) == -1)
		die("accept");
	t0 = now();
	if ((pid = fork()) == -1)
		die("fork");
	if (pid == 0) {
		int nul = open("/dev/null", O_RDWR);

		dup2(s, 0);
		dup2(s, 1);
		dup2(nul, 2);
		if (s > 2)
			close(s);
		execv(argv[0], argv);
		_exit(127);
	}
	close(s);
	while (read(c, buf, sizeof(buf)) > 0)
		;
	close(c);
	if (wait4(pid, &st, 0, &ru) == -1)
		die("wait4");
	*wall = now() - t0;
	*cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	    ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	*flt = ru.ru_minflt + ru.ru_majflt;
	return WIFEXITED(st) && WEXITSTATUS(st) != 127 ? 0 : -1;
}

/*
 * Programs separated by "::"; every iteration runs each of them once, in
 * rotating order, so that load from elsewhere hits them alike.  Reports,
 * per program, medians of wall and child CPU and the medians of the
 * per-iteration differences to the first program.
 */
#define MAXPROGS 8
static int
do_spawn(int iters, char **argv)
{
	unsigned char hello[4096];
	char bearg[64];
	char **prog[MAXPROGS];
	double *wall[MAXPROGS], *cpu[MAXPROGS], *flt[MAXPROGS], *d;
	pthread_t tid;
	size_t hlen;
	int lfd, bfd, lport, bport, i, j, k, np = 0, fails[MAXPROGS] = { 0 };

	hlen = make_hello(hello, sizeof(hello));
	lfd = listen_any(&lport);
	bfd = listen_any(&bport);
	snprintf(bearg, sizeof(bearg), "127.0.0.1:%d", bport);
	prog[np++] = argv;
	for (j = 0; argv[j] != NULL; j++) {
		if (strcmp(argv[j], "@BACKEND") == 0)
			argv[j] = bearg;
		else if (strcmp(argv[j], "::") == 0) {
			argv[j] = NULL;
			if (np == MAXPROGS)
				usage();
			prog[np++] = argv + j + 1;
		}
	}
	if (pthread_create(&tid, NULL, spawn_backend, &bfd) != 0)
		die("pthread_create");
	signal(SIGPIPE, SIG_IGN);
	for (k = 0; k < np; k++) {
		wall[k] = calloc(iters, sizeof(double));
		cpu[k] = calloc(iters, sizeof(double));
		flt[k] = calloc(iters, sizeof(double));
		if (wall[k] == NULL || cpu[k] == NULL || flt[k] == NULL)
			die("calloc");
	}
	if ((d = calloc(iters, sizeof(double))) == NULL)
		die("calloc");
	for (i = 0; i < iters; i++) {
		for (j = 0; j < np; j++) {
			k = (i + j) % np;
			if (spawn_one(lfd, lport, hello, hlen, prog[k],
			    &wall[k][i], &cpu[k][i], &flt[k][i]) == -1)
				fails[k]++;
		}
	}
	printf("{\"iters\": %d, \"progs\": [", iters);
	for (k = 0; k < np; k++) {
		double dc, dw;

		for (i = 0; i < iters; i++)
			d[i] = cpu[k][i] - cpu[0][i];
		qsort(d, iters, sizeof(double), cmpd);
		dc = pct(d, iters, .5);
		for (i = 0; i < iters; i++)
			d[i] = wall[k][i] - wall[0][i];
		qsort(d, iters, sizeof(double), cmpd);
		dw = pct(d, iters, .5);
		qsort(wall[k], iters, sizeof(double), cmpd);
		qsort(cpu[k], iters, sizeof(double), cmpd);
		qsort(flt[k], iters, sizeof(double), cmpd);
		printf("%s{\"prog\": \"%s\", \"fails\": %d, "
		    "\"wall_p50_us\": %.1f, \"wall_p90_us\": %.1f, "
		    "\"cpu_p50_us\": %.1f, \"cpu_p90_us\": %.1f, "
		    "\"cpu_diff_p50_us\": %.1f, \"wall_diff_p50_us\": %.1f, "
		    "\"faults_p50\": %.0f}",
		    k ? ", " : "", prog[k][0], fails[k],
		    pct(wall[k], iters, .5) * 1e6, pct(wall[k], iters, .9) * 1e6,
		    pct(cpu[k], iters, .5) * 1e6, pct(cpu[k], iters, .9) * 1e6,
		    dc * 1e6, dw * 1e6, pct(flt[k], iters, .5));
	}
	printf("]}\n");
	for (k = 0; k < np; k++)
		if (fails[k])
			return 1;
	return 0;
}

/*
 * The cost of one CPUID instruction: glibc runs a few dozen at every
 * program start (cpu features, cache sizes); in a VM each one traps to the
 * hypervisor, which is what a per-connection exec pays for that.
 */
static int
do_cpuid(void)
{
#if defined(__x86_64__) || defined(__i386__)
	unsigned int a, b, c, d, sink = 0;
	double t0;
	int i, n = 2000;

	t0 = now();
	for (i = 0; i < n; i++) {
		__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d)
		    : "a"(2), "c"(0));
		sink += a;
	}
	printf("{\"cpuid_us\": %.3f, \"sink\": %u}\n",
	    (now() - t0) / n * 1e6, sink & 1);
	return 0;
#else
	printf("{}\n");
	return 0;
#endif
}

static void
usage(void)
{
	fputs("usage: tlsload rate|bulk|rawbulk|hold|source|spawn [options]\n",
	    stderr);
	exit(64);
}

int
main(int argc, char *argv[])
{
	const char *mode, *file = NULL;
	long long bytes = 0;
	int ch, count = 0;

	if (argc < 2)
		usage();
	mode = argv[1];
	argv++;
	argc--;
	while ((ch = getopt(argc, argv, "a:c:d:f:m:n:p:u:w:")) != -1) {
		switch (ch) {
		case 'a':
			if (inet_pton(AF_INET, optarg, &host) != 1)
				usage();
			break;
		case 'c': conc = atoi(optarg); break;
		case 'd': secs = atof(optarg); break;
		case 'f': file = optarg; break;
		case 'm': minbytes = atol(optarg); break;
		case 'n': bytes = atoll(optarg); count = (int)bytes; break;
		case 'p': port = atoi(optarg); break;
		case 'u': path = optarg; break;
		case 'w': warmup = atof(optarg); break;
		default: usage();
		}
	}
	signal(SIGPIPE, SIG_IGN);
	if (strcmp(mode, "rate") == 0)
		return do_rate();
	if (strcmp(mode, "bulk") == 0)
		return do_bulk();
	if (strcmp(mode, "rawbulk") == 0)
		return do_rawbulk();
	if (strcmp(mode, "hold") == 0)
		return do_hold(count);
	if (strcmp(mode, "source") == 0 && file != NULL) {
		do_source(file, bytes);
		return 1;
	}
	if (strcmp(mode, "cpuid") == 0)
		return do_cpuid();
	if (strcmp(mode, "spawn") == 0 && optind < argc)
		return do_spawn(count, argv + optind);
	usage();
	return 64;
}
