"""`mlx-unified-server` (and `python -m mlx_unified.server`): a local OpenAI-compatible server.

`/v1/chat/completions` (streamed or not; text, images, audio and video; tools; thinking; JSON output),
`/v1/audio/transcriptions` (any length), `/v1/models` and `/health`, over one loaded model answering one
request at a time. The modules: `cli` (flags, start-up), `app` (endpoints, limits, API key), `chat` and
`transcription` (requests in, replies out), `media` (content parts, what files may be read), `worker`
(the queue and cancellation), `errors` (OpenAI's error shape). Limits and error codes: docs/SERVER.md.
"""

