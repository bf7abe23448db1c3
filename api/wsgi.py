"""WSGI entry point for gunicorn (``gunicorn api.wsgi:app``)."""

from api.app import create_app
from dispatcher import logs
from dispatcher.config import Settings

settings = Settings.from_env()
# gunicorn's logconfig_dict (dispatcher.gunicorn_conf) formats the logs.
logs.init_sentry(settings)
app = create_app(settings)
