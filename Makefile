# emollama: `make demo` and `make test` are all a new user needs. `make help` lists the rest.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMOLLAMA := $(BIN)/emollama

# make extract DATASET=merr DATA=path/to/MERR STORE=stores/merr.zarr [PROFILE=paper|tiny] [WORKERS=0] [ARGS=...]
# (the paper's encoders by default; the demo passes --profile tiny itself)
DATASET ?= merr
DATA ?= demo/data
STORE ?= demo/store.zarr
PROFILE ?= paper
WORKERS ?= 0
ARGS ?=
DEMO_CLIPS ?= 120
STAGE1 ?= configs/demo-stage1.toml
STAGE2 ?= configs/demo-stage2.toml

.DEFAULT_GOAL := help
.PHONY: help venv demo demo-extract test test-fast docs extract train bench-store bench-extract bench-faces bench-scale bench-train bench-serve bench-timeline serve gpu-wheels bench-gpu clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	# facenet-pytorch declares torch<2.3 and numpy<2, yet runs on current ones: install it alone
	$(BIN)/pip install -q --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
	@touch $@

venv: $(VENV)/.installed ## Create the environment (.venv) if missing

demo: demo-extract train ## Offline demo on a synthetic sample: data, extraction, both training stages, eval (tiny models)
	$(EMOLLAMA) eval --run demo/runs/stage1 --dataset merr --data demo/data --split test
	@echo "report: demo/runs/stage1/eval/merr/report.md (tiny profile: a random test fixture, not a result)"

demo-extract: venv
	@test -f demo/data/MERR_coarse_grained.txt || $(EMOLLAMA) sample demo/data --clips $(DEMO_CLIPS)
	$(EMOLLAMA) extract --dataset merr --data demo/data --store demo/store.zarr --profile tiny \
		--workers $(WORKERS) --preview demo/preview $(ARGS)
	$(EMOLLAMA) store info demo/store.zarr
	@echo "NOTE: the tiny profile uses randomly initialised models: a test fixture, not a result."

# two processes, one test file each at a time: many tests wait on subprocesses, clusters and signals
PYTEST_PAR ?= -n 2 --dist loadfile

test: venv ## Run the test suite (what CI runs); PYTEST_PAR= runs it in one process
	$(BIN)/python -m pytest -q $(PYTEST_PAR)

test-fast: venv ## The tests not marked slow
	$(BIN)/python -m pytest -q $(PYTEST_PAR) -m "not slow"

docs: venv ## Rewrite docs/config.md from the config dataclasses (a test checks it is up to date)
	$(BIN)/python -m emollama.pipeline.configdoc docs/config.md

extract: venv ## Extract features: DATASET=merr|mer2023|dfew|folder DATA=dir STORE=path|url [PROFILE=paper (default)|tiny]
	$(EMOLLAMA) extract --dataset $(DATASET) --data $(DATA) --store $(STORE) --profile $(PROFILE) --workers $(WORKERS) $(ARGS)

# The demo's runs are rebuilt on every `make demo` (--overwrite); a run of any other config is never
# replaced: a second `make train STAGE1=...` stops and says how to go on (`emollama train -c ... --resume`
# or `--overwrite`).
demo_overwrite = $(if $(filter configs/demo-stage1.toml configs/demo-stage2.toml,$(1)),--overwrite)

train: venv ## Stage two, curriculum: STAGE1 then STAGE2 from it (default: the demo configs, tiny profile)
	@if [ "$(STAGE1)" = configs/demo-stage1.toml ] && [ ! -d demo/store.zarr ]; then $(MAKE) demo-extract; fi
	$(EMOLLAMA) train -c $(STAGE1) $(call demo_overwrite,$(STAGE1))
	$(EMOLLAMA) train -c $(STAGE2) $(call demo_overwrite,$(STAGE2))
	@echo "NOTE: the tiny profile uses a random LM and random encoders: a test fixture, not a result."

bench-store: venv ## Benchmark the feature store against npy-per-clip and HDF5 (not a test)
	$(BIN)/python scripts/bench_store.py $(ARGS)

bench-extract: venv ## Extraction on the sample (tiny): pipeline vs a clip-by-clip loop, P=1 vs P=2 preparation processes on a slow device; ARGS=--real-size adds real sizes
	$(BIN)/python scripts/bench_extract.py $(ARGS)

bench-faces: venv ## Face detection settings against full detection on the ten real clips: IoU, moved crops, speed-up
	$(BIN)/python scripts/bench_faces.py $(ARGS)

bench-scale: venv ## Benchmark extraction with 1 and 2 local dask workers: clips/s and scaling efficiency (not a test)
	$(BIN)/python scripts/bench_scale.py $(ARGS)

serve: venv ## Serve a run on http://127.0.0.1:8000/ (RUN=demo/runs/stage1 by default; ARGS=--token ...)
	$(EMOLLAMA) serve --run $${RUN:-demo/runs/stage1} $(ARGS)

bench-serve: venv ## Benchmark emollama serve: requests/s, p50/p95 latency for stored and new clips (tiny run; not a test)
	$(BIN)/python scripts/bench_serve.py $(ARGS)

bench-timeline: venv ## Benchmark emollama timeline: peak memory and time for 2- and 30-minute videos (tiny run; not a test)
	$(BIN)/python scripts/bench_timeline.py $(ARGS)

bench-train: venv ## Benchmark the training loop: batched + length-grouped vs batch 1 (not a test)
	$(BIN)/python scripts/bench_train.py $(ARGS)

gpu-wheels: ## Fetch cp312 wheels (.whl/) and sample clips (.bench/clips/) that bench-gpu needs on a bare, offline GPU machine
	bash scripts/gpu_wheels.sh

# No venv here: the GPU machine has its own python3 with torch; the wheels go to /tmp/site.
bench-gpu: ## On a lent GPU machine (carry .whl and .bench): both stages at paper size, random weights; ARGS=--cpu-smoke on a CPU
	@ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'make gpu-wheels' where PyPI is reachable, then carry [\".whl\", \".bench\"]"; exit 2; }
	$(PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	set -o pipefail; PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(PY) scripts/bench_gpu.py --clips .bench/clips $(ARGS) 2>&1 | tee "$${OUT:-/tmp}/bench_gpu.log"

clean: ## Remove the demo outputs (keeps .venv)
	rm -rf demo
