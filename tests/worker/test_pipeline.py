"""The job pipeline on a real (tiny, untrained) ml_core classifier: outcomes a clinic would see.

The shipped model and its learned content gate are exercised by tests/e2e; here the classifier is
`Classifier.build_untrained` (real forward pass and CAM, random weights) without a gate, so the
content layer is reported as not run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from worker_support import load_job, make_job, queued_tasks

from api.domain import retention
from api.domain.models import Job, JobStatus
from api.domain.settings import Settings
from api.domain.storage import REPORT_PDF_NAME, S3Storage, StoredObject, job_key
from ml_core.classifier import Classifier
from tests.live_stack import TcpProxy, port_in
from worker import model_cache, pipeline
from worker.context import WorkerContext

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class UngatedClassifier(Classifier):
    """The untrained classifier has no artifact folder, hence no learned gate."""

    def gate(self) -> None:  # type: ignore[override]
        """No content gate: validation reports the content layer as not run."""
        return None


@pytest.fixture(scope="module")
def classifier() -> Iterator[Classifier]:
    """One tiny classifier for the module, served by the worker's model cache."""
    untrained = Classifier.build_untrained(input_size=32)
    tiny = UngatedClassifier(untrained._network, untrained._spec, untrained.info, None, None)
    model_cache.set_classifier(tiny)
    yield tiny
    model_cache.set_classifier(None)


@pytest.fixture(scope="module")
def slice_png() -> bytes:
    """A 512x512 liver CT slice, windowed W400/L50, as PNG."""
    from pathlib import Path

    from ml_core.overlay import encode_png
    from ml_core.preprocessing import window

    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "ircadb" / "3Dircadb1.7.npz"
    volume = np.load(data)
    z = int(volume["liver"].sum(axis=(1, 2)).argmax())
    return encode_png(window(volume["ct_hu"][z].astype(np.float32)))


def test_slice_is_classified_with_heatmap_and_overlay(
    ctx: WorkerContext, broker, classifier: Classifier, slice_png: bytes
) -> None:
    """succeeded: label/probability from the model, its identity, two PNGs in the store, one event."""
    job_id = make_job(ctx, slice_png, callback_url="http://127.0.0.1:9/hook")
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED

    job = load_job(ctx, job_id)
    (expected,) = classifier.predict([np.asarray(_decode(slice_png))])
    assert job.label == expected.label and job.probability == pytest.approx(expected.probability)
    assert (job.model_name, job.model_version, job.model_sha256) == (
        classifier.info.name,
        classifier.info.version,
        classifier.info.sha256,
    )
    assert (job.input_format, job.input_width, job.input_height) == ("png", 512, 512)
    assert job.validation is not None and job.validation["passed"] is True
    for key in (job.heatmap_key, job.overlay_key):
        assert key is not None and ctx.storage.get(key).startswith(PNG_MAGIC)
    assert [t for t, _ in queued_tasks(broker, "webhooks")] == ["liverscan.deliver_webhook"]


def test_running_twice_gives_one_result_and_one_event(
    ctx: WorkerContext, broker, classifier: Classifier, slice_png: bytes
) -> None:
    """A redelivered message after success changes nothing and schedules no second webhook."""
    job_id = make_job(ctx, slice_png, callback_url="http://127.0.0.1:9/hook")
    pipeline.run(job_id, context=ctx)
    first = load_job(ctx, job_id)
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED
    second = load_job(ctx, job_id)
    assert (second.finished_at, second.probability, second.attempts) == (
        first.finished_at,
        first.probability,
        first.attempts,
    )
    assert len(queued_tasks(broker, "webhooks")) == 1


