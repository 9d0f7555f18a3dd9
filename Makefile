# The README's commands. Each target sets up what it needs on a fresh machine:
# a virtualenv, torch and transformers, the build tools, and the Rust extension.
VENV    ?= .venv
PY      := $(VENV)/bin/python
DEPS    := $(VENV)/.deps-stamp
BUILT   := $(VENV)/.built-stamp
SOURCES := $(shell find crates python -name '*.rs' -o -name '*.py' -o -name 'Cargo.toml' 2>/dev/null) Cargo.toml pyproject.toml

.PHONY: demo test test-rs test-py test-gpu test-compat lint format bench bench-cpu bench-gpu bench-io wheel clean

demo: $(BUILT)
	$(VENV)/bin/tensorstream demo

test: test-rs test-py

test-rs:
	cargo test -p tensorstream-core

test-py: $(BUILT)
	$(PY) -m pytest -q tests

test-gpu: $(BUILT)
	$(PY) -m pytest -q -m gpu tests

# The tests that depend most on torch's and transformers' internals, against the newest
# versions pyproject.toml's ranges allow (the rest pinned as in requirements-dev.txt), in a
# virtualenv of their own; `make test` runs the pins. Run by .ci/run after `make test`.
COMPAT_VENV  ?= .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_TESTS ?= tests/test_speculative.py tests/test_speculative_api.py tests/test_selfdraft.py \
                tests/test_families.py tests/test_module_contract.py tests/test_grad_mode.py tests/test_compile.py

test-compat:
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip uv
	python3 .ci/newest_overrides.py > $(COMPAT_VENV)/newest.txt
	$(COMPAT_VENV)/bin/uv pip install -q --python $(COMPAT_PY) --upgrade -r requirements-dev.txt \
		--override $(COMPAT_VENV)/newest.txt
	VIRTUAL_ENV=$(abspath $(COMPAT_VENV)) PATH=$(abspath $(COMPAT_VENV))/bin:$$PATH $(COMPAT_VENV)/bin/maturin develop --release -q
	$(COMPAT_PY) -c 'import torch, transformers; print("test-compat: torch", torch.__version__, "transformers", transformers.__version__)'
	$(COMPAT_PY) -m pytest -q $(COMPAT_TESTS)

$(PY):
	python3 -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q
	touch $@

wheel: $(DEPS)
	$(VENV)/bin/maturin build --release -o dist

lint: $(DEPS)
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples

format: $(DEPS)
	cargo fmt --all
	$(VENV)/bin/ruff format python tests bench examples
	$(VENV)/bin/ruff check --fix python tests bench examples

bench-cpu: $(BUILT)
	$(PY) bench/cpu_offload.py

bench-gpu: $(BUILT)
	$(PY) bench/gpu_stream.py

bench-io:
	bash bench/io_read.sh

clean:
	rm -rf $(VENV) $(COMPAT_VENV) target dist

# Fuzz the parsers (not part of `make test`): each target runs FUZZ_SECONDS from the checked-in
# seeds (fuzz/seeds/) plus the corpus it grew before (fuzz/corpus/, ignored by git). Needs
# cargo-fuzz and a nightly toolchain, or RUSTC_BOOTSTRAP=1 on stable. See docs/reliability.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= store_open store_manifest store_semantics safetensors_header safetensors_index codec_decode
FUZZ_CARGO   ?= $(shell rustup toolchain list 2>/dev/null | grep -q '^nightly' && echo 'cargo +nightly' || echo 'RUSTC_BOOTSTRAP=1 cargo')

.PHONY: fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && \
		$(FUZZ_CARGO) fuzz run $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done
