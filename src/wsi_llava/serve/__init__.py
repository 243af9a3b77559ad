"""`wsi-llava serve`: an OpenAI-compatible slide chat API and a web viewer (see docs/serving.md).

Modules, one job each: ``config`` (ServeConfig), ``errors`` (OpenAI error format), ``security``
(slide paths inside the root, bearer tokens), ``caches`` (bounded LRU), ``schema`` (pydantic request
models), ``responses`` (pydantic response models), ``guard`` (Host, Content-Type and body-size checks),
``slide_reader`` (slide reads off the event loop), ``deepzoom`` (the raw slide behind a slide id as Deep
Zoom tiles for the viewer), ``images`` (ROI images through the tile encoder),
``batching`` (bounded queue + worker thread), ``generation`` (one batched generate with per-row stops
and streaming), ``server`` (what a running server holds), ``completions`` (the chat route), ``app``
(the FastAPI app and routes), ``cli`` (the command).
"""
