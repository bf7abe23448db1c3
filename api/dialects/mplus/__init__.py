"""Messaging Plus compatible API (seeds 000-002): /batch, /message."""

from api.dialects.mplus.views import blueprint

__all__ = ["blueprint"]
