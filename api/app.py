"""The Flask app factory: settings, runtime, per-request transaction, blueprints."""

from __future__ import annotations

import logging

from flask import Flask, Response, g
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api import telemetry
from dispatcher.config import Settings
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    """Build the API; ``runtime`` lets tests inject a publisher."""
    settings = settings or (runtime.settings if runtime else Settings.from_env())
    if runtime is None:
        from workers.celery_app import create_celery

        runtime = create_celery(settings).runtime
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["dispatcher"] = runtime
    # First, so that its after_request runs last: latency and status include the commit.
    telemetry.install(app, settings)

    @app.after_request
    def _commit(response: Response) -> Response:
        # The request's one transaction: committed before the reply leaves, so a
        # client never sees an id that was not stored; rolled back on any error.
        session: Session | None = g.pop("db_session", None)
        if session is None:
            return response
        try:
            if response.status_code < 400:
                session.commit()
            else:
                session.rollback()
        except SQLAlchemyError:
            session.rollback()
            log.exception("commit failed")
            from api.errors import service_unavailable

            return service_unavailable()
        finally:
            session.close()
        return response

    @app.teardown_request
    def _close(_exc: BaseException | None) -> None:
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            session.rollback()
            session.close()

    from api import callbacks, ops, receipts
    from api.dialects import eightbyeight, mplus, sinch
    from api.dialects.mplus import report
    from api.dialects.sinch import errors as sinch_errors
    from api.errors import register

    for module in (mplus, report, eightbyeight, sinch, callbacks, receipts, ops):
        app.register_blueprint(module.blueprint)
    app.register_blueprint(sinch.inbounds_blueprint)
    from api.providers import BLUEPRINTS as provider_webhooks

    for webhook in provider_webhooks:
        app.register_blueprint(webhook)
    sinch_shape = (sinch_errors.handle_http, sinch_errors.handle_unexpected)
    register(app, by_prefix={"/xms/": sinch_shape})
    return app
