"""Inbound (mobile-originated) messages: numbers, storage, webhooks, listing."""
