# `make demo` and `make test` each set up .venv (if missing or stale) first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): setup.py input/_fastcsv.c trainer/kernels.cc
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The fused row updates, compiled against the installed TensorFlow
	# (optional: without a C++ compiler, training uses TensorFlow's ops).
	-TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m trainer.kernels
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer.task --work_dir=work/demo

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf work .pytest_cache *.egg-info
