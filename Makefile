# tcpframe: build, demo, test, install. `make demo` and `make test` are the
# README's Quick start; .ci/run runs `make test`.

CARGO   ?= cargo
CC      ?= cc
PREFIX  ?= /usr/local
LIBDIR  := target/release
BUILD   := build
CFLAGS  := -std=c99 -Wall -Wextra -Wpedantic -Werror -O2 -g -Iinclude
LDLIBS  := -L$(LIBDIR) -ltcpframe -Wl,-rpath,$(CURDIR)/$(LIBDIR)
EXAMPLES := echo_server client chat_server select_daemon pipe relay unix_uid activated launcher

.PHONY: all lib examples demo test test-rust test-c-python install bench bench-python fuzz soak clean

all: lib examples

lib:
	$(CARGO) build --release
	@# Programs linked with -ltcpframe look for the soname at run time.
	ln -sf libtcpframe.so $(LIBDIR)/libtcpframe.so.0

$(LIBDIR)/libtcpframe.so $(LIBDIR)/libtcpframe.a: lib

$(BUILD)/%: examples-c/%.c include/tcpframe.h | lib
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS) -lpthread

examples: lib $(addprefix $(BUILD)/,$(EXAMPLES))

# examples-c/deploy/: the instance program rolling_restart.sh starts, where the
# script and tests/c/test_deploy.py look for it (build/c/instance).
.PHONY: deploy
deploy: lib
	@mkdir -p $(BUILD)/c
	$(CC) $(CFLAGS) examples-c/deploy/instance.c -o $(BUILD)/c/instance $(LDLIBS) -lpthread

# Starts the echo server, sends a few lines through the C client, stops it.
demo: examples
	@scripts/demo.sh

# Everything: format, lint, header check, Rust tests on both backends,
# fault injection, soak, C tests and examples (valgrind), Python package.
test:
	@scripts/test.sh

install: lib
	scripts/install.sh $(PREFIX)

bench:
	bench/run.sh

# Python hosts only: tcpframe's callback, pull and asyncio modes vs asyncio and uvloop.
bench-python:
	bench/python/run.sh

fuzz:
	scripts/fuzz.sh $${FUZZ_SECS:-300}

soak:
	SOAK_SECS=$${SOAK_SECS:-300} $(CARGO) run --release --example soak

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
