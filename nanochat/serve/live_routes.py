"""The live-learning routes of the server (POST /learn, GET /learn, GET and DELETE /learn/{job}, GET /adapters,
POST /adapters/{name}/activate, DELETE /adapters/{name}) as a FastAPI router over a
nanochat.serve.live.LiveLearning; the learning itself (jobs, adapters on disk and on the replicas) is live.py's."""
import time
from typing import Literal

from fastapi import APIRouter

from nanochat.serve.live import AdapterLimit, JobEnded, JobQueueFull, facts_to_conversations
from nanochat.serve.openai_api import (
    PageMessage,
    RequestError,
    StrictBody,
    check_messages,
    content_chars,
    error_response,
)
from nanochat.serve.security import documented_errors


class Fact(StrictBody):
    question: str
    answer: str


class LearnRequest(StrictBody):
    adapter: str
    facts: list[Fact] = []
    conversations: list[list[PageMessage]] = []
    steps: int = 150
    replace: bool = False  # the same as "mode": "replace"
    mode: Literal["new", "replace", "add"] | None = None  # default: "new" ("replace" with replace: true)


def learn_examples(body, tokenizer, context, limits):
    """A LearnRequest's facts and conversations -> conversations to train on, each checked against the limits
    and the model's context (tokens); raises RequestError naming the first bad one."""
    n = len(body.facts) + len(body.conversations)
    if n == 0:
        raise RequestError("nothing to learn: send \"facts\": [{\"question\", \"answer\"}, ...] and/or "
                           "\"conversations\": [[messages], ...]", "facts")
    if n > limits.max_learn_items:
        raise RequestError(f"{n} facts and conversations; the limit is {limits.max_learn_items} per request "
                           "(--max-learn-items)", "facts")
    for i, f in enumerate(body.facts):
        for key in ("question", "answer"):
            text = getattr(f, key)
            if not text.strip():
                raise RequestError(f"facts[{i}].{key} is empty", f"facts[{i}].{key}")
            if len(text) > limits.max_message_chars:
                raise RequestError(f"facts[{i}].{key} is {len(text)} characters; the limit is "
                                   f"{limits.max_message_chars} (--max-message-chars)", f"facts[{i}].{key}")
    convs = facts_to_conversations([f.model_dump() for f in body.facts])
    for i, c in enumerate(body.conversations):
        messages = [m.model_dump() for m in c]
        if not messages or messages[-1]["role"] != "assistant":
            raise RequestError(f"conversations[{i}] must end with the assistant's message: that is what is "
                               "learned", f"conversations[{i}]")
        try:
            check_messages(messages[:-1], limits)  # the prompt: roles, sizes, ends with the user
        except RequestError as e:
            raise RequestError(f"conversations[{i}]: {e.message}", f"conversations[{i}]") from None
        if content_chars(messages[-1]["content"]) > limits.max_message_chars:
            raise RequestError(f"conversations[{i}]: the reply is longer than {limits.max_message_chars} "
                               "characters (--max-message-chars)", f"conversations[{i}]")
        convs.append(messages)
    for i, c in enumerate(convs):
        n_tokens = len(tokenizer.render_conversation(c, max_tokens=10 ** 9)[0])
        if n_tokens > context:
            raise RequestError(f"example {i} is {n_tokens} tokens; the model's context is {context}",
                               "conversations")
    return convs


def submit_job(lv, body, tokenizer, context, limits):
    """POST /learn: queue the job a LearnRequest asks for on LiveLearning `lv` -> its 202 body, or a 429 response
    when the queue is full; RequestError for what is wrong with the request."""
    if not 1 <= body.steps <= limits.max_learn_steps:
        raise RequestError(f"steps must be between 1 and {limits.max_learn_steps} (--max-learn-steps); "
                           f"got {body.steps}", "steps")
    if body.replace and body.mode not in (None, "replace"):
        raise RequestError(f"\"replace\": true contradicts \"mode\": \"{body.mode}\"; send one of them", "mode")
    convs = learn_examples(body, tokenizer, context, limits)
    try:
        job = lv.submit(body.adapter, convs, body.steps, replace=body.replace, mode=body.mode)
    except ValueError as e:
        raise RequestError(str(e), "adapter") from None
    except KeyError:
        raise RequestError(f"no adapter {body.adapter!r} to add to; leave out \"mode\" to create it "
                           "(GET /adapters lists them)", "adapter", status=404) from None
    except (FileExistsError, AdapterLimit) as e:
        raise RequestError(str(e), "adapter", status=409) from None
    except JobQueueFull as e:
        response = error_response(429, str(e))
        response.headers["Retry-After"] = str(e.retry_after)
        return response
    return {"job": job.id, "adapter": job.adapter, "mode": job.mode, "status": job.status, "steps": job.steps,
            "examples": job.examples, "url": f"/learn/{job.id}"}


def live_router(live, tokenizer, context, limits):
    """The routes for `live` (None: live learning is off, and every route answers 404 saying so).
    context: the model's context in tokens (longer examples are refused); limits: openai_api.Limits."""
    router = APIRouter()

    def need_live():
        if live is None:
            raise RequestError("live learning is off on this server (started with --no-learn)", status=404)
        return live

    @router.post("/learn", status_code=202, responses=documented_errors(400, 401, 403, 404, 409, 413, 415, 429))
    async def learn(body: LearnRequest):
        return submit_job(need_live(), body, tokenizer, context, limits)

    @router.get("/learn", responses=documented_errors(400, 401, 403, 404))
    async def learn_jobs():
        return {"jobs": [job.view(brief=True) for job in need_live().list_jobs()]}

    @router.get("/learn/{job_id}", responses=documented_errors(400, 401, 403, 404))
    async def learn_status(job_id: str):
        job = need_live().job(job_id)
        if job is None:
            raise RequestError(f"no learning job {job_id!r}; GET /learn lists them", status=404)
        return job.view()

    @router.delete("/learn/{job_id}", responses=documented_errors(400, 401, 403, 404, 409))
    async def learn_cancel(job_id: str):
        try:
            job = need_live().cancel(job_id)
        except KeyError:
            raise RequestError(f"no learning job {job_id!r}; GET /learn lists them", status=404) from None
        except JobEnded as e:
            raise RequestError(str(e), status=409) from None
        # a running job stops at its next step: "cancelling" until GET /learn/<job> says "cancelled"
        return {"job": job.id, "adapter": job.adapter, "status": job.status if job.status == "cancelled"
                else "cancelling"}

    @router.get("/adapters", responses=documented_errors(400, 401, 404))
    async def adapters():
        return need_live().describe()

    @router.post("/adapters/{name}/activate", responses=documented_errors(400, 401, 403, 404, 415))
    async def activate(name: str):
        lv = need_live()
        t0 = time.perf_counter()
        try:
            lv.set_default(None if name == "none" else name)
        except KeyError:
            raise RequestError(f"no adapter {name!r}; GET /adapters lists them", status=404) from None
        return {"active": lv.default, "switch_ms": round((time.perf_counter() - t0) * 1000, 3)}

    @router.delete("/adapters/{name}", responses=documented_errors(400, 401, 403, 404, 409))
    async def delete(name: str):
        lv = need_live()
        if lv.busy_with(name):
            raise RequestError(f"a job is training adapter {name!r}; delete it after the job ends", status=409)
        try:
            await lv.delete(name)
        except KeyError:
            raise RequestError(f"no adapter {name!r}; GET /adapters lists them", status=404) from None
        return {"deleted": name, "active": lv.default}

    return router
