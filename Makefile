.PHONY: bench demo test

# Extra flags for bench.run, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_ARGS ?=

bench:
	scripts/bootstrap
	.venv/bin/python -m bench.run $(BENCH_ARGS)

demo:
	scripts/demo

test:
	scripts/test
