"""Reports a clinic can file: a PDF per job, and for DICOM uploads a Secondary Capture of the
Grad-CAM overlay and a Basic Text SR with the finding (both in the source study, de-identified).

Rendered lazily: the first GET of a succeeded job's report enqueues `liverscan.render_report`
(queue `reports`), which rebuilds the slice from the stored upload, reads the stored overlay and
the result row, writes the objects, then sets `report_key` — so the row never points at a report
that is not in the store, and the ~0.2 s of PDF layout per job stays off the inference path (most
screening results are never opened as PDF). A rendering failure is logged and leaves the job
without a report (the classification stands); it never fails the job.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from api.domain.storage import (
    DICOM_OVERLAY_NAME,
    DICOM_SR_NAME,
    REPORT_PDF_NAME,
    Storage,
    job_key,
)
from ml_core.types import ModelInfo
from worker.context import WorkerContext

log = logging.getLogger(__name__)

REPORT_PDF = REPORT_PDF_NAME
OVERLAY_SC = DICOM_OVERLAY_NAME
SR = DICOM_SR_NAME

DISCLAIMER = (
    "Decision support only, not a diagnosis. This result was produced by a machine-learning model "
    "on a single slice and must be reviewed by a qualified clinician together with the whole study."
)

# Codes shared by the SR here and the FHIR resource of the API (api/reports.py).
SCT_LIVER_NEOPLASM = ("126851005", "SCT", "Neoplasm of liver")
SCT_NO_ABNORMALITY = ("281900007", "SCT", "No abnormality detected")
LOCAL_SCHEME = "99LIVERSCAN"  # a private coding scheme designator (PS3.16: "99" prefix)

_UID_ROOT_ENTROPY = "liverscan-reports-v1"
_PERFORMANCE = (
    ("auc", "AUC"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
)


@dataclass(frozen=True)
class ReportInput:
    """Everything a report shows about one classified job (no PHI: no filename, no header text)."""

    job_id: uuid.UUID
    client_ref: str | None
    created_at: datetime | None
    started_at: datetime | None
    input_format: str | None
    modality: str | None
    width: int
    height: int
    input_sha256: str | None
    label: str
    probability: float
    threshold: float
    model: ModelInfo
    checks: list[dict[str, Any]]
    slice_u8: np.ndarray  # uint8 (H, W), the windowed slice the model saw
    heatmap: np.ndarray | None = None  # float32 (H, W) in [0, 1]; the PDF uses the overlay
    card: dict[str, Any] | None = None  # the model card, only when its sha256 matches `model`
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class JobFacts(TypedDict):
    """The fields of a ReportInput that come from the job's row (read inside its transaction)."""

    client_ref: str | None
    created_at: datetime | None
    started_at: datetime | None
    input_sha256: str | None
    label: str
    probability: float
    threshold: float
    checks: list[dict[str, Any]]


@dataclass(frozen=True)
class StoredReports:
    """Keys of the report objects written for one job."""

    report_key: str
    overlay_sc_key: str | None = None
    sr_key: str | None = None


def read_card(model_dir: Path, model: ModelInfo) -> dict[str, Any] | None:
    """The model card in `model_dir` when it describes `model` (same sha256 and version), else None.

    Both must match: two versions can share their weights (same sha256) and differ in their
    card (threshold, calibration, crop), so a job of one must not show the other's figures.
    """
    try:
        card: dict[str, Any] = json.loads((model_dir / "model_card.json").read_text())
    except (OSError, ValueError):
        return None
    same = card.get("sha256") == model.sha256 and card.get("version") == model.version
    return card if same else None


def performance_rows(card: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The card's held-out test metrics as (name, "0.67 (95% CI 0.51-0.81)") rows; [] if none."""
    metrics = (card or {}).get("metrics") or {}
    rows: list[tuple[str, str]] = []
    for key, name in _PERFORMANCE:
        entry = metrics.get(key)
        if not isinstance(entry, dict) or entry.get("value") is None:
            continue
        text = f"{float(entry['value']):.2f}"
        ci = entry.get("ci95")
        if isinstance(ci, list | tuple) and len(ci) == 2:
            text += f" (95% CI {float(ci[0]):.2f}-{float(ci[1]):.2f})"
        rows.append((name, text))
    n = metrics.get("n")
    if isinstance(n, dict) and n:
        rows.append(("Test slices", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items())))
    matched = metrics.get("liver_area_matched_auc")
    if isinstance(matched, dict) and matched.get("value") is not None:
        rows.append(("Liver-area-matched AUC", f"{float(matched['value']):.2f}"))
    ablation = metrics.get("tumor_ablation_auc")
    if isinstance(ablation, dict) and ablation.get("value") is not None:
        rows.append(("Tumor-ablation AUC", f"{float(ablation['value']):.2f}"))
    return rows


