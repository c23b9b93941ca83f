/*
 * shared.h - what alpnd and alpnd-respond both need (libc only: the router
 * links nothing else).
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#ifndef SHARED_H
#define SHARED_H

#include <sys/socket.h>

#include <stddef.h>
#include <stdint.h>

/* --hello-timeout: alpnd passes what is left of it to alpnd-respond. */
#define HELLO_TIMEOUT_MAX	3600	/* seconds */

size_t	log_escape(char *, size_t, const uint8_t *, size_t);
void	fmt_sockaddr(char *, size_t, const struct sockaddr *, socklen_t);
int	same_file(int, int);
int	stderr_is_journal(void);
int	inherited_fd(int *);

#endif /* SHARED_H */
