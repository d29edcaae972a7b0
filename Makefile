# Set-up and entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel that lies on the development machines' disk; override for a GPU build,
# e.g. `make install TORCH="torch==2.5.1 --index-url ..."`.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all demo paper lint mutation clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[mpi,eval,dev,paper,latent,compress]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m ""

# The paper's tables and figures at small scale (docs/paper_tables.md); resumable, tens of minutes.
paper: install
	$(PY) benchmarks/paper_tables.py --jobs 2

# Mutation testing of the core equations (setup.cfg [mutmut]); not in CI: about 12 minutes on 2 cores.
# One OpenMP thread: mutmut forks its workers from a process whose torch ran OpenMP (libgomp)
# regions, and a forked child that enters one again can hang in gomp's barrier (seen: MKL's exp).
mutation: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) benchmarks/mutation_summary.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(PY) scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
