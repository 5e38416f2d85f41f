"""Request/response models, defined once and shared by the server, the clients and the
trainer: `compress` (POST /v1/compress) and `openai` (the vLLM/OpenAI-shaped routes)."""
