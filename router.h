/*
 * router.h - what the files of alpnd (the router) share.
 *
 * The data path, file by file:
 *   alpnd.c	options, which mode, the first connection
 *   listen.c	listening-socket mode: accept, bounds, stop, reload
 *   conn.c	one connection: [PROXY header] -> peek the ClientHello
 *		-> decide -> connect the backend; deadlines; the log line
 *   handoff.c	acme-tls/1 with --certs: alpnd-respond takes the connection
 *   relay.c	splice(2) both ways through a pipe per direction
 *   loop.c	the event loop, for one connection or a listening socket
 *   addr.c	backend addresses: parse, resolve
 *   log.c	where log lines go, and how
 *   shared.c	what alpnd-respond uses too: log escaping, addresses in
 *		print, stderr and the journal, LISTEN_FDS
 *   sources.c	connections per client address (--max-per-source)
 *   alpnparse.c	the pure parsers: ClientHello, PROXY header (and its builder)
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#ifndef ROUTER_H
#define ROUTER_H

#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "alpnparse.h"
#include "shared.h"

#ifndef ALPND_VERSION
#define ALPND_VERSION		"unknown"
#endif
#ifndef ALPND_RESPOND_PATH
#define ALPND_RESPOND_PATH	"/usr/local/sbin/alpnd-respond"
#endif

#define SEC		1000000LL	/* times are in microseconds */

/* The options: written by alpnd.c's option parsing only, then read. */
struct options {
	const char	*certs;		/* --certs DIR, or NULL */
	const char	*respond_path;
	int		 accept_proxy;
	int		 send_proxy;	/* to the fallback: 0, 1 or 2 */
	int		 acme_send_proxy;	/* to --acme: 0, 1 or 2 */
	int64_t		 hello_timeout;
	int64_t		 idle_timeout;	/* 0: none */
	int64_t		 exit_idle;	/* -1: never */
	int64_t		 drain;		/* stop: relays may finish this long */
	size_t		 max_conn;	/* 0 until listen_start() sets it */
	unsigned	 max_per_source;	/* 0: no limit */
	int		 verbose;	/* -1 -q, 0, 1 -v (every connection), 2 -vv (debug) */
};
extern const struct options *const opt;

/* addr.c: backend addresses, resolved once (cached). */
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
extern struct addr	 fallback_addr, acme_addr;	/* acme_addr.spec NULL: none */

void	parse_addr(struct addr *, const char *);
int	resolve(struct addr *);

/* log.c */
extern pid_t	 mypid;
void	log_setup(int);
extern int	 log_hold;	/* listening mode: lines wait for log_flush() */
extern int64_t	 log_due;	/* ... until then at the latest (0: none held) */
void	log_flush(void);
void	logmsg(int, const char *, ...) __attribute__((format(printf, 2, 3)));
void	die(int, const char *, ...)
	    __attribute__((noreturn, format(printf, 2, 3)));
int64_t	now_us(void);

/* conn.c: one connection's state machine. */
enum state {
	S_PROXY,	/* waiting for the PROXY protocol header */
	S_HELLO,	/* peeking the ClientHello */
	S_CONNECT,	/* backend connect(2) in progress, or waiting to retry */
	S_RELAY,	/* splicing both ways */
	S_DEAD		/* finished, freed after the current event batch */
};

enum route {
	R_NONE,
	R_RESPOND,
	R_ACME,
	R_FALLBACK
};

/* One direction of a relay: src -> pipe -> dst. */
struct flow {
	int		 p[2];		/* pipe: [0] read end, [1] write end */
	size_t		 cap;		/* pipe capacity asked for */
	size_t		 inpipe;	/* bytes sitting in the pipe */
	uint64_t	 total;
	int		 eof;		/* src said EOF */
	int		 urg;		/* src got urgent data (EPOLLPRI) */
	int		 shut;		/* shutdown(dst, SHUT_WR) done */
	int		 nogrow;	/* its pipe asked to grow once */
	int		 copy;		/* still copying (recv/send), no pipe yet */
	int		 hup;		/* src reported RDHUP/HUP/ERR: EOF pending */
};

struct queue;
struct source;

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
	int64_t		 t0, deadline;
	struct addr	*dst;
	size_t		 ai;		/* address of dst being tried */
	int64_t		 connect_by;	/* a busy backend is retried until then */
	int		 cerr;		/* last connect error */
	struct flow	 up, dn;	/* client->backend, backend->client */
	struct sockaddr_storage peer;
	socklen_t	 peerlen;
	struct source	*src;		/* its client address, --max-per-source */
	struct alpn_proxy px;
	int		 have_px;	/* px holds a TCP4/TCP6 client */
	int		 quiet;		/* no line of its own (log_budget) */
	int		 sockopts;	/* TCP_NODELAY, SO_OOBINLINE on cfd (from
					   the listener) */
	/* from here on not zeroed by conn_new() */
	char		 sni[256];
	char		 alpn[128];
	int		 code;
	char		 result[96];
};

struct queue {
	struct conn	*head, *tail;
	int64_t		 timeout;	/* deadline = entry time + timeout */
};

extern int		 listening;	/* listening-socket mode */
extern size_t		 nconn;
extern struct queue	 q_hello, q_connect, q_retry, q_relay;
extern struct conn	*dead;		/* freed after each event batch */
extern int		 exit_code;	/* per-connection mode: the exit status */
extern int		 single_done;

void	queues_init(void);
void	q_remove(struct conn *);
void	q_append(struct queue *, struct conn *, int64_t);
struct conn *conn_new(int, int64_t);
void	finish(struct conn *, int, const char *, ...)
	    __attribute__((format(printf, 3, 4)));
void	hello_step(struct conn *, uint32_t);
void	connect_step(struct conn *);
void	peer_addr(struct conn *);
void	client_name(struct conn *, char *, size_t);
void	log_conn(struct conn *, int64_t);
void	set_lowat(struct conn *, int);
void	expire(int64_t);
int64_t	next_deadline(void);

/* handoff.c */
void	respond_exec(struct conn *, int64_t);
void	respond_spawn(struct conn *, int64_t);

/* relay.c */
extern struct conn	*again;		/* relays that stopped on their budget */
void	start_relay(struct conn *);
void	relay_event(struct conn *, int, uint32_t);
void	resume_relays(void);
void	close_pipe(struct flow *);
void	drop_spare_pipes(void);
void	relay_unqueue(struct conn *);

/* loop.c */
extern int	 ep;
int	ep_add(int, void *, uint32_t);
void	loop(void);
#define TAG_CLIENT(c)	((void *)(c))
#define TAG_BACKEND(c)	((void *)((char *)(c) + 1))
#define EV_CONN		(EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET)

/* listen.c */
extern char	 listener_tag, signal_tag;
void	listen_save_argv(int, char **);
void	listen_start(int);
void	accept_ready(int64_t);
void	on_signal(int64_t);
int64_t	listen_deadline(int64_t, int64_t);
int	listen_tick(int64_t, int64_t *);
extern int	 maybe_children;	/* a child may exist: ask waitid(2) */
int	log_budget(int64_t);
void	relay_counted(const struct conn *, int64_t);
void	listen_end(void);
int	reload_client(pid_t);

#endif /* ROUTER_H */
