"""Messaging Plus compatible API (vendor pages "Add Batch", "Add Message"): /batch, /message."""

from api.dialects.mplus.views import blueprint

__all__ = ["blueprint"]
