# Two commands on a fresh machine:  make run  |  make test
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PEERS   := storescu echoscu storescp dciodvfy Orthanc promtool systemd-analyze openssl
APT_PKGS := dcmtk orthanc dicom3tools prometheus systemd openssl

.PHONY: run test setup test-peers bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/dicom-node -c conf/node.yaml serve

test-peers:
	@missing=""; for t in $(PEERS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing test peers (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	  else echo "missing:$$missing; run: sudo apt-get install $(APT_PKGS)"; exit 1; fi; \
	fi

test: $(STAMP) test-peers
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) test-peers
	$(PY) bench/ingest.py && $(PY) bench/send.py && $(PY) bench/denoise.py && $(PY) bench/cardiac.py && $(PY) bench/cxr.py && $(PY) bench/memory.py

clean:
	rm -rf $(VENV) data .pytest_cache
