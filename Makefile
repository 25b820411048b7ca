# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BASE   := $(VENV)/.base-stamp
TORCH  ?= torch==2.13.0
# llama-cpp-python (the real llama.cpp client the GGUF tests run) is built from source. Its default native
# build segfaults evaluating Q4_0 models on Intel CPUs with AMX, so build portable AVX-512 code without AMX.
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: demo test test-slow bench-streaming clean chromium-deps fuzz

$(BASE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	@echo "installing test dependencies (the first time this builds llama-cpp-python from source: ~10 min)"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/lowbit demo

# Headless Chromium (+ a font) renders the HTML report in tests/test_report.py; in CI (CI set) it must be there.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: chromium-deps
chromium-deps:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium fonts-liberation; } \
	  || echo "could not install chromium: the HTML report render test will be skipped (it fails when CI is set)"

test: $(STAMP) chromium-deps
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench-streaming: $(STAMP)
	$(PY) bench/streaming_memory.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# Reliability at scale (issue 21): 10,000 mutated inputs per file reader and 100 SIGKILLs per long-running command;
# prints the counts. The default suite runs a CI-sized share of each (500 cases per reader, 10 kills per command).
fuzz: $(STAMP)
	LOWBIT_FUZZ_CASES=10000 $(PY) -m pytest -q -s tests/test_fuzz_readers.py tests/test_fuzz_regressions.py \
	  tests/test_fuzz_checkpoints.py tests/test_fuzz_atheris.py tests/test_gguf_fuzz.py \
	  tests/test_gguf_import_fuzz.py -m "not slow or slow"
	LOWBIT_KILLS=100 $(PY) -m pytest -q -s tests/test_crash_safety.py tests/test_crash_resume.py \
	  tests/test_resume_gptq.py -m "not slow or slow"
