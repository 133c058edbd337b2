# fleetd — the two commands README opens with, and their building blocks.
#   make demo   install what is missing, build the guest, start fleetd, run an 8x2 fleet, show it
#   make test   install what is missing, build the guest, run the whole test suite (CI runs this)
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
APT_PKGS := qemu-system-x86 gdb busybox-static socat
FLEETCTL := $(BIN)/fleetctl
PYTEST_ARGS ?=

.PHONY: demo test setup deps venv guest linux-guest stop soak bench clean

demo: setup
	@bash scripts/demo.sh

test: setup linux-guest
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: deps venv guest

deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	[ -x /bin/busybox ] || missing="$$missing busybox-static"; \
	command -v socat >/dev/null || missing="$$missing socat"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@command -v cargo >/dev/null || { echo "error: cargo (stable Rust) is needed to build the guest"; exit 1; }

venv: $(BIN)/fleetd

$(BIN)/fleetd: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

guest:
	$(MAKE) -s -C guest

# the Linux guest profile (Debian kernel + busybox initramfs, from apt; used by the slow tests)
linux-guest:
	guest/linux/build.sh

stop:
	-$(FLEETCTL) daemon stop --stop-guests

soak: setup
	# the long soak test sets its own per-test timeout (duration + margin)
	$(BIN)/python -m pytest -m soak $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	$(MAKE) -C guest clean
	rm -rf guest/linux/build
	rm -rf $(VENV) *.egg-info
