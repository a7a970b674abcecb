"""The OpenAI Images API: POST /v1/images/generations and /v1/images/edits (JSON or multipart), answered when the
images are ready, or streamed (`stream: true`) as server-sent events: `image_generation.partial_image` step
previews, then `image_generation.completed` per image. Extensions: seed, steps, guidance, true_cfg,
negative_prompt, lora, strength (edits). Also GET /v1/models."""

import asyncio
import base64
import hashlib
import io
import json
import shutil
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..files import atomic_write
from . import jobs as states
from .common import (ServerState, authenticate, job_error, make_spec, pick_model, read_json, require_ready,
                     result_bytes, result_url, state_of, submit, wait_for)
from .errors import OPENAI_PARAMS, APIError, bad_request
from .jobs import Job
from .loras import resolve_loras
from .specs import JobSpec

router = APIRouter()

RESPONSE_FORMATS = ("b64_json", "url")
EDIT_STRENGTH_WITHOUT_MASK = 0.6  # a whole-image edit keeps the source's layout; a masked one redoes its area fully


def parse_size(value) -> tuple[int | None, int | None]:
    if value is None or value == "auto":
        return None, None
    parts = value.lower().split("x") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() and 0 < len(p) <= 5 for p in parts):
        raise bad_request(f"size: expected 'WIDTHxHEIGHT' (e.g. '64x64') or 'auto', got {value!r:.40}", "size")
    return int(parts[0]), int(parts[1])


def _fields(body: dict, state: ServerState) -> dict:
    """The request's fields under fluxion's names (see specs.build_spec)."""
    width, height = parse_size(body.get("size"))
    if body.get("background") == "transparent":
        raise bad_request("background: 'transparent' is not supported; use 'opaque' or 'auto'", "background")
    return {"prompt": body.get("prompt"), "negative_prompt": body.get("negative_prompt"), "n": body.get("n"),
            "width": width, "height": height, "steps": body.get("steps"), "guidance": body.get("guidance"),
            "true_cfg": body.get("true_cfg"), "seed": body.get("seed"), "output_format": body.get("output_format"),
            "output_compression": body.get("output_compression"), "strength": body.get("strength"),
            "partial_images": body.get("partial_images") if body.get("stream") else 0,
            "loras": resolve_loras(body.get("lora"), state.config.adapters_dir)}


def _options(body: dict) -> tuple[str, bool]:
    response_format = body.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"response_format: expected 'b64_json' or 'url', got {response_format!r:.40}",
                          "response_format")
    stream = body.get("stream", False)
    if stream not in (True, False, None):
        raise bad_request(f"stream: expected true or false, got {stream!r:.40}", "stream")
    return response_format, bool(stream)


@router.get("/v1/models")
async def list_models(request: Request, owner: str = Depends(authenticate)):
    state = state_of(request)
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "fluxion"}
                                       for name in state.config.models]}


@router.post("/v1/images/generations")
async def generations(request: Request, owner: str = Depends(authenticate)):
    state = state_of(request)
    body = await read_json(request)
    require_ready(state)
    model = pick_model(state, body.get("model"))
    response_format, stream = _options(body)
    spec = await make_spec(state, await run_in_threadpool(_fields, body, state), model=model, names=OPENAI_PARAMS)
    payload = {k: v for k, v in body.items() if k != "stream"}
    job = await submit(state, request, api="openai", owner=owner, spec=spec, payload=payload)
    if stream:
        return _stream(state, job, spec, response_format, "image_generation")
    return await _answer(state, job, spec, response_format)


