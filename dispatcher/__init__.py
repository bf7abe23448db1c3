"""Dispatcher: a self-hosted message dispatch engine (domain package: no Flask, no Celery)."""
