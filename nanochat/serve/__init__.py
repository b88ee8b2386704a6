"""The chat server: everything between an HTTP request and the model replicas; it trains nothing itself
(live learning's training is nanochat/continual/adapter_train.py) and knows no stage's data.

    app.py          create_app: replicas, live learning, guards and routes put together; serve_in_thread
    routes.py       the page, the OpenAI completions, models, health, stats, metrics
    scheduler.py    continuous batching for one replica: every active request one row of one forward,
                    ragged KV cache, per-row adapters and tools
    replicas.py     one scheduler per device behind the server, tokens turned into reply events
    openai_api.py   the HTTP bodies: OpenAI-compatible and page requests, limits, replies, SSE
    security.py     API/admin keys, request deadlines, the exposure check, the documented errors
    live.py         live learning: background adapter jobs with replay, adapters kept on disk
    live_routes.py  /learn and /adapters routes over live.py
    ui.html         the chat page (one file, no CDN, no build step)
"""