@router.post("/v1/images/edits")
async def edits(request: Request, owner: str = Depends(authenticate)):
    state = state_of(request)
    body, files = await _read_edit_body(request, state)
    require_ready(state)
    model = pick_model(state, body.get("model"))
    response_format, stream = _options(body)
    if files.get("image") is None:
        raise bad_request("image: required (the image to edit, as a multipart file)", "image",
                          code="missing_required_parameter")
    job_id = Job.new_id()
    image, mask = files["image"], files.get("mask")
    if mask is None and _has_transparency(image):  # as OpenAI: without a mask, the image's transparent area
        mask = image
    if mask is not None:
        mask = _redo_mask(mask, image.size)
    fields = await run_in_threadpool(_fields, body, state)
    if fields["strength"] is None:
        fields["strength"] = 1.0 if mask is not None else EDIT_STRENGTH_WITHOUT_MASK
    info = await run_in_threadpool(state.engine.pool.info, model)
    if fields["width"] is None:  # the image's own size when the model takes it, else the model's default
        fields["width"], fields["height"] = _edit_size(image.size, info)
    rgb = image.convert("RGB")
    fields.update(images={"image": rgb, "mask_image": mask}, image=f"inputs/{job_id}/image.png",
                  image_sha256=_pixels_sha256(rgb), mask=f"inputs/{job_id}/mask.png" if mask is not None else None,
                  mask_sha256=_pixels_sha256(mask) if mask is not None else None)
    spec = await make_spec(state, fields, model=model, names=OPENAI_PARAMS, kind="edit")
    await run_in_threadpool(_save_inputs, state, job_id, rgb, mask)
    payload = {**{k: v for k, v in body.items() if k != "stream"}, "image_sha256": spec.image_sha256,
               "mask_sha256": spec.mask_sha256}
    try:
        job = await submit(state, request, api="openai", owner=owner, spec=spec, payload=payload, job_id=job_id)
    except APIError:  # refused (queue full, a reused Idempotency-Key): no job will read these files
        await run_in_threadpool(_remove_inputs, state, job_id)
        raise
    if job.id != job_id:  # the Idempotency-Key's earlier job: this request's copies are not needed
        await run_in_threadpool(_remove_inputs, state, job_id)
    if stream:
        return _stream(state, job, spec, response_format, "image_edit")
    return await _answer(state, job, spec, response_format)


# -- answers ----------------------------------------------------------------------------------------------------
async def _answer(state: ServerState, job: Job, spec: JobSpec, response_format: str):
    job = await wait_for(state, job.id, state.config.request_timeout_s)
    if job is None:
        raise APIError(410, "the job's results have expired", code="expired")
    if not job.finished:
        raise APIError(504, f"job {job.id} is still running after {state.config.request_timeout_s:g} s; poll "
                            f"GET /v1/jobs/{job.id}", type="server_error", code="timeout")
    if job.state != states.READY:
        raise job_error(job)
    data = []
    if response_format == "url":
        data = [{"url": result_url(state, job, r["file"]), "revised_prompt": None, "seed": r["seed"]}
                for r in job.results]
    else:
        blobs = await run_in_threadpool(result_bytes, state, job)
        data = [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": None, "seed": r["seed"]}
                for b, r in zip(blobs, job.results)]
    return JSONResponse({"created": int(job.created_at), "id": job.id, "data": data,
                         "output_format": spec.output_format, "size": f"{spec.width}x{spec.height}",
                         "background": "opaque", "quality": "auto", "usage": _usage()}, headers=_replica(job))


def _replica(job: Job) -> dict:
    """Under Ray Serve (ray_app), which renderer replica made the images."""
    replicas = sorted({r["replica"] for r in job.results or [] if r.get("replica")})
    return {"X-Fluxion-Replica": ",".join(replicas)} if replicas else {}


def _usage() -> dict:
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _stream(state: ServerState, job: Job, spec: JobSpec, response_format: str, prefix: str) -> StreamingResponse:
    """Step previews as they come, then one completed event per image (or an error event)."""
    engine = state.engine
    common = {"background": "opaque", "output_format": spec.output_format, "quality": "auto",
              "size": f"{spec.width}x{spec.height}"}

    async def events():
        queue = engine.hub.subscribe(job.id)
        deadline = time.monotonic() + state.config.request_timeout_s
        try:
            while True:
                current = await run_in_threadpool(engine.store.get, job.id)
                if current is None or current.finished or time.monotonic() > deadline:
                    break
                try:
                    event = await _next(queue)
                except TimeoutError:
                    continue
                if event["type"] == "partial":
                    yield _sse(f"{prefix}.partial_image", {
                        "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(event["data"]).decode(),
                        "created_at": int(time.time()), "partial_image_index": event["partial_image_index"],
                        "image_index": event["image_index"], "id": job.id, **common})
                elif event["type"] == "end":
                    break
        finally:
            engine.hub.unsubscribe(job.id, queue)
        final = await run_in_threadpool(engine.store.get, job.id)
        if final is None or final.state != states.READY:
            error = job_error(final) if final is not None else APIError(410, "the job expired", code="expired")
            if final is not None and not final.finished:
                error = APIError(504, f"job {job.id} is still running", type="server_error", code="timeout")
            yield _sse("error", error.body())
            return
        blobs = await run_in_threadpool(result_bytes, state, final)
        for index, (blob, record) in enumerate(zip(blobs, final.results)):
            image = ({"url": result_url(state, final, record["file"])} if response_format == "url" else
                     {"b64_json": base64.b64encode(blob).decode()})
            yield _sse(f"{prefix}.completed", {"type": f"{prefix}.completed", **image, "created_at": int(time.time()),
                                               "image_index": index, "seed": record["seed"], "id": final.id,
                                               "usage": _usage(), **common})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _next(queue):
    return await asyncio.wait_for(queue.get(), timeout=1.0)


