.PHONY: bench demo packages test

# Extra flags for bench.run, e.g. `make bench BENCH_ARGS=--quick` (a smoke run, under a
# minute, writes nothing) or `make bench BENCH_ARGS=--only=provider,registry`. The full run
# (about 15 minutes on 2 cores) writes bench/results/<date>.md and latest-summary.md.
BENCH_ARGS ?=

bench:
	scripts/bootstrap
	.venv/bin/python -m bench.run $(BENCH_ARGS)

demo:
	scripts/demo

# dist/vibectld_<version>_<arch>.deb, dist/vibectld-<version>-1.<arch>.rpm and the client-only
# vibectl packages (see packaging/README.md). Needs root for a private mount namespace.
packages:
	scripts/build-packages

test:
	scripts/test
