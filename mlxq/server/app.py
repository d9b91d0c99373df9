"""The HTTP side: Starlette routes for the OpenAI endpoints, server-sent events, errors.

Handlers validate and tokenize on the event loop, hand the request to the scheduler
thread and relay its events: as SSE chunks (``stream: true``) or as one JSON object. A
client that disconnects cancels its request, which frees its batch slot and KV memory.
"""

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import protocol
from .protocol import ApiError

# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 16 * 2**20


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _json_body(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise protocol.bad(f"the request body is not valid JSON: {e}") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The served model, its scheduler and the Starlette app over them."""

    def __init__(self, scheduler, tokenizer, served: protocol.ServedModel):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.served = served
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            self.scheduler.stop()

    # --- tokenizing ----------------------------------------------------------------------------
    def encode_messages(self, messages) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "has_chat_template", False):
            try:
                return list(tok.apply_chat_template(messages, add_generation_prompt=True))
            except Exception as e:  # noqa: BLE001 - a template may reject a role order
                raise protocol.bad(f"the model's chat template rejected the messages: {e}",
                                   "messages") from None
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        from ..prompt import encode_prompt

        return encode_prompt(self.tokenizer, text, chat_template=False)

    # --- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.served.id, "object": "model", "created": 0, "owned_by": "mlxq"}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.served.id,
                             **self.scheduler.stats()})

    async def _complete(self, request: Request, chat: bool):
        try:
            body = await _json_body(request)
            if chat:
                params = protocol.parse_chat(body, self.served, self.encode_messages)
            else:
                params = protocol.parse_completion(body, self.served, self.encode_text)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def emit(event):  # called on the scheduler thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the loop is closed: nobody is listening
                    pass

            seq_id = self.scheduler.submit(params, emit)
        except ApiError as e:
            return error_response(e)
        rid = protocol.new_id(chat)
        if params.stream:
            return StreamingResponse(self._stream(params, rid, seq_id, events),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, params, rid, seq_id, events)

    async def _whole(self, request, params, rid, seq_id, events):
        parts, entries = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if event["type"] == "text":
                    parts.append(event["text"])
                    entries += event.get("logprobs", ())
                elif event["type"] == "error":
                    return error_response(ApiError(500, event["message"]))
                else:
                    return JSONResponse(protocol.completion_object(
                        params, rid, self.served.id, "".join(parts), event["finish_reason"],
                        event["usage"], entries))
        finally:
            self.scheduler.cancel(seq_id)  # no-op once finished

    async def _stream(self, params, rid, seq_id, events):
        model = self.served.id
        first = True
        try:
            if params.chat:  # the role comes first, as OpenAI sends it
                yield _sse(protocol.chunk_object(params, rid, model, "", None, first=True))
                first = False
            while True:
                event = await events.get()
                if event["type"] == "text":
                    yield _sse(protocol.chunk_object(params, rid, model, event["text"], None,
                                                     first=first,
                                                     entries=event.get("logprobs")))
                    first = False
                elif event["type"] == "error":
                    yield _sse(ApiError(500, event["message"]).body())
                    break
                else:
                    yield _sse(protocol.chunk_object(params, rid, model, "",
                                                     event["finish_reason"]))
                    if params.include_usage:
                        yield _sse(protocol.chunk_object(params, rid, model, None, None,
                                                         usage_=event["usage"]))
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Also reached when the client disconnects (the generator is closed).
            self.scheduler.cancel(seq_id)

    # --- errors ----------------------------------------------------------------------------------
    async def _http_error(self, request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in
                   (404, 405) else str(exc.detail))
        return error_response(ApiError(exc.status_code, message, code=code))

    async def _crash(self, request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}"))
