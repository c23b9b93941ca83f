# alpnd - plain Makefile.  `make`, `make check`, `make demo`, `make bench`,
# `make fuzz FUZZ_SECONDS=N`, `make install DESTDIR=... PREFIX=...`.

VERSION		= 0.1.0
PREFIX		?= /usr/local
SBINDIR		?= $(PREFIX)/sbin
MANDIR		?= $(PREFIX)/share/man
DOCDIR		?= $(PREFIX)/share/doc/alpnd
SYSCONFDIR	?= /etc
SYSTEMDUNITDIR	?= $(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /lib/systemd/system)
RESPOND_PATH	?= $(SBINDIR)/alpnd-respond
# systemd reads sysusers.d and tmpfiles.d under /usr/lib and /usr/local/lib
SYSUSERSDIR	?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR	?= $(PREFIX)/lib/tmpfiles.d

CC		?= cc
CLANG		?= clang
CFLAGS		?= -O2 -g
WARN		= -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
		  -Wpointer-arith -Wcast-qual -Wwrite-strings -Wformat=2 -Wvla \
		  -Wimplicit-fallthrough -Wundef -Wold-style-definition
ifeq ($(CI),true)
WARN		+= -Werror
endif
HARDEN		= -fstack-protector-strong -fPIE -D_FORTIFY_SOURCE=2
LDHARDEN	= -pie -Wl,-z,relro,-z,now -Wl,--as-needed
DEFS		= -D_GNU_SOURCE -DALPND_VERSION='"$(VERSION)"' \
		  -DALPND_RESPOND_PATH='"$(RESPOND_PATH)"'
ALL_CFLAGS	= -std=c11 $(DEFS) $(WARN) $(HARDEN) $(CPPFLAGS) $(CFLAGS)
TLS_CFLAGS	= $(shell pkg-config --cflags gnutls libsystemd 2>/dev/null)
TLS_LIBS	= $(shell pkg-config --libs gnutls libsystemd 2>/dev/null || echo -lgnutls -lsystemd)
SAN		= -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_SECONDS	?= 60

PROGS		= alpnd alpnd-respond
ALPND_SRC	= alpnd.c listen.c conn.c handoff.c relay.c loop.c addr.c log.c sources.c shared.c alpnparse.c
RESPOND_SRC	= respond.c shared.c alpnparse.c
# Installed into DOCDIR/examples; placeholders substituted like the units'.
EXAMPLES	= default-alpnd dehydrated-hook haproxy-backend.cfg nginx-backend.conf \
		  tcpserver-run uacme-hook xinetd.alpnd \
		  alpnd-edge.conf alpnd-side.nft alpnd-side.service alpnd-side.socket
SUBST		= sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
		  -e 's|@DOCDIR@|$(DOCDIR)|g'

all: $(PROGS)

# The router runs once per connection: libc only, nothing else linked, and
# linked statically (static-pie keeps ASLR): no ld.so work at every start,
# measured ~0.13 ms CPU less per connection than the dynamic binary.
# The C library is a choice, not a guess from what is installed:
#   ALPND_LIBC=musl (the default; Debian's musl-tools): a static-pie alpnd
#     against musl, ~0.25 ms CPU per relayed connection in all, against
#     ~0.9 ms with glibc, whose own start-up runs dozens of CPUID
#     instructions (each a VM exit on a virtual machine).
#   ALPND_LIBC=glibc: static-pie against glibc (its linker warns about
#     getaddrinfo, used only for backend names: it needs the same glibc's
#     NSS modules at run time).  ALPND_LINK= for a dynamic build.
# make clean when switching.
ALPND_LIBC	?= musl
ifeq ($(ALPND_LIBC),musl)
MUSL_GCC	= $(shell command -v musl-gcc 2>/dev/null)
MUSL_DIR	?= $(if $(MUSL_GCC),$(shell sed -n 's|.*-specs "\(.*\)/musl-gcc.specs".*|\1|p' "$(MUSL_GCC)"))
ALPND_CC	= musl-gcc
ALPND_LINK	= -nostartfiles -Wl,-static,--no-dynamic-linker,-z,text \
		  $(MUSL_DIR)/rcrt1.o $(MUSL_DIR)/crti.o $(shell $(CC) -print-file-name=crtbeginS.o)
ALPND_LINK_END	= $(shell $(CC) -print-file-name=crtendS.o) $(MUSL_DIR)/crtn.o
ALPND_CHECK	= @test -n "$(MUSL_GCC)" || { echo "alpnd: ALPND_LIBC=musl (the default) needs musl-gcc:" \
		  "apt-get install musl-tools, or make ALPND_LIBC=glibc" >&2; exit 1; }
