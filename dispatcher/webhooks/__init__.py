"""Outbound webhooks: Standard Webhooks signing and single-attempt HTTP delivery."""
