"""The organization blueprint: the webhook secret (admins only)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask_jwt_extended import jwt_required

from api.auth import require_role, user_json
from api.domain import accounts, orgs
from api.domain.errors import InvalidInput
from api.domain.models import Role
from api.requests import json_body, required_str
from api.resources import db, resources

bp = Blueprint("org", __name__, url_prefix="/api/v1/org")


@bp.get("/webhook-secret")
@jwt_required()
def get_webhook_secret() -> tuple[Response, int]:
    """The organization's current webhook signing secret."""
    user = require_role(Role.ADMIN)
    secret = orgs.webhook_secret(db(), resources().settings, user.org_id)
    return jsonify({"webhook_secret": secret}), 200


@bp.post("/webhook-secret")
@jwt_required()
def rotate_webhook_secret() -> tuple[Response, int]:
    """Replace the webhook secret; returns the new one."""
    user = require_role(Role.ADMIN)
    secret = orgs.rotate_webhook_secret(db(), resources().settings, user.org_id, user_id=user.id)
    db().commit()
    return jsonify({"webhook_secret": secret}), 200


@bp.post("/users")
@jwt_required()
def add_member() -> tuple[Response, int]:
    """Add a clinician, operator or admin to the caller's organization (admin only)."""
    admin = require_role(Role.ADMIN)
    data = json_body()
    raw_role = data.get("role", Role.CLINICIAN.value)
    try:
        role = Role(raw_role)
    except ValueError as exc:
        raise InvalidInput(
            "Unknown role.", details={"field": "role", "allowed": [r.value for r in Role]}
        ) from exc
    user = accounts.add_member(
        db(),
        accounts.make_hasher(resources().settings),
        org_id=admin.org_id,
        email=required_str(data, "email", max_length=320),
        password=required_str(data, "password", max_length=1000),
        name=required_str(data, "name", max_length=200),
        role=role,
        added_by=admin.id,
    )
    db().commit()
    return jsonify({"user": user_json(user)}), 201
