"""Reports routes (placeholder blueprint until the reports work lands)."""

from flask import Blueprint

bp = Blueprint("reports", __name__)
