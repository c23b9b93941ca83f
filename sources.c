/*
 * sources.c - connections held per client address (listening-socket mode),
 * for --max-per-source.  A chained hash table keyed by the IPv6 (or
 * IPv4-mapped) address, salted at start so that a client cannot choose
 * addresses that land in one chain.  An entry lives while its address
 * holds a connection.  No I/O, no logging.
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#include <sys/socket.h>
#include <sys/random.h>

#include <netinet/in.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sources.h"

#define NBUCKETS	4096		/* a power of two */

struct source {
	struct source	*next;
	uint8_t		 addr[16];	/* IPv6, IPv4 as ::ffff:a.b.c.d */
	unsigned	 n;		/* connections held */
};

static struct source	*bucket[NBUCKETS];
static uint64_t		 salt;

void
sources_init(void)
{
	if (getrandom(&salt, sizeof(salt), GRND_NONBLOCK) != sizeof(salt))
		salt = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ULL;
}

/* The address as 16 bytes; 0 for what is not IP (unix sockets). */
static int
key(const struct sockaddr *sa, uint8_t k[16])
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;

	if (sa->sa_family == AF_INET6) {
		memcpy(k, &sin6->sin6_addr, 16);
		return 1;
	}
	if (sa->sa_family == AF_INET) {
		memset(k, 0, 10);
		k[10] = k[11] = 0xff;
		memcpy(k + 12, &sin->sin_addr, 4);
		return 1;
	}
	return 0;
}

/* FNV-1a over the salt and the address. */
static size_t
hash(const uint8_t k[16])
{
	uint64_t h = 0xcbf29ce484222325ULL ^ salt;
	size_t i;

	for (i = 0; i < 16; i++) {
		h ^= k[i];
		h *= 0x100000001b3ULL;
	}
	return (size_t)(h ^ h >> 32) & (NBUCKETS - 1);
}

/*
 * Count one more connection from sa, unless that address already holds
 * max: *src is then the entry to give back with source_put() (NULL for a
 * client that is not IP, or when memory ran out: not counted).  Returns
 * 0, or -1 when the address is at max.
 */
int
source_get(const struct sockaddr *sa, unsigned max, struct source **src)
{
	struct source *s;
	uint8_t k[16];
	size_t b;

	*src = NULL;
	if (!key(sa, k))
		return 0;
	b = hash(k);
	for (s = bucket[b]; s; s = s->next)
		if (memcmp(s->addr, k, 16) == 0)
			break;
	if (s == NULL) {
		if ((s = calloc(1, sizeof(*s))) == NULL)
			return 0;
		memcpy(s->addr, k, 16);
		s->next = bucket[b];
		bucket[b] = s;
	}
	if (s->n >= max)
		return -1;
	s->n++;
	*src = s;
	return 0;
}

void
source_put(struct source *src)
{
	struct source **pp;
	size_t b;

	if (src == NULL || --src->n > 0)
		return;
	b = hash(src->addr);
	for (pp = &bucket[b]; *pp; pp = &(*pp)->next)
		if (*pp == src) {
			*pp = src->next;
			free(src);
			return;
		}
}
