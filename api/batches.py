"""Batches routes (placeholder blueprint until the batches work lands)."""

from flask import Blueprint

bp = Blueprint("batches", __name__)
