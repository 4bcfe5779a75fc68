# Two commands on a fresh machine:  make run  |  make test
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml synthetic/pyproject.toml | cksum | cut -d' ' -f1)
PEERS   := storescu echoscu storescp dciodvfy Orthanc promtool systemd-analyze openssl chromium npm
APT_PKGS := dcmtk orthanc orthanc-dicomweb dicom3tools prometheus systemd openssl chromium fonts-dejavu-core
# Debian's npm, only where no npm is installed: it conflicts with NodeSource's nodejs, which bundles one.
APT_NPM := $(if $(shell command -v npm),,npm)
# Test peers that are files, not commands on PATH (Orthanc plugins).
PEER_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
# A real Triton Inference Server for tests/test_kserve.py, in its own venv
# (nvidia-pytriton pins numpy<2), with the node's onnxruntime version.
TRITON_VENV ?= .venv-triton
# OHIF viewer for tests/test_viewer.py: npm's prebuilt static dist, fetched once
# into the ignored .cache/ohif/ (tests/viewer.py does the same when it is missing).
OHIF_VERSION := 3.13.2
OHIF_DIST := .cache/ohif/ohif-app-$(OHIF_VERSION)/dist
TRITON_STAMP := $(TRITON_VENV)/.installed-$(shell cat tests/kserve_server/requirements.txt | cksum | cut -d' ' -f1)

.PHONY: run test setup test-peers triton-server bench gpu-check clean install ohif docs-screenshots

setup: $(STAMP)

$(STAMP): pyproject.toml synthetic/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e ./synthetic
	rm -f $(VENV)/.installed-* && touch $@

triton-server: $(TRITON_STAMP)

$(TRITON_STAMP): tests/kserve_server/requirements.txt $(STAMP)
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r tests/kserve_server/requirements.txt \
	  "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	rm -f $(TRITON_VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/dicom-node -c conf/node.yaml serve

test-peers:
	@missing=""; for t in $(PEERS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	for f in $(PEER_FILES); do [ -f $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing test peers (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) $(APT_NPM) >/dev/null; \
	  else echo "missing:$$missing; run: sudo apt-get install $(APT_PKGS) $(APT_NPM)"; exit 1; fi; \
	fi

ohif: $(OHIF_DIST)/index.html

$(OHIF_DIST)/index.html: | $(STAMP)
	$(PY) -c 'import sys; sys.path.insert(0, "tests"); import viewer; print(viewer.ohif_dist(version="$(OHIF_VERSION)"))'

test: $(STAMP) $(TRITON_STAMP) test-peers ohif
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

# Refresh the README's viewer screenshots (docs/viewer-*.png) from a run of the viewer test.
docs-screenshots: $(STAMP) test-peers ohif
	VIEWER_SCREENSHOTS_TO_DOCS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_viewer.py

bench: $(STAMP) test-peers
	$(PY) bench/ingest.py && $(PY) bench/send.py && $(PY) bench/denoise.py && $(PY) bench/cardiac.py && $(PY) bench/cxr.py && $(PY) bench/memory.py

# On a GPU host: CUDA obtained for every model, CUDA = CPU within tolerance, throughput (bench/gpu.py).
gpu-check: $(STAMP)
	$(PY) bench/gpu.py

# Production install (root): user dicom-node, /opt/dicom-node/.venv,
# /etc/dicom-node/node.yaml, /var/lib/dicom-node, the systemd unit, enabled.
# See scripts/install.sh --help (DESTDIR=..., --gpu, --no-enable, --dry-run).
install:
	sh scripts/install.sh $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) data .pytest_cache
