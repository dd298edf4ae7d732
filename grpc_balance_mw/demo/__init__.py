"""The charge-points demo service: generated stubs, an asyncio servicer and a runnable pod."""
