"""The BFL (Black Forest Labs) API shape: POST /v1/{model} -> {"id", "polling_url"}; GET /v1/get_result?id=...
-> {"id", "status": "Pending" | "Ready" | "Error" | "Task not found", "result": {"sample": URL, ...}}. Results may
also be pushed to a `webhook_url` (webhooks.py). Plus the generic job routes: GET and DELETE /v1/jobs/{id}, and
the signed image URLs, GET /v1/files/{id}/{name}."""

import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from . import jobs as states
from .common import (JOB_ID, ServerState, authenticate, base_url, make_spec, owned_job, pick_model, read_json,
                     require_ready, result_url, state_of, submit)
from .errors import BFL_PARAMS, APIError, bad_request, not_found
from .jobs import Job
from .loras import resolve_loras
from .outputs import media_type
from .webhooks import check_webhook_url

router = APIRouter()

BFL_STATUS = {states.PENDING: "Pending", states.RUNNING: "Pending", states.READY: "Ready", states.ERROR: "Error",
              states.CANCELLED: "Error"}
RESULT_NAME = re.compile(r"^[0-9]{1,4}\.(png|jpg|webp)$")


def bfl_result(state: ServerState, job: Job | None, job_id: str, base: str | None = None) -> dict:
    """GET /v1/get_result's answer (and a BFL job's webhook body)."""
    if job is None:
        return {"id": job_id, "status": "Task not found", "result": None}
    out = {"id": job.id, "status": BFL_STATUS[job.state], "result": None}
    if job.state == states.READY:
        urls = [result_url(state, job, r["file"], base) for r in job.results]
        spec = job.spec
        out["result"] = {"sample": urls[0], "samples": urls, "prompt": spec["prompt"], "seed": spec["seeds"][0],
                         "width": spec["width"], "height": spec["height"], "start_time": job.started_at,
                         "end_time": job.finished_at, "duration": (job.finished_at or 0) - (job.started_at or 0)}
    elif job.state in (states.ERROR, states.CANCELLED):
        out["details"] = {"error": job.error, "param": job.error_param, "cancelled": job.state == states.CANCELLED}
    if job.state in (states.PENDING, states.RUNNING):
        out["details"] = {"state": job.state, "attempts": job.attempts}
    return out


@router.get("/v1/get_result")
async def get_result(request: Request, id: str = "", owner: str = Depends(authenticate)):
    state = state_of(request)
    job = await run_in_threadpool(owned_job, state, id, owner)
    return bfl_result(state, job, id, base_url(request))


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, owner: str = Depends(authenticate)):
    state = state_of(request)
    job = await run_in_threadpool(owned_job, state, job_id, owner)
    if job is None:
        raise not_found(f"no job {job_id!r:.60}", "id", code="job_not_found")
    return _job_json(state, job, base_url(request))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request, owner: str = Depends(authenticate)):
    """Cancel a pending job, or a running one between two steps; a finished job answers 409."""
    state = state_of(request)
    job = await run_in_threadpool(owned_job, state, job_id, owner)
    if job is None:
        raise not_found(f"no job {job_id!r:.60}", "id", code="job_not_found")
    if not await run_in_threadpool(state.engine.cancel, job_id):
        job = state.engine.store.get(job_id)
        raise APIError(409, f"job {job_id} has already ended ({job.state if job else 'expired'})", param="id",
                       code="job_finished")
    return _job_json(state, state.engine.store.get(job_id), base_url(request))


def _job_json(state: ServerState, job: Job, base: str) -> dict:
    return {"id": job.id, "object": "job", "model": job.model, "state": job.state, "attempts": job.attempts,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "error": None if job.error is None else {"message": job.error, "param": job.error_param},
            "results": [{"url": result_url(state, job, r["file"], base), "seed": r["seed"],
                         **{k: r[k] for k in ("replica", "batch") if k in r}}  # under Ray Serve (ray_app)
                        for r in job.results or []] if job.state == states.READY else None}


@router.get("/v1/files/{job_id}/{name}")
async def result_file(job_id: str, name: str, request: Request, exp: str | None = None, sig: str | None = None):
    """A result image, by its signed URL (no API key: the signature, valid until `exp`, is the permission)."""
    state = state_of(request)
    if not state.signer.verify(f"/v1/files/{job_id}/{name}", exp, sig):
        raise APIError(403, "the image URL's signature is missing, wrong or expired", type="permission_error",
                       code="invalid_signature")
    if not JOB_ID.match(job_id) or not RESULT_NAME.match(name):  # signed by us: only if the naming changed
        raise not_found("no such file")
    path = state.engine.result_path(job_id, name)
    if not path.is_file():
        raise not_found("the image has expired or does not exist", code="expired")
    return FileResponse(path, media_type=media_type(path))


@router.post("/v1/{model}")
async def submit_bfl(model: str, request: Request, owner: str = Depends(authenticate)):
    state = state_of(request)
    body = await read_json(request)
    require_ready(state)
    model = pick_model(state, model)
    webhook_url = check_webhook_url(body.get("webhook_url"))
    secret = body.get("webhook_secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) > 256):
        raise bad_request("webhook_secret: expected a string of at most 256 characters", "webhook_secret")
    fields = {"prompt": body.get("prompt"), "negative_prompt": body.get("negative_prompt"),
              "width": body.get("width"), "height": body.get("height"), "steps": body.get("steps"),
              "guidance": body.get("guidance"), "true_cfg": body.get("true_cfg"), "seed": body.get("seed"),
              "output_format": body.get("output_format") or "jpeg",
              "loras": await run_in_threadpool(resolve_loras, body.get("lora"), state.config.adapters_dir)}
    spec = await make_spec(state, fields, model=model, names=BFL_PARAMS)
    job = await submit(state, request, api="bfl", owner=owner, spec=spec, payload={"model": model, **body},
                       webhook_url=webhook_url, webhook_secret=secret)
    return {"id": job.id, "polling_url": f"{base_url(request)}/v1/get_result?id={job.id}"}