# -- edits' inputs ------------------------------------------------------------------------------------------------
async def _read_edit_body(request: Request, state: ServerState) -> tuple[dict, dict]:
    """Multipart (as the OpenAI client sends it) -> (fields, {"image", "mask"} as PIL images)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request("/v1/images/edits takes multipart/form-data with the image file", "image",
                          code="invalid_content_type")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=1 << 20)
    except APIError:
        raise
    except Exception as e:  # starlette's MultiPartException and malformed bodies
        raise bad_request(f"could not read the multipart body: {e}", None, code="invalid_multipart") from None
    body, files = {}, {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            if name in ("image", "mask") and name not in files:
                files[name] = _open_upload(name, await value.read(), state.config.max_input_pixels)
            continue
        body[name] = _form_value(name, value)
    await form.close()
    return body, files


_INTEGERS = ("n", "seed", "steps", "partial_images", "output_compression")
_NUMBERS = ("guidance", "true_cfg", "strength")


def _form_value(name: str, value: str):
    """Multipart fields are text: numbers, booleans and the lora list (JSON) are read back to their types."""
    try:
        if name in _INTEGERS:
            return int(value)
        if name in _NUMBERS:
            return float(value)
    except ValueError:
        raise bad_request(f"{name}: expected a number, got {value!r:.40}", name) from None
    if name == "stream":
        if value.lower() not in ("true", "false"):
            raise bad_request(f"stream: expected true or false, got {value!r:.40}", "stream")
        return value.lower() == "true"
    if name == "lora":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad_request("lora: expected a JSON list of {\"name\" or \"path\", \"scale\"}", "lora") from None
    return value


def _open_upload(name: str, data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:  # checked from the header, before decoding a bomb
                raise bad_request(f"{name}: {im.width}x{im.height} is more than the server's {max_pixels} pixels",
                                  name, code="image_too_large")
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{name}: not an image PIL can read ({e})", name, code="invalid_image") from None


def _has_transparency(image: Image.Image) -> bool:
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 128


def _redo_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (transparent = edit this area) -> fluxion's (white = redo). A mask without an alpha channel
    is read as fluxion's own convention, white = redo."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        redo = alpha.point(lambda a: 255 if a < 128 else 0)
    else:
        redo = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    return redo.resize(size, Image.Resampling.NEAREST) if redo.size != size else redo


def _edit_size(size: tuple[int, int], info) -> tuple[int, int]:
    width, height = (max(16, s // 16 * 16) for s in size)
    if info.sizes is None or info.sizes.contains(height, width):
        return width, height
    return info.default_size, info.default_size


def _pixels_sha256(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _save_inputs(state: ServerState, job_id: str, image: Image.Image, mask: Image.Image | None) -> None:
    folder = state.engine.inputs_dir / job_id
    atomic_write(folder / "image.png", lambda tmp: image.save(tmp, format="PNG"))
    if mask is not None:
        atomic_write(folder / "mask.png", lambda tmp: mask.save(tmp, format="PNG"))


def _remove_inputs(state: ServerState, job_id: str) -> None:
    shutil.rmtree(state.engine.inputs_dir / job_id, ignore_errors=True)
