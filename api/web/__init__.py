"""Server-rendered web pages (placeholder until the web UI lands)."""

from flask import Blueprint

bp = Blueprint("web", __name__)
