# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make demo   -> installs into .venv, runs the default experiment (checkerboard, LSD), writes runs/demo
#   make test   -> installs into .venv, runs the whole test suite
# torch==2.13.0 is installed first where torch is missing, so that no multi-GB CUDA build is pulled.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test install fashion-mnist

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# the tests also cover the extras (TensorBoard logging, diffusers, Inception FID) and Fashion-MNIST (Debian's
# dataset-fashion-mnist); the fid extra's OpenCV needs libGL (Debian's libgl1)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,tensorboard,diffusers,fid]"
	@$(PY) -c "import cv2" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgl1 libglib2.0-0 >/dev/null; \
	  else echo "OpenCV (the fid extra) needs libGL: run 'sudo apt-get install libgl1 libglib2.0-0'" >&2; exit 1; fi; }
	touch $@

FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

fashion-mnist:
	@test -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi; }

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/flowmaps train --out runs/demo --overwrite

# two pytest-xdist workers, one torch thread each (tests/conftest.py), on the two cores
test: $(VENV)/.installed-test fashion-mnist
	$(PY) -m pytest -q -n 2
