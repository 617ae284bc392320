"""Plain-language sentences for validation reason codes and job error codes."""

from __future__ import annotations

REASONS: dict[str, str] = {
    "empty_file": "The file was empty.",
    "too_large": "The file is larger than the upload limit.",
    "unsupported_format": "The file is not a PNG, JPEG or DICOM image.",
    "undecodable": "The file looks like an image but could not be read; it may be damaged.",
    "pixel_limit": "The image has more pixels than the service accepts.",
    "too_small": "The image is too small to be a CT or MR slice.",
    "too_big": "The image dimensions are larger than a CT or MR slice.",
    "too_large_dims": "The image dimensions are larger than a CT or MR slice.",
    "bad_aspect": "The image proportions do not match an axial CT or MR slice.",
    "blank_image": "The image is blank or almost uniform: there is nothing to screen.",
    "not_grayscale": "The image is in colour; CT and MR slices are grayscale. "
    "Colour photos, screenshots and annotated images are not accepted.",
    "low_dynamic_range": "The image has too little contrast to be a CT or MR slice.",
    "unsupported_modality": "The DICOM file is not a CT or MR image (for example an X-ray, "
    "ultrasound or nuclear medicine image).",
    "wrong_body_part": "The DICOM header says this scan is not of the abdomen "
    "(for example head, neck, chest or a limb).",
    "no_pixel_data": "The DICOM file contains no image.",
    "unsupported_transfer_syntax": "The DICOM file uses a compression this service cannot read.",
    "unsupported_image_type": "The DICOM image type is not an original axial acquisition "
    "(for example a localizer, a secondary capture or a reformatted image).",
    "not_axial": "The DICOM slice is not axial; upload axial (transverse) slices.",
    "burned_in_annotation": "The DICOM image has text burned into its pixels, which may identify "
    "the patient and hides part of the image.",
    "validation_failed": "The upload did not pass validation.",
    "multi_frame": "The DICOM file holds several frames; upload one axial slice at a time.",
    "implausible_hu": "The DICOM pixel values are not plausible CT values.",
    "not_liver_ct": "This does not look like an axial abdominal CT or MR slice showing the "
    "liver, so it was not screened.",
    "not_liver": "No liver is visible in this slice, so it was not screened.",
}

ERRORS: dict[str, str] = {
    "model_load_error": "The screening model could not be loaded. The job was not screened; "
    "please try again later.",
    "internal_error": "Something went wrong while processing this scan. It was not screened.",
    "storage_error": "The uploaded file could not be read back from storage.",
}

STATUS_WORDS: dict[str, str] = {
    "queued": "Waiting in the queue",
    "processing": "Being screened",
    "succeeded": "Screened",
    "rejected": "Rejected (not screened)",
    "failed": "Failed",
}


def reason_sentence(code: str | None) -> str:
    """Return the plain-language sentence for a validation reason code."""
    if not code:
        return "The upload did not pass validation."
    return REASONS.get(code, f"The upload did not pass validation ({code.replace('_', ' ')}).")


def error_sentence(code: str | None) -> str:
    """Return the plain-language sentence for a job error code."""
    if not code:
        return ERRORS["internal_error"]
    return ERRORS.get(code, f"Processing failed ({code.replace('_', ' ')}). It was not screened.")