else ifeq ($(ALPND_LIBC),glibc)
ALPND_CC	= $(CC)
ALPND_LINK	?= -static-pie
ALPND_LINK_END	=
ALPND_CHECK	= @:
else
$(error ALPND_LIBC=$(ALPND_LIBC): expected musl or glibc)
endif
alpnd: $(ALPND_SRC) alpnparse.h sources.h router.h shared.h
	$(ALPND_CHECK)
	$(ALPND_CC) $(ALL_CFLAGS) $(LDHARDEN) $(ALPND_LINK) $(LDFLAGS) -o $@ $(ALPND_SRC) $(ALPND_LINK_END)

alpnd-respond: $(RESPOND_SRC) alpnparse.h shared.h
	$(CC) $(ALL_CFLAGS) $(TLS_CFLAGS) $(LDHARDEN) $(LDFLAGS) -o $@ $(RESPOND_SRC) $(TLS_LIBS)

# Sanitizer builds of everything, used by `make check` and the hostile suite.
build/asan/alpnd: $(ALPND_SRC) alpnparse.h sources.h router.h shared.h
	@mkdir -p build/asan
	$(CC) $(ALL_CFLAGS) $(SAN) -o $@ $(ALPND_SRC)

build/asan/alpnd-respond: $(RESPOND_SRC) alpnparse.h shared.h
	@mkdir -p build/asan
	$(CC) $(ALL_CFLAGS) $(TLS_CFLAGS) $(SAN) -o $@ $(RESPOND_SRC) $(TLS_LIBS)

build/parse_test: tests/parse_test.c alpnparse.c alpnparse.h
	@mkdir -p build
	$(CC) $(ALL_CFLAGS) -I. -o $@ tests/parse_test.c alpnparse.c

build/asan/parse_test: tests/parse_test.c alpnparse.c alpnparse.h
	@mkdir -p build/asan
	$(CC) $(ALL_CFLAGS) $(SAN) -I. -o $@ tests/parse_test.c alpnparse.c

# The attacker of the attack suite (tests/test_attack.py, make bench-attack).
build/attack: tests/attack.c
	@mkdir -p build
	$(CC) $(ALL_CFLAGS) -o $@ tests/attack.c

build/parse_bench: tests/parse_bench.c alpnparse.c alpnparse.h
	@mkdir -p build
	$(CC) -std=c11 $(DEFS) $(WARN) -O2 -I. -o $@ tests/parse_bench.c alpnparse.c

build/fuzz_hello: tests/fuzz_hello.c alpnparse.c alpnparse.h
	@mkdir -p build
	$(CLANG) -std=c11 -D_GNU_SOURCE -g -O1 -I. -fsanitize=fuzzer,address,undefined -o $@ tests/fuzz_hello.c alpnparse.c

build/fuzz_proxy: tests/fuzz_proxy.c alpnparse.c alpnparse.h
	@mkdir -p build
	$(CLANG) -std=c11 -D_GNU_SOURCE -g -O1 -I. -fsanitize=fuzzer,address,undefined -o $@ tests/fuzz_proxy.c alpnparse.c

build/fuzz_proxy_build: tests/fuzz_proxy_build.c alpnparse.c alpnparse.h
	@mkdir -p build
	$(CLANG) -std=c11 -D_GNU_SOURCE -g -O1 -I. -fsanitize=fuzzer,address,undefined -o $@ tests/fuzz_proxy_build.c alpnparse.c

deps:
	@tests/deps build check deb

asan: build/asan/alpnd build/asan/alpnd-respond build/asan/parse_test

check: deps
	@$(MAKE) --no-print-directory all asan build/parse_test build/parse_bench build/attack build/fuzz_hello build/fuzz_proxy build/fuzz_proxy_build
	@tests/run

# libFuzzer over both parsers and the PROXY builder (round trip through
# the parser); the corpus lives under tests/corpus/.
fuzz: build/fuzz_hello build/fuzz_proxy build/fuzz_proxy_build
	tests/fuzz-run $(FUZZ_SECONDS)

# alpnd, nginx stream and HAProxy under the same attack (tests/bench/attack):
# a few minutes, not part of `make bench`.
bench-attack:
	@tests/deps build check bench
	@$(MAKE) --no-print-directory all build/attack
	@tests/bench/attack

bench-parse: build/parse_bench
	build/parse_bench

demo:
	@tests/deps build demo
	@$(MAKE) --no-print-directory all ALPND_LIBC=$(ALPND_LIBC)
	@contrib/demo.sh

bench:
	@tests/deps build check bench
	@$(MAKE) --no-print-directory all build/parse_bench
	@tests/bench/run

