"""Benchmarks: vibectld against a bare grpc.aio floor. Run with `make bench`."""
