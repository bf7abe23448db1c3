"""Alembic migrations of the Dispatcher schema."""
