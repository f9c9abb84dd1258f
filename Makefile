# Every target sets up what it needs first (scripts/setup.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup test run bench check-cuda clean
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q --durations=15 tests

run: setup
	$(PY) -m torchslim run --out out

bench: setup
	$(PY) benchmarks/bench_masked_linear.py

check-cuda: setup
	bash scripts/check_cuda.sh

clean:
	rm -rf build .venv out
