"""vibectld: the central LLM proxy for vibectl."""
