"""Errors raised by ml_core; every subclass carries a stable machine-readable ``code``."""

from __future__ import annotations


class MLCoreError(Exception):
    """Root of every ml_core error; ``code`` is stable and safe to show to clients."""

    code = "ml_core_error"

    def __init__(self, message: str = "", *, detail: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail = detail

    def __str__(self) -> str:
        """Return the human-readable message (never contains PHI)."""
        return self.message


class EmptyFile(MLCoreError):
    """The upload has zero bytes."""

    code = "empty_file"


class TooLarge(MLCoreError):
    """The upload exceeds the byte size limit."""

    code = "too_large"


class UnsupportedFormat(MLCoreError):
    """The magic bytes are not PNG, JPEG, DICOM (or NIfTI where allowed)."""

    code = "unsupported_format"


class Undecodable(MLCoreError):
    """The container was recognised but its pixels could not be decoded."""

    code = "undecodable"


class PixelLimit(MLCoreError):
    """The header announces more pixels than allowed (decompression bomb guard)."""

    code = "pixel_limit"


class UnsupportedTransferSyntax(MLCoreError):
    """The DICOM transfer syntax has no installed decoder."""

    code = "unsupported_transfer_syntax"


class NoPixelData(MLCoreError):
    """The DICOM dataset has no PixelData element."""

    code = "no_pixel_data"


class MultiFrame(MLCoreError):
    """A multi-frame DICOM: one job is one slice (send frames as separate files)."""

    code = "multi_frame"


class NotGrayscale(MLCoreError):
    """A colour image was decoded without ``allow_color``, or a colour DICOM."""

    code = "not_grayscale"


class RenderError(MLCoreError):
    """An image could not be encoded (wrong shape or an encoder failure)."""

    code = "render_error"


class ModelLoadError(MLCoreError):
    """A model artifact is missing, incomplete or fails its sha256 check."""

    code = "model_load_error"