def test_truncated_png_is_rejected_and_never_classified(
    ctx: WorkerContext, classifier: Classifier, slice_png: bytes
) -> None:
    """Bad bytes end `rejected` with the validator's reason code; no result, the upload is kept."""
    broken = slice_png[: len(slice_png) // 3]
    job_id = make_job(ctx, broken)
    assert pipeline.run(job_id, context=ctx) is JobStatus.REJECTED

    job = load_job(ctx, job_id)
    assert job.reason_code == "undecodable"
    assert job.validation is not None and job.validation["reason_code"] == "undecodable"
    checks = job.validation["checks"]
    assert checks[0]["name"] == "file_size" and checks[0]["passed"] is True
    assert checks[-1]["passed"] is False  # the first failing check ends validation
    assert job.label is None and job.probability is None and job.overlay_key is None
    assert ctx.storage.get(job.input_key) == broken


def test_photo_is_rejected_before_the_model(ctx: WorkerContext, classifier: Classifier) -> None:
    """A colour photograph fails the signal layer (grayscale) even without the content gate."""
    from pathlib import Path

    photo = (
        Path(__file__).resolve().parents[3]
        / "shared"
        / "data"
        / "negatives"
        / "skimage"
        / "astronaut.png"
    ).read_bytes()
    job_id = make_job(ctx, photo)
    assert pipeline.run(job_id, context=ctx) is JobStatus.REJECTED
    job = load_job(ctx, job_id)
    assert job.reason_code == "not_grayscale" and job.label is None


def _purge(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """An org admin's DELETE of the job, committed (the API calls the same domain function)."""
    with ctx.sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        retention.purge(session, ctx.storage, job, reason=retention.ADMIN, user_id=None)


def _kept_objects(ctx: WorkerContext, job_id: uuid.UUID) -> list[str]:
    """Every object left in the (local) store under the job's folder."""
    store = ctx.settings.storage_dir
    return sorted(p.name for p in store.rglob("*") if p.is_file() and str(job_id) in str(p))


def test_a_job_deleted_while_queued_is_not_processed_retried_or_announced(
    ctx: WorkerContext, broker, classifier: Classifier, slice_png: bytes
) -> None:
    """Its upload is gone: the job ends `job_deleted` at once (no retry), no webhook, no bytes."""
    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png, callback_url="http://127.0.0.1:9/hook")
    _purge(ctx, job_id)
    assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED
    job = load_job(ctx, job_id)
    assert job.error_code == "job_deleted" and job.label is None and job.overlay_key is None
    assert queued_tasks(broker, "webhooks") == [] and queued_tasks(broker, "inference") == []
    assert _kept_objects(ctx, job_id) == []


def test_a_job_deleted_while_it_ran_keeps_no_artifact(
    ctx: WorkerContext, broker, classifier: Classifier, slice_png: bytes
) -> None:
    """Deleted after its heatmap and overlay were stored, before the result was recorded: both
    are removed, no result is recorded, no webhook goes out."""
    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png, callback_url="http://127.0.0.1:9/hook")
    put, stored = ctx.storage.put, []

    def put_then_delete(key: str, data: bytes, content_type: str) -> StoredObject:
        out = put(key, data, content_type)
        stored.append(key.rsplit("/", 1)[-1])
        if key.endswith("overlay.png"):
            _purge(ctx, job_id)
        return out

    ctx.storage.put = put_then_delete  # type: ignore[method-assign]
    assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED
    assert stored == ["heatmap.png", "overlay.png"]  # the run did get that far
    job = load_job(ctx, job_id)
    assert job.error_code == "job_deleted" and job.label is None and job.probability is None
    assert job.heatmap_key is None and job.overlay_key is None
    assert queued_tasks(broker, "webhooks") == []
    assert _kept_objects(ctx, job_id) == []


