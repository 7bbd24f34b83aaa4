# scratchfs — `make demo` runs the sample, `make test` installs everything and runs the tests.
# Works as root on a fresh Debian 12 machine (apt packages are installed when missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
	squashfs-tools squashfs-tools-ng libsquashfs1 libsquashfs-dev squashfuse attr util-linux liblzo2-2

.PHONY: deps slurm-deps venv test demo lint bench clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py scratchfs/_fusehook.c scratchfs/squashfs/_blockload.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

# Slurm, munge and cron for the tests marked `slurm`; scrontab is built from Debian's source
# package of the installed version when missing (the harness does it idempotently).
slurm-deps: deps
	$(PYTHON) tests/slurm/harness.py install

test: venv slurm-deps
	SCRATCHFS_NO_SKIPS=1 $(PY) -m pytest

demo: venv
	$(PY) tools/demo.py

lint: venv
	$(VENV)/bin/ruff check scratchfs mountd tools tests
	$(VENV)/bin/mypy scratchfs mountd

bench: venv
	$(PY) tools/bench_read.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
