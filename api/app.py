"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask

from api import auth, jobs, openapi, ops, org, security
from api.domain.settings import Settings, get_settings
from api.errors import register_error_handlers
from api.resources import EXTENSION_KEY, Resources, build_resources, close_db

log = logging.getLogger(__name__)

# Multipart framing and form fields on top of the file itself.
MULTIPART_SLACK_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None, *, resources: Resources | None = None) -> Flask:
    """Build the app for `settings` (default: from the environment); tests may inject resources."""
    settings = settings or (resources.settings if resources else get_settings())
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.jwt_secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        JSON_SORT_KEYS=False,
        TESTING=settings.env == "test",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = resources or build_resources(settings)

    auth.configure_jwt(app)
    register_error_handlers(app)
    app.teardown_appcontext(close_db)

    from api import batches, reports, uploads
    from api.web import bp as web_bp  # registered unconditionally; the web UI fills it

    blueprints = (auth.bp, jobs.bp, org.bp, ops.bp, openapi.bp, batches.bp, reports.bp, uploads.bp)
    for blueprint in (*blueprints, web_bp):
        app.register_blueprint(blueprint)
    ops.init_metrics(app)

    security.init_security(app, settings)
    return app