def test_a_duplicate_delivery_finishing_after_the_deletion_keeps_no_artifact(
    ctx: WorkerContext, classifier: Classifier, slice_png: bytes
) -> None:
    """Two deliveries of one job (a redelivered message): the first succeeds and an admin deletes
    the job while the second still runs. The heatmap and overlay the second then stores point at
    nothing (the row was cleared) and must not outlive the deletion."""
    from api.domain import jobs

    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png)
    put = ctx.storage.put

    def first_delivery_wins_then_delete(key: str, data: bytes, content_type: str) -> StoredObject:
        if key.endswith("heatmap.png"):  # the second delivery has fetched and classified
            ctx.storage.put = put  # type: ignore[method-assign]
            with ctx.sessions.begin() as session:  # the first delivery's result, committed
                job = session.get(Job, job_id)
                assert job is not None
                jobs.mark_succeeded(
                    session,
                    job_id,
                    label="normal",
                    probability=0.1,
                    threshold=0.5,
                    model_name="m",
                    model_version="1",
                    model_sha256="0" * 64,
                    heatmap_key=key,
                    overlay_key=key.replace("heatmap.png", "overlay.png"),
                )
            _purge(ctx, job_id)
        return put(key, data, content_type)

    ctx.storage.put = first_delivery_wins_then_delete  # type: ignore[method-assign]
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED  # the first one's result
    job = load_job(ctx, job_id)
    assert job.heatmap_key is None and job.overlay_key is None
    assert _kept_objects(ctx, job_id) == []


def test_a_report_rendered_while_the_job_is_deleted_is_not_kept(
    ctx: WorkerContext, classifier: Classifier, slice_png: bytes
) -> None:
    """The PDF written while an admin deleted the job is removed, and the job gets no report."""
    from worker import reports

    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png)
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED
    put, stored = ctx.storage.put, []

    def put_then_delete(key: str, data: bytes, content_type: str) -> StoredObject:
        out = put(key, data, content_type)
        stored.append(key.rsplit("/", 1)[-1])
        _purge(ctx, job_id)
        return out

    ctx.storage.put = put_then_delete  # type: ignore[method-assign]
    assert reports.render_stored(ctx, job_id) is None
    assert stored == ["report.pdf"]  # it was rendered and stored before the deletion
    assert load_job(ctx, job_id).report_key is None
    assert _kept_objects(ctx, job_id) == []


@pytest.fixture
def s3_ctx_behind_proxy(
    settings: Settings, s3_endpoint: str, broker
) -> Iterator[tuple[WorkerContext, TcpProxy]]:
    """The worker's context on an S3 bucket of the moto server reached through a proxy the test
    can take down (a store outage), and the proxy."""
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]), port_in(18350, 18399))
    proxy.up()
    context = WorkerContext.from_settings(
        settings.model_copy(
            update={
                "storage_backend": "s3",
                "s3_endpoint_url": f"http://127.0.0.1:{proxy.port}",
                "s3_bucket": f"worker-{uuid.uuid4().hex[:12]}",
                "aws_access_key_id": "test",
                "aws_secret_access_key": "test",
            }
        )
    )
    assert isinstance(context.storage, S3Storage)
    context.storage.ensure_bucket()
    try:
        yield context, proxy
    finally:
        proxy.down()
        context.engine.dispose()


def test_a_report_the_store_fails_to_delete_after_a_deletion_is_deleted_by_the_sweep(
    s3_ctx_behind_proxy: tuple[WorkerContext, TcpProxy], classifier: Classifier, slice_png: bytes
) -> None:
    """An admin deletes the job while its PDF renders (the purge sees no PDF yet), and the store
    goes down before the render can delete what it stored: the PDF is owed, not forgotten, and
    the first sweep after the outage deletes it."""
    from worker import reports, sweep

    ctx, proxy = s3_ctx_behind_proxy
    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png)
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED
    pdf = job_key(load_job(ctx, job_id).org_id, job_id, REPORT_PDF_NAME)
    put = ctx.storage.put

    def deleted_then_stored_then_outage(key: str, data: bytes, content_type: str) -> StoredObject:
        _purge(ctx, job_id)
        out = put(key, data, content_type)
        proxy.down()
        return out

    ctx.storage.put = deleted_then_stored_then_outage  # type: ignore[method-assign]
    assert reports.render_stored(ctx, job_id) is None
    assert load_job(ctx, job_id).report_key is None
    proxy.up()
    assert ctx.storage.exists(pdf)  # the outage kept it

    assert sweep.run(context=ctx)["deletions_pending"] == 0
    assert not ctx.storage.exists(pdf)


