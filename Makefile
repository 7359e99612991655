# Egret developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto')

.DEFAULT_GOAL := help

help: ## List every target with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet 'grpcio-tools>=1.66' 'mypy-protobuf>=3.6'
	$(MAKE) --no-print-directory protos
	$(BIN)/pip install --quiet -e '.[dev]' -e 'clients/python[cli]'
	touch $(STAMP)

setup: $(STAMP) browser-tools node-example ## Create .venv, install Egret with dev tools, generate stubs, browser-tools, node-example

# The browser tests (tests/browser) drive Debian's Chromium with Playwright (never a downloaded
# browser) and check every page with axe-core from npm. Installed only when missing; without
# root (and so without apt-get) they are named and the browser tests skip, saying why. Debian's
# npm only when there is none: a Node.js from NodeSource carries its own and conflicts with it.
CHROMIUM := /usr/bin/chromium
AXE := .tools/node_modules/axe-core/axe.min.js
BROWSER_PACKAGES := chromium fonts-noto-cjk

browser-tools: ## Chromium and CJK fonts (apt-get, when missing) and axe-core (npm) for the browser tests
	@if [ -x $(CHROMIUM) ] && fc-list 2>/dev/null | grep -qi 'Noto Sans CJK' && command -v npm >/dev/null; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  packages="$(BROWSER_PACKAGES)"; \
	  command -v npm >/dev/null || packages="$$packages npm"; \
	  echo "browser-tools: apt-get install $$packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$packages >/dev/null; \
	else \
	  echo "browser-tools: Chromium, the CJK fonts or npm are missing and this is not root;"; \
	  echo "  run: sudo apt-get install -y $(BROWSER_PACKAGES) npm && make browser-tools"; \
	  echo "  (until then tests/browser skip; CI runs make setup as root and installs them)"; \
	fi
	@if [ ! -f $(AXE) ] && command -v npm >/dev/null; then \
	  npm install --silent --no-save --no-package-lock --no-audit --no-fund --prefix .tools axe-core@4; \
	fi

# The Node.js example client (examples/node) and its end-to-end test: npm ci from its lockfile
# when node_modules is missing or older than package-lock.json (npm ci rewrites this file).
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json

node-example: $(NODE_EXAMPLE) ## npm packages of the Node.js example client (examples/node) for its end-to-end test

$(NODE_EXAMPLE): examples/node/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix examples/node --no-audit --no-fund --loglevel=error; \
	else \
	  echo "node-example: npm is missing (make browser-tools installs it as root); tests/e2e/test_node_example.py skips"; \
	fi

