"""Celery adapters: the app factory, thin tasks, the beat schedule."""
