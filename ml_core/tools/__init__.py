"""Offline tools for ml_core (weight conversion); nothing here runs in the service."""
