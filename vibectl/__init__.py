"""vibectl: the client library and CLI for the vibectl LLM proxy."""
