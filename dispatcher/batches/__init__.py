"""Batches and their recipients: intake, reads and cancel."""
