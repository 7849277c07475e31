"""llmserve: an OpenAI-compatible server for llama.cpp models, shared fairly by many tenants."""
