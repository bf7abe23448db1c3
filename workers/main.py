"""Entry point for the ``celery -A workers.main ...`` commands (like a wsgi.py)."""

from workers.celery_app import create_celery

app = create_celery()
