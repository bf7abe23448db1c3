"""WSGI entry point for gunicorn (``gunicorn api.wsgi:app``)."""

from api.app import create_app
from dispatcher import logs
from dispatcher.config import Settings
from workers.celery_app import settle_gc

settings = Settings.from_env()
# gunicorn's logconfig_dict (dispatcher.gunicorn_conf) formats the logs.
logs.init_sentry(settings)
app = create_app(settings)
# As a worker does at its start: a request allocates a few objects per recipient, and
# every older-generation collection walked the app's ~130,000 long-lived objects.
settle_gc()