install: all
	@# alpnd execs the responder by the path compiled into it
	@strings alpnd | grep -qxF '$(RESPOND_PATH)' || { \
		echo "alpnd was built for another RESPOND_PATH than $(RESPOND_PATH):" \
		    "run make clean, then make install with the same PREFIX/SBINDIR" >&2; \
		exit 1; }
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(SYSTEMDUNITDIR) \
	    $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(SYSCONFDIR)/default
	install -m 0755 alpnd alpnd-respond $(DESTDIR)$(SBINDIR)/
	install -m 0644 alpnd.8 alpnd-respond.8 $(DESTDIR)$(MANDIR)/man8/
	for u in units/*.socket units/*.service units/*.timer; do \
		$(SUBST) $$u > $(DESTDIR)$(SYSTEMDUNITDIR)/$${u#units/} || exit 1; \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$${u#units/}; \
	done
	$(SUBST) contrib/alpnd-redirect > $(DESTDIR)$(SBINDIR)/alpnd-redirect
	chmod 0755 $(DESTDIR)$(SBINDIR)/alpnd-redirect
	for f in $(EXAMPLES); do \
		$(SUBST) contrib/$$f > $(DESTDIR)$(DOCDIR)/examples/$$f || exit 1; \
		if [ -x contrib/$$f ]; then chmod 0755 $(DESTDIR)$(DOCDIR)/examples/$$f; \
		else chmod 0644 $(DESTDIR)$(DOCDIR)/examples/$$f; fi; \
	done
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	install -m 0644 packaging/sysusers.d/alpnd.conf $(DESTDIR)$(SYSUSERSDIR)/alpnd.conf
	install -m 0644 packaging/tmpfiles.d/alpnd.conf $(DESTDIR)$(TMPFILESDIR)/alpnd.conf
	@# the group alpnd-certs and the certificate directory, now (a package
	@# does this in its postinst)
	@if [ -n "$(DESTDIR)" ]; then \
		echo "DESTDIR is set: not creating the group and directory now; on the target run" \
		    "systemd-sysusers $(SYSUSERSDIR)/alpnd.conf && systemd-tmpfiles --create $(TMPFILESDIR)/alpnd.conf"; \
	else \
		echo "systemd-sysusers $(SYSUSERSDIR)/alpnd.conf && systemd-tmpfiles --create $(TMPFILESDIR)/alpnd.conf"; \
		systemd-sysusers $(SYSUSERSDIR)/alpnd.conf && systemd-tmpfiles --create $(TMPFILESDIR)/alpnd.conf; \
	fi
	[ -e $(DESTDIR)$(SYSCONFDIR)/default/alpnd ] || \
	    $(SUBST) contrib/default-alpnd > $(DESTDIR)$(SYSCONFDIR)/default/alpnd

# $(SYSCONFDIR)/default/alpnd is configuration: uninstall leaves it, and
# the group alpnd-certs and the certificate directory too.
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/alpnd $(DESTDIR)$(SBINDIR)/alpnd-respond $(DESTDIR)$(SBINDIR)/alpnd-redirect
	rm -f $(DESTDIR)$(MANDIR)/man8/alpnd.8 $(DESTDIR)$(MANDIR)/man8/alpnd-respond.8
	for u in units/*.socket units/*.service units/*.timer; do rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/$${u#units/}; done
	for f in $(EXAMPLES); do rm -f $(DESTDIR)$(DOCDIR)/examples/$$f; done
	rm -f $(DESTDIR)$(DOCDIR)/README.md
	rm -f $(DESTDIR)$(SYSUSERSDIR)/alpnd.conf $(DESTDIR)$(TMPFILESDIR)/alpnd.conf
	rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null || true

clean:
	rm -rf $(PROGS) build

.PHONY: all asan check fuzz bench bench-attack bench-parse demo deps install uninstall clean

# The Debian package (debian/), built from a copy of this tree in build/deb
# so the tree's own build is left alone; ./alpnd_VERSION_ARCH.deb is the
# result: `make deb && sudo apt-get install ./alpnd_*.deb`.
# DPKG_BUILDPACKAGE_OPTS="-us -uc" builds the source package too.
DPKG_BUILDPACKAGE_OPTS ?= -us -uc -b
deb:
	@tests/deps deb
	rm -rf build/deb && mkdir -p build/deb/src
	tar -c --exclude=./build --exclude=./.git --exclude='./*.deb' . | tar -x -C build/deb/src
	cd build/deb/src && dpkg-buildpackage $(DPKG_BUILDPACKAGE_OPTS)
	rm -f alpnd_*.deb
	cp build/deb/alpnd_*.deb .
.PHONY: deb

# valgrind memcheck over the main paths (relay, ACME exec, bad hello,
# PROXY, deadline, listening mode): slow, so not part of `make check`.
# memcheck needs a dynamic alpnd (it replaces malloc in libc.so).
build/valgrind/alpnd: $(ALPND_SRC) alpnparse.h sources.h router.h shared.h
	@mkdir -p build/valgrind
	$(CC) $(ALL_CFLAGS) $(LDHARDEN) $(LDFLAGS) -o $@ $(ALPND_SRC)

valgrind: all build/valgrind/alpnd
	@tests/deps build check
	ALPND_VALGRIND=1 /usr/bin/python3 -m pytest -c tests/pytest.ini tests/test_hostile.py -k valgrind
.PHONY: valgrind
