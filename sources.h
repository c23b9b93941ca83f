/*
 * sources.h - connections held per client address (--max-per-source).
 *
 * Copyright (c) 2026 the alpnd authors.  ISC licence, see LICENSE.
 */
#ifndef SOURCES_H
#define SOURCES_H

struct sockaddr;
struct source;

void	sources_init(void);
int	source_get(const struct sockaddr *, unsigned, struct source **);
void	source_put(struct source *);

#endif /* SOURCES_H */
