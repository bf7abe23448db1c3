"""Delivery receipts from carriers: applying them to recipients, in order, once."""