# Generated into gen.new and swapped in, so running services and tests never see a
# half-written gen/.
gen/.stamp: $(PROTO_FILES)
	rm -rf gen.new && mkdir -p gen.new
	$(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=gen.new --pyi_out=gen.new --grpc_python_out=gen.new \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=gen.new $(PROTO_FILES)
	find gen.new/egret -type d -exec touch {}/__init__.py \;
	touch gen.new/egret/py.typed gen.new/.stamp
	rm -rf gen.old; if [ -d gen ]; then mv gen gen.old; fi; mv gen.new gen; rm -rf gen.old

protos: gen/.stamp ## Generate Python stubs (+ .pyi) from protos/ into gen/

run: setup ## Start the four services, the portal and the local OpenID provider, stream a synthetic population, keep serving
	$(PY) -m devtools.demo $(RUN_ARGS)

# Coverage of the pytest process ([tool.coverage] in pyproject.toml): files below 100% in the terminal,
# var/coverage.xml for tools, and a floor a few points under the 78% the unit and integration rings reach
# together (e2e adds to it). COVERAGE_FLOOR=0 for a partial run such as PYTEST_ARGS=tests/unit.
COVERAGE_FLOOR ?= 75
test: setup ## Run every test (unit, integration on SQLite and PostgreSQL, end to end) with a coverage floor
	mkdir -p var
	$(PY) -m pytest --cov --cov-report=term:skip-covered --cov-report=xml:var/coverage.xml \
	  --cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

FUZZ_CALLS ?= 20000
FUZZ_SEED ?=
fuzz: setup ## Fuzz every RPC of the four services with malformed calls (FUZZ_CALLS=20000, FUZZ_SEED=<seed> replays)
	EGRET_FUZZ_CALLS=$(FUZZ_CALLS) EGRET_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest tests/integration/test_fuzz.py -s -q $(PYTEST_ARGS)

lint: setup ## ruff lint and format check, buf lint and format check, import contracts (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/lint-imports

breaking: setup ## buf breaking against the main branch
	@if git rev-parse --verify -q main >/dev/null && git ls-tree -r --name-only main | grep -q '^protos/'; then \
	  $(BIN)/buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: main has no protos yet, nothing to compare"; fi

typecheck: setup ## mypy (strict) on our code
	$(BIN)/mypy kit domain contracts services devtools bench tests deploy clients/python/src

bench: setup ## Benchmarks: streaming ingest end to end vs raw durable-rules
	$(PY) -m bench.pipeline $(BENCH_ARGS)

bench-backtest: setup ## Backtest benchmark: 1M stored events replayed through two rule sets
	$(PY) -m bench.backtest $(BENCH_ARGS)

manifests: setup ## Re-render deploy/k8s/manifests/ (and the chart's copy of config/) from the Helm chart
	$(PY) -m deploy.k8s.render

chart-docs: setup ## Re-generate the chart's README (deploy/k8s/egret/README.md) from values.yaml's comments
	$(PY) -m deploy.k8s.chart_docs

deploy-check: setup ## Chart and image checks: hadolint, helm lint, render, validate, drift (tests/deploy, no rehearsal)
	$(BIN)/hadolint Dockerfile
	$(PY) -m deploy.k8s.render --check
	$(PY) -m deploy.k8s.chart_docs --check
	$(PY) -m pytest tests/deploy -m 'not e2e' -q

# The image, built here without a container engine or a registry (deploy/image/build.sh: buildah
# with a debootstrap base, installed by apt-get when missing, so as root), then checked from the
# inside: its user, no compiler or package manager, the four services through the end-to-end
# scenario (tests/deploy/test_image_run.py, which only make image-check runs).
# IMAGE_NICE="nice -n 10": CI builds it beside make test.
IMAGE ?= localhost/egret:ci
IMAGE_NICE ?=
image: setup ## Build the image (buildah, a debootstrap base), report its size, write its SBOM to var/image/
	EGRET_IMAGE=$(IMAGE) $(IMAGE_NICE) deploy/image/build.sh

image-check: image ## Build the image and check it: uid 10001, no compiler or package manager, the e2e scenario run from it
	EGRET_IMAGE=$(IMAGE) EGRET_IMAGE_CHECK=1 $(PY) -m pytest tests/deploy/test_image_run.py -q $(PYTEST_ARGS)

bench-rules-memory: setup ## Benchmark: live rules evaluation's RSS over 1M events across 100k subjects
	$(PY) -m bench.rules_memory $(BENCH_ARGS)

bench-query: setup ## Benchmark: GetScore p99 at 1,000 req/s, idle and while ingest runs (BENCH_ARGS=--subjects 1000000)
	$(PY) -m bench.query_latency $(BENCH_ARGS)

bench-history: setup ## Benchmark: CPU per as-corrected ListScoreHistory call, 1,000 and 10,000 entries, incremental vs definition
	$(PY) -m bench.history_cost $(BENCH_ARGS)

bench-portal: setup ## Benchmark: the portal's time per page at 20 req/s, services, provider and portal on this machine (My credit p95 <= 150 ms)
	$(PY) -m bench.portal $(BENCH_ARGS)

bench-backfill: setup ## Benchmark: egret submit of a 1M-event JSON Lines file (check, send, drain), CLI CPU per event (BENCH_ARGS=--events 200000)
	$(PY) -m bench.backfill $(BENCH_ARGS)

chaos: setup ## Chaos: 50k events under 10 random SIGKILLs vs an uninterrupted run (CHAOS_ARGS=--postgres URL --seed N)
	$(PY) -m bench.chaos $(CHAOS_ARGS)

CLIENT_DIST ?= dist
client-dist: protos ## Build the Python client's wheel (clients/python, with the generated stubs) into dist/
	rm -rf build/client && mkdir -p build $(CLIENT_DIST) && cp -r clients/python build/client
	cp -r gen/egret build/client/src/egret
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation build/client -w $(CLIENT_DIST)

clean: ## Remove the virtual environment, generated stubs, local data, npm tools and test artefacts
	rm -rf $(VENV) gen var .tools test-artefacts

.PHONY: help setup client-dist browser-tools node-example protos run test fuzz lint breaking typecheck bench bench-backtest bench-rules-memory bench-query bench-history bench-portal bench-backfill chaos manifests chart-docs deploy-check image image-check clean