def _iso(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_LATIN1_SWAPS = {"≥": ">=", "≤": "<=", "—": "-", "–": "-", "…": "...", "’": "'", "“": '"', "”": '"'}


def _latin1(text: Any) -> str:
    """Text the PDF core fonts can draw (latin-1); anything else becomes '?'."""
    out = str(text)
    for src, dst in _LATIN1_SWAPS.items():
        out = out.replace(src, dst)
    return out.encode("latin-1", "replace").decode("latin-1")


def _png_rgb(slice_or_rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(slice_or_rgb).save(buf, format="PNG")
    return buf.getvalue()


def _colour_scale_png() -> bytes:
    from ml_core.overlay import heatmap_png

    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (12, 1))
    return heatmap_png(ramp)


def render_pdf(r: ReportInput, overlay_png: bytes) -> bytes:
    """The one-page PDF report of a classified job (A4; scan and overlay side by side)."""
    from fpdf import FPDF

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(_latin1(f"liverscan report {r.job_id}"))
    pdf.set_author("liverscan")
    pdf.set_creator(_latin1(f"liverscan worker, model {r.model.name} {r.model.version}"))
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_margins(14, 12, 14)
    pdf.add_page()
    width = pdf.epw

    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(width, 8, "liverscan - liver tumor screening report", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 8.5)
    pdf.multi_cell(width, 4, _latin1(DISCLAIMER), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    tumor = r.label == "tumor"
    pdf.set_font("Helvetica", "B", 13)
    pdf.set_text_color(170, 20, 20) if tumor else pdf.set_text_color(20, 110, 40)
    headline = "Tumor suspected" if tumor else "No tumor detected"
    pdf.cell(width, 7, f"Result: {headline} (label: {r.label})", new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.set_font("Helvetica", "", 10)
    pdf.cell(
        width,
        5.5,
        _latin1(
            f"Calibrated probability of tumor: {r.probability:.3f}   "
            f"Threshold: {r.threshold:.3f} (at or above: tumor)"
        ),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.ln(1.5)

    # Scan and overlay side by side, same size, with the colour scale under the overlay.
    gap = 6.0
    side = (width - gap) / 2.0
    aspect = r.height / r.width if r.width else 1.0
    img_h = min(side * aspect, 64.0)
    img_w = img_h / aspect if aspect else side
    top = pdf.get_y()
    left = pdf.l_margin
    pdf.set_font("Helvetica", "B", 9)
    pdf.text(left, top + 3, "De-identified scan (as windowed for the model)")
    pdf.text(left + side + gap, top + 3, "Grad-CAM overlay")
    pdf.image(
        _png_rgb(r.slice_u8), x=left, y=top + 5, w=img_w, h=img_h, alt_text="de-identified scan"
    )
    pdf.image(overlay_png, x=left + side + gap, y=top + 5, w=img_w, h=img_h, alt_text="overlay")
    scale_y = top + 6 + img_h
    pdf.image(_colour_scale_png(), x=left + side + gap, y=scale_y, w=img_w, h=3.5)
    pdf.set_font("Helvetica", "", 7.5)
    pdf.text(left + side + gap, scale_y + 6.5, "low")
    pdf.text(left + side + gap + img_w - 5, scale_y + 6.5, "high")
    pdf.text(left + side + gap + img_w / 2 - 14, scale_y + 6.5, "contribution to the score")
    pdf.set_xy(left, scale_y + 9)
    pdf.set_font("Helvetica", "I", 7.5)
    pdf.multi_cell(
        width,
        3.5,
        "Warmer colours mark the regions that raised the model's score; they are not an outline "
        "of a lesion.",
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.ln(1)

    def section(title: str) -> None:
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(width, 5.5, title, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 8)

    def fit(text: str, room: float) -> str:
        # Cells never wrap (fpdf2's wrapping tables cost ~0.5 s a page); long text is shortened.
        if pdf.get_string_width(text) <= room:
            return text
        while text and pdf.get_string_width(text + "...") > room:
            text = text[:-1]
        return text + "..."

    def table(rows: Sequence[tuple[str, ...]], widths: tuple[float, ...], header: bool) -> None:
        columns = [width * w / sum(widths) for w in widths]
        for index, row in enumerate(rows):
            bold = header and index == 0
            pdf.set_font("Helvetica", "B" if bold else "", 8)
            for column, value in zip(columns, row, strict=False):
                pdf.cell(column, 4.2, fit(_latin1(value), column - 1.2), border=1)
            pdf.ln(4.2)
        pdf.set_font("Helvetica", "", 8)
        pdf.ln(1)

    section("Validation checks")
    checks = [
        (
            str(c.get("name", "")).replace("_", " "),
            "pass" if c.get("passed") else "FAIL",
            str(c.get("detail", "")),
        )
        for c in r.checks
    ]
    table([("Check", "Outcome", "Detail"), *checks] if checks else [("No checks recorded",)],
          (30, 14, 56) if checks else (100,), bool(checks))  # fmt: skip

    section("Model")
    model_rows = [
        ("Name", r.model.name),
        ("Version", r.model.version),
        ("sha256", r.model.sha256),
    ]
    if r.card and r.card.get("intended_use"):
        model_rows.append(("Intended use", str(r.card["intended_use"])))
    table(model_rows, (22, 78), False)

    section("Validated performance (held-out test set, from the model card)")
    perf = performance_rows(r.card)
    if perf:
        table([("Measure", "Value"), *perf], (30, 70), True)
    else:
        pdf.multi_cell(
            width,
            4,
            "No held-out test-set performance is recorded for this model.",
            new_x="LMARGIN",
            new_y="NEXT",
        )
        pdf.ln(1.5)

    section("Job")
    job_rows = [
        ("Job id", str(r.job_id)),
        ("Client reference", r.client_ref or "-"),
        ("Input", f"{r.input_format or '-'}"
         f"{(' ' + r.modality) if r.modality else ''}, {r.width} x {r.height} px"),
        ("Input sha256", r.input_sha256 or "-"),
        ("Submitted", _iso(r.created_at)),
        ("Processing started", _iso(r.started_at)),
        ("Report generated", _iso(r.generated_at)),
    ]  # fmt: skip
    table(job_rows, (26, 74), False)

    pdf.set_font("Helvetica", "B", 8.5)
    pdf.multi_cell(width, 4, _latin1(DISCLAIMER), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


# --- DICOM -------------------------------------------------------------------------------------


def _uid(job_id: uuid.UUID, what: str) -> str:
    """A new UID, deterministic per job and object, so re-rendering gives the same instances."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=[_UID_ROOT_ENTROPY, str(job_id), what]))


def source_header(data: bytes) -> Any:
    """The de-identified header (no pixels) of a DICOM upload (UIDs remapped like ml_core.deid)."""
    import pydicom

    from ml_core.deid import deidentify

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return deidentify(ds)


def _new_instance(src: Any, r: ReportInput, *, sop_class: str, what: str, modality: str) -> Any:
    """A dataset with the de-identified patient/study of `src` and a new series and instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    sop_uid = _uid(r.job_id, what)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = r.generated_at.astimezone(UTC)
    # Patient and study: the de-identified source's (type 2 attributes present, empty).
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = str(src.get("DeidentificationMethod", "")) or "ml_core.deid"
    ds.StudyInstanceUID = src.StudyInstanceUID
    ds.SeriesInstanceUID = _uid(r.job_id, what + "-series")
    ds.SeriesNumber = 9901 if modality == "SR" else 9900
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Manufacturer = "liverscan"
    ds.ManufacturerModelName = r.model.name[:64]
    ds.SoftwareVersions = r.model.version[:64]
    ds.SeriesDescription = "liverscan Grad-CAM overlay" if modality != "SR" else "liverscan finding"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _source_ref(src: Any) -> Any:
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    return ref


def overlay_secondary_capture(src: Any, r: ReportInput, overlay_png: bytes) -> bytes:
    """A Secondary Capture (RGB) of the overlay in the source study, referencing the source image."""
    from PIL import Image
    from pydicom.dataset import Dataset
    from pydicom.uid import SecondaryCaptureImageStorage

    rgb = np.asarray(Image.open(io.BytesIO(overlay_png)).convert("RGB"), dtype=np.uint8)
    ds = _new_instance(
        src, r, sop_class=SecondaryCaptureImageStorage, what="overlay_sc", modality="OT"
    )
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = _latin1(
        f"Grad-CAM overlay, {r.model.name} {r.model.version}; decision support only"
    )[:1024]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.SourceImageSequence = [_source_ref(src)]
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedInstanceSequence = [_source_ref(src)]
    ds.ReferencedSeriesSequence = [series]
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    return _encode(ds)


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(relationship: str, value_type: str, concept: tuple[str, str, str], **values: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(*concept)]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def finding_code(label: str) -> tuple[str, str, str]:
    """The SNOMED CT finding for a label (tumor → neoplasm of liver, normal → no abnormality)."""
    return SCT_LIVER_NEOPLASM if label == "tumor" else SCT_NO_ABNORMALITY


def basic_text_sr(src: Any, r: ReportInput, overlay_sc: bytes | None = None) -> bytes:
    """A Basic Text SR with the finding, probability, model and disclaimer, referencing the source."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import BasicTextSRStorage

    ds = _new_instance(src, r, sop_class=BasicTextSRStorage, what="sr", modality="SR")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"  # no clinician has signed this: decision support
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []

    refs = [_source_ref(src)]
    sc = pydicom.dcmread(io.BytesIO(overlay_sc)) if overlay_sc else None
    evidence_series = Dataset()
    evidence_series.SeriesInstanceUID = src.SeriesInstanceUID
    evidence_series.ReferencedSOPSequence = refs
    evidence_study = Dataset()
    evidence_study.StudyInstanceUID = src.StudyInstanceUID
    evidence_study.ReferencedSeriesSequence = [evidence_series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence_study]
    if sc is not None:
        sc_series = Dataset()
        sc_series.SeriesInstanceUID = sc.SeriesInstanceUID
        sc_ref = Dataset()
        sc_ref.ReferencedSOPClassUID = sc.SOPClassUID
        sc_ref.ReferencedSOPInstanceUID = sc.SOPInstanceUID
        sc_series.ReferencedSOPSequence = [sc_ref]
        sc_study = Dataset()
        sc_study.StudyInstanceUID = src.StudyInstanceUID
        sc_study.ReferencedSeriesSequence = [sc_series]
        ds.PertinentOtherEvidenceSequence = [sc_study]

    headline = "Tumor suspected" if r.label == "tumor" else "No tumor detected"
    comparison = ">=" if r.probability >= r.threshold else "<"
    children = [
        _item("CONTAINS", "CODE", ("121071", "DCM", "Finding"),
              ConceptCodeSequence=[_code(*finding_code(r.label))]),
        _item("CONTAINS", "TEXT", ("121071", "DCM", "Finding"),
              TextValue=_latin1(f"{headline}: calibrated probability {r.probability:.3f} "
                                f"{comparison} threshold {r.threshold:.3f}")),
        _item("CONTAINS", "TEXT", ("probability", LOCAL_SCHEME, "Tumor probability (calibrated)"),
              TextValue=f"{r.probability:.4f}"),
        _item("CONTAINS", "TEXT", ("threshold", LOCAL_SCHEME, "Decision threshold"),
              TextValue=f"{r.threshold:.4f}"),
        _item("CONTAINS", "TEXT", ("111001", "DCM", "Algorithm Name"),
              TextValue=r.model.name[:1024]),
        _item("CONTAINS", "TEXT", ("111003", "DCM", "Algorithm Version"),
              TextValue=f"{r.model.version} sha256:{r.model.sha256}"),
        _item("CONTAINS", "IMAGE", ("121112", "DCM", "Source of Measurement"),
              ReferencedSOPSequence=[_source_ref(src)]),
    ]  # fmt: skip
    if sc is not None:
        sc_ref = Dataset()
        sc_ref.ReferencedSOPClassUID = sc.SOPClassUID
        sc_ref.ReferencedSOPInstanceUID = sc.SOPInstanceUID
        children.append(
            _item("CONTAINS", "IMAGE", ("overlay", LOCAL_SCHEME, "Grad-CAM overlay"),
                  ReferencedSOPSequence=[sc_ref])
        )  # fmt: skip
    children.append(
        _item("CONTAINS", "TEXT", ("121106", "DCM", "Comment"), TextValue=_latin1(DISCLAIMER))
    )
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = children
    return _encode(ds)


def _encode(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_reports(
    storage: Storage, org_id: uuid.UUID, r: ReportInput, *, overlay_png: bytes, upload: bytes | None
) -> StoredReports:
    """Render and store report.pdf, and for DICOM uploads overlay_sc.dcm and sr.dcm; their keys."""
    report_key = job_key(org_id, r.job_id, REPORT_PDF)
    storage.put(report_key, render_pdf(r, overlay_png), "application/pdf")
    if r.input_format != "dicom" or upload is None:
        return StoredReports(report_key=report_key)
    src = source_header(upload)
    sc = overlay_secondary_capture(src, r, overlay_png)
    sc_key = job_key(org_id, r.job_id, OVERLAY_SC)
    sr_key = job_key(org_id, r.job_id, SR)
    storage.put(sc_key, sc, "application/dicom")
    storage.put(sr_key, basic_text_sr(src, r, sc), "application/dicom")
    return StoredReports(report_key=report_key, overlay_sc_key=sc_key, sr_key=sr_key)


def render_stored(ctx: WorkerContext, job_id: uuid.UUID) -> str | None:
    """Render a succeeded job's reports from what is stored (upload, overlay, row); the PDF key.

    Idempotent: a job whose report exists is left alone; a job that did not succeed gets none.
    """
    from api.domain import jobs, retention
    from api.domain.db import session_scope
    from api.domain.models import JobStatus
    from ml_core.validation import validate
    from worker import model_cache

    with session_scope(ctx.sessions) as session:
        job = jobs.get(session, job_id)
        if job is None or job.status is not JobStatus.SUCCEEDED or job.overlay_key is None:
            return None
        if job.report_key is not None and ctx.storage.exists(job.report_key):
            return job.report_key
        model = ModelInfo(job.model_name or "", job.model_version or "", job.model_sha256 or "")
        facts: JobFacts = {
            "client_ref": job.client_ref,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "input_sha256": job.input_sha256,
            "label": job.label or "normal",
            "probability": float(job.probability or 0.0),
            "threshold": float(job.threshold or 0.0),
            "checks": list((job.validation or {}).get("checks") or []),
        }
        org_id, input_key, overlay_key = job.org_id, job.input_key, job.overlay_key
    try:
        upload = ctx.storage.get(input_key)
        overlay = ctx.storage.get(overlay_key)
        decoded = validate(upload, gate=None)  # the same decode and window the worker used
        if decoded.slice_u8 is None or decoded.image is None:
            log.warning("job %s: stored upload no longer decodes; no report", job_id)
            return None
        image = decoded.image
        r = ReportInput(
            job_id=job_id,
            input_format=image.format,
            modality=image.modality if image.modality in ("CT", "MR") else None,
            width=image.width,
            height=image.height,
            model=model,
            slice_u8=decoded.slice_u8,
            card=read_card(model_cache.model_path(ctx.settings), model),
            **facts,
        )
        stored = write_reports(ctx.storage, org_id, r, overlay_png=overlay, upload=upload)
    except Exception:  # a report must never cost the clinic its classification
        log.exception("job %s: report rendering failed; the result stays without a report", job_id)
        return None
    with session_scope(ctx.sessions) as session:
        locked = jobs.lock(session, job_id)  # the purge locks it too: one sees the other
        if retention.get_deletion(session, job_id) is not None:
            # Deleted while rendering: nothing derived from the upload may stay behind (what the
            # store fails to delete now is left to the sweep).
            keys = [stored.report_key, stored.overlay_sc_key, stored.sr_key]
            retention.delete_or_defer(
                session, ctx.storage, [k for k in keys if k is not None], job_id=job_id
            )
            return None
        jobs.set_report_key(session, job_id, stored.report_key, locked=locked)
    return stored.report_key
