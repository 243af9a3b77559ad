"""`wsi-llava serve`: an OpenAI-compatible slide chat API and a web viewer (see docs/serving.md).

Modules, one job each: ``config`` (ServeConfig), ``errors`` (OpenAI error format), ``security``
(slide paths inside the root, bearer tokens), ``caches`` (bounded LRU), ``schema`` (request
parsing), ``batching`` (bounded queue + worker thread), ``generation`` (one batched generate with
per-row stops and streaming), ``app`` (FastAPI routes), ``cli`` (the command), ``tiny`` (a tiny
served model for tests and benchmarks).
"""