def test_a_report_stored_but_never_recorded_goes_with_the_job(
    ctx: WorkerContext, classifier: Classifier, slice_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render stored the PDF, then could not record it (database down, worker killed): no row
    points at the PDF, yet it shows the slice and the result, so deleting the job removes it."""
    from api.domain import jobs
    from api.domain.errors import DatabaseUnavailable
    from worker import reports

    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png)
    assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED

    def database_down(*args: object, **kwargs: object) -> Job:
        raise DatabaseUnavailable()

    monkeypatch.setattr(jobs, "set_report_key", database_down)
    with pytest.raises(DatabaseUnavailable):
        reports.render_stored(ctx, job_id)
    assert "report.pdf" in _kept_objects(ctx, job_id) and load_job(ctx, job_id).report_key is None
    _purge(ctx, job_id)
    assert _kept_objects(ctx, job_id) == []


def test_artifacts_of_a_run_that_could_not_record_them_go_with_the_job(
    ctx: WorkerContext, classifier: Classifier, slice_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every delivery stored a heatmap and overlay, then could not record its result: the job
    fails `internal_error` with no artifact on its row, and deleting it removes them all the same."""
    from api.domain import jobs
    from api.domain.errors import DatabaseUnavailable

    model_cache.set_classifier(classifier)
    job_id = make_job(ctx, slice_png)

    def database_down(*args: object, **kwargs: object) -> Job:
        raise DatabaseUnavailable()

    monkeypatch.setattr(jobs, "mark_succeeded", database_down)
    for _ in range(pipeline.MAX_ATTEMPTS):
        status = pipeline.run(job_id, context=ctx)
    assert status is JobStatus.FAILED and load_job(ctx, job_id).error_code == "internal_error"
    assert _kept_objects(ctx, job_id) == ["heatmap.png", "input", "overlay.png"]
    _purge(ctx, job_id)
    assert _kept_objects(ctx, job_id) == []


def test_missing_model_fails_the_job_with_its_code(ctx: WorkerContext, slice_png: bytes) -> None:
    """No loadable artifact: the job fails with model_load_error, not a stack trace."""
    model_cache.set_classifier(None)
    ctx.settings.model_path = ctx.settings.data_dir / "no-such-model"
    try:
        job_id = make_job(ctx, slice_png)
        assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED
        job = load_job(ctx, job_id)
        assert job.error_code == "model_load_error"
    finally:
        model_cache.set_classifier(None)


def _decode(png: bytes) -> np.ndarray:
    from ml_core.decoding import decode
    from ml_core.preprocessing import to_slice_u8

    return to_slice_u8(decode(png))


def test_a_worker_serving_an_either_gate_names_both_gates_in_the_content_check(
    ctx: WorkerContext, slice_png: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Through the micro-batched gate the job's content check carries the union's score (threshold
    0.5) and each gate's own score and threshold; the second gate admitting everything passes it."""
    from ml_core.classifier import write_untrained_artifact

    folder = write_untrained_artifact(
        tmp_path_factory.mktemp("either") / "art", gate_threshold=1.0, either_gate_threshold=0.0
    )
    model_cache.set_classifier(Classifier.load(folder, runtime="tf"))
    try:
        job_id = make_job(ctx, slice_png)
        assert pipeline.run(job_id, context=ctx) is JobStatus.SUCCEEDED
    finally:
        model_cache.set_classifier(None)
    job = load_job(ctx, job_id)
    assert job.validation is not None
    content = next(c for c in job.validation["checks"] if c["name"] == "content")
    assert content["passed"] is True
    assert "(threshold 0.500; passes when either gate accepts: gate " in content["detail"]
    assert "(threshold 1.000); second gate " in content["detail"]
    assert content["detail"].endswith("(threshold 0.000))")
