# Everything from a fresh clone: `make test` (venv, install, build, pytest, ctest)
# and `make demo`. Override VENV to keep the environment elsewhere.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No wheel cache: torch with its CUDA libraries is ~5.5 GB installed, and a
# cached copy of the wheels would need ~3 GB more on a machine with little disk.
PIP := $(PY) -m pip --no-cache-dir
CMAKE_BUILD ?= build/cmake
DEPS_STAMP := $(VENV)/.lotus-deps
EXT_STAMP := $(VENV)/.lotus-ext
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.cu)

.PHONY: test sanitize demo install pytest ctest bench bench-gpu gpu-check info clean

test: install ctest
	$(PY) -m pytest tests/
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# ASan + UBSan (issue #16): the compaction ops' tests and the fuzz module against an
# instrumented copy of the extension (CPU ops, LOTUS_SANITIZE=1), built apart in
# $(SAN_DIR) with a copy of the package, so the normal build is untouched; pytest runs
# from there so that the copy is the one imported. The ASan runtime must be preloaded
# first and libstdc++ right after it (otherwise ASan's __cxa_throw interceptor finds no
# real function and aborts at the first C++ exception). --capture=sys lets a report
# reach the log before the process stops.
SAN_DIR ?= build/sanitize
SAN_TESTS := tests/ops/test_mask_compaction.py tests/ops/test_fuzz.py
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:alloc_dealloc_mismatch=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

sanitize: $(EXT_STAMP)
	rm -rf $(SAN_DIR)/lotus_kernels
	mkdir -p $(SAN_DIR)
	cp -r lotus_kernels $(SAN_DIR)/
	rm -f $(SAN_DIR)/lotus_kernels/_C*.so
	find $(SAN_DIR)/lotus_kernels -name __pycache__ -prune -exec rm -rf {} +
	LOTUS_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(SAN_DIR) --build-temp $(SAN_DIR)/tmp
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -c "from lotus_kernels import _extension as e; \
		p = e.build_info().get('path', ''); assert p.startswith('$(abspath $(SAN_DIR))'), f'not the sanitized build: {p}'"
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -m pytest -c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) \
		--capture=sys -q $(addprefix $(CURDIR)/,$(SAN_TESTS))

# The kernels' table, then the LOTUS method end to end on the embedded
# synthetic data (about a minute on a 2-core CPU); prints the report.
demo: install
	$(PY) -m lotus_kernels.recipe.tools.demo
	$(PY) -m lotus_kernels pipeline --demo --print-report --out runs/demo --overwrite

bench: install
	$(PY) -m pytest bench/ --benchmark-only

# On a GPU machine with torch/triton/timm preinstalled (no venv, no network):
# build, tests on CUDA, benchmarks, their report and regression check, demo, all
# into one folder (default $$OUT); BENCH_ARGS='-k ...' passes pytest args to the benchmarks.
bench-gpu:
	bash bench/run_gpu.sh $(BENCH_OUT)

# A GPU lease's first command (torch/triton/timm preinstalled, no venv): `lotus gpu-check`, every step in its own
# process under one budget, results in $$OUT (or GPU_CHECK_OUT); it builds the extension itself when needed.
# GPU_CHECK_ARGS='--budget 480 --steps ...' passes arguments on.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m lotus_kernels gpu-check $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)

info: install
	$(PY) -m lotus_kernels.info

install: $(EXT_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# What setup.py imports must be there before a --no-build-isolation build.
$(DEPS_STAMP): | $(PY)
	$(PIP) install --quiet "torch>=2.11" "setuptools>=64" wheel ninja pybind11
	touch $@

# One editable install: the package's dependencies (already satisfied ones cost
# a second) and one build of the extension; re-run when the sources change.
$(EXT_STAMP): $(DEPS_STAMP) pyproject.toml $(EXT_SOURCES)
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	touch $@

ctest: $(EXT_STAMP)
	mkdir -p $(dir $(CMAKE_BUILD))
	cmake -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$(abspath $(PY)) > $(CMAKE_BUILD).configure.log 2>&1 \
		|| (cat $(CMAKE_BUILD).configure.log; exit 1)
	cmake --build $(CMAKE_BUILD) --parallel $$(nproc)

clean:
	rm -rf build lotus_kernels/_C*.so $(DEPS_STAMP) $(EXT_STAMP)
