"""Where prompts go: the model catalogue, execution, provider keys, OpenAI-compatible endpoints."""
