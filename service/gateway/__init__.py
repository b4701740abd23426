"""The HTTP gateway: OpenAI-compatible routes in front of the Redis job queue (no model here)."""
