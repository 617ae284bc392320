"""Error types of the domain: each has a stable machine-readable `code` and an HTTP status."""

from __future__ import annotations

from typing import Any


class LiverscanError(Exception):
    """Root of every liverscan domain error; the API renders it as the error envelope."""

    code: str = "internal_error"
    http_status: int = 500
    message: str = "Internal error."

    def __init__(
        self, message: str | None = None, *, details: dict[str, Any] | None = None
    ) -> None:
        self.message = message or type(self).message
        self.details: dict[str, Any] = details or {}
        super().__init__(self.message)


class SecretUnreadable(LiverscanError):
    """A stored secret that no configured key decrypts (LIVERSCAN_SECRETS_KEY changed without
    moving the old key to LIVERSCAN_SECRETS_KEY_PREVIOUS)."""

    code, http_status = "secret_unreadable", 500
    message = "A stored secret cannot be decrypted with the configured keys."


class BadRequest(LiverscanError):
    code, http_status, message = "bad_request", 400, "The request is invalid."


class MalformedJson(LiverscanError):
    code, http_status, message = "malformed_json", 400, "The request body is not valid JSON."


class InvalidInput(LiverscanError):
    code, http_status, message = "invalid_input", 422, "The request fields are invalid."


class WeakPassword(LiverscanError):
    code, http_status = "weak_password", 422
    message = "The password needs at least 10 characters with both letters and digits."


class EmailTaken(LiverscanError):
    code, http_status, message = "email_taken", 409, "An account with this email already exists."


class InvalidCredentials(LiverscanError):
    code, http_status, message = "invalid_credentials", 401, "Email or password is wrong."


class Forbidden(LiverscanError):
    code, http_status, message = "forbidden", 403, "Your role does not allow this."


class NotFound(LiverscanError):
    code, http_status, message = "not_found", 404, "Not found."


class JobNotFound(NotFound):
    code, message = "job_not_found", "No such job."


class ArtifactNotFound(NotFound):
    code, message = "artifact_not_found", "No such artifact for this job."


class ObjectNotFound(NotFound):
    code, message = "object_not_found", "No such object in the store."


class InvalidKey(LiverscanError):
    code, http_status, message = "invalid_key", 400, "The storage key is not allowed."


class MissingFile(LiverscanError):
    code, http_status, message = (
        "missing_file",
        422,
        "The multipart field 'file' is missing or empty.",
    )


class PayloadTooLarge(LiverscanError):
    code, http_status, message = "payload_too_large", 413, "The upload exceeds the size limit."


class IdempotencyConflict(LiverscanError):
    code, http_status = "idempotency_conflict", 409
    message = "This Idempotency-Key was already used with different content."


class CallbackUrlRefused(LiverscanError):
    code, http_status, message = "callback_url_refused", 422, "The callback URL is not allowed."


class InvalidTransition(LiverscanError):
    code, http_status, message = "invalid_transition", 409, "The job cannot move to that state."


class DatabaseUnavailable(LiverscanError):
    code, http_status, message = "database_unavailable", 503, "The database is unavailable."


class BrokerUnavailable(LiverscanError):
    code, http_status, message = "broker_unavailable", 503, "The job queue is unavailable."


class StorageUnavailable(LiverscanError):
    code, http_status, message = "storage_unavailable", 503, "The object store is unavailable."


class UploadNotFound(NotFound):
    """No such upload in the caller's organization (another organization's is not found either)."""

    code, message = "upload_not_found", "No such upload."


class UploadIncomplete(LiverscanError):
    """The upload slot exists but no bytes were stored under it (yet)."""

    code, http_status = "upload_incomplete", 409
    message = "Nothing was uploaded to this upload URL yet; PUT the file first."


class UploadAlreadyUsed(LiverscanError):
    """A job was already created from this upload."""

    code, http_status = "upload_already_used", 409
    message = "A job was already created from this upload."


class UploadExpired(LiverscanError):
    """The upload slot expired (the sweep removes its bytes)."""

    code, http_status, message = "upload_expired", 410, "This upload has expired; start a new one."
