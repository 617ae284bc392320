"""The organization blueprint: the webhook secret (admins only)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask_jwt_extended import jwt_required

from api.auth import require_role
from api.domain import orgs
from api.domain.models import Role
from api.resources import db

bp = Blueprint("org", __name__, url_prefix="/api/v1/org")


@bp.get("/webhook-secret")
@jwt_required()
def get_webhook_secret() -> tuple[Response, int]:
    """The organization's current webhook signing secret."""
    user = require_role(Role.ADMIN)
    org = orgs.get_or_raise(db(), user.org_id)
    return jsonify({"webhook_secret": org.webhook_secret}), 200


@bp.post("/webhook-secret")
@jwt_required()
def rotate_webhook_secret() -> tuple[Response, int]:
    """Replace the webhook secret; returns the new one."""
    user = require_role(Role.ADMIN)
    org = orgs.rotate_webhook_secret(db(), user.org_id, user_id=user.id)
    db().commit()
    return jsonify({"webhook_secret": org.webhook_secret}), 200
