"""The gRPC service clients call: servicer, authentication, refusals, limits, calls in flight."""
