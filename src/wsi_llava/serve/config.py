"""Settings of ``wsi-llava serve`` (one dataclass; the CLI maps its flags onto it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.tissue import MIN_TISSUE_FRACTION

#: environment variable read for the bearer token when ``--api-key`` is not given
API_KEY_ENV = "WSI_LLAVA_API_KEY"


@dataclass
class ServeConfig:
    """What the server serves and the bounds it enforces."""

    model: str
    """Folder of a trained WSI-LLaVA model (``save_pretrained`` output with its tokenizer)."""
    slides_root: str
    """Folder whose slide files (recursively: ``.h5``/``.hdf5``, and raw slides ``.svs``, ``.tif``, ``.ndpi`` …,
    used with ``tile_weights``) may be referenced by clients; nothing outside it is read."""
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; anything else exposes the server to the network."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Bearer token required on every ``/v1`` route (None: no authentication)."""
    model_name: str | None = None
    """Model id reported by ``/v1/models`` and required in requests (default: the model folder's name)."""
    max_batch: int = 8
    """Most requests generated together in one batch (1 = one at a time)."""
    queue_size: int = 64
    """Most requests waiting for the worker; more are answered 429."""
    request_timeout: float = 120.0
    """Seconds a request may take from arrival to its last token (queue wait included); then 504."""
    max_body_bytes: int = 1_048_576
    """Largest accepted request body; larger ones are answered 413."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for; larger values are answered 400."""
    default_max_tokens: int = 256
    """``max_tokens`` when a request gives none (capped by ``max_tokens_limit``)."""
    max_messages: int = 128
    """Most messages in one request."""
    slide_cache_items: int = 32
    """Most loaded slides (sampled tile features + coordinates) kept in memory."""
    slide_cache_bytes: int = 2 * 2**30
    """Memory bound of the slide cache (bytes of features + coordinates)."""
    visual_cache_items: int = 256
    """Most per-slide visual encodings (tower → selection → projector output) kept."""
    visual_cache_bytes: int = 512 * 2**20
    """Memory bound of the visual cache (bytes)."""
    device: str = "auto"
    """Where the model runs: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1`` …"""
    precision: str = "auto"
    """``auto``/``fp32``/``bf16``/``fp16``, decided by :func:`wsi_llava.precision.resolve_precision`
    (half precision only where the device runs it fast, unless ``force_precision``)."""
    force_precision: bool = False
    """Use ``precision`` as given even where it runs slowly."""
    torch_threads: int | None = None
    """Intra-op CPU threads of the generation worker (None: torch's default). Tiny models and busy
    machines run faster on 1."""
    max_listed_slides: int = 10_000
    """Most entries ``GET /v1/slides`` returns (the answer says when it is truncated)."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host names (``Host`` header, port ignored) the server answers; ``*`` = any. None: ``localhost``,
    ``127.0.0.1``, ``[::1]`` and the bound host, enforced only without an API key (against DNS
    rebinding); given explicitly, always enforced."""
    slide_timeout: float = 30.0
    """Seconds one slide file read may take (and may wait for a free reader); then 504 ``slide_timeout``."""
    slide_readers: int = 2
    """Slide reads running at a time (worker processes or threads)."""
    slide_reader: str = "process"
    """``process``: reads in worker processes, killed at the timeout (a read stuck inside HDF5 holds
    the GIL and would freeze a threaded server); ``thread``: a thread pool."""

    tile_weights: str | None = None
    """Tile encoder weights (``.safetensors``/``.bin``, local): enables ``image_url`` content parts (ROI
    images, tiled and encoded when asked, see :mod:`~wsi_llava.serve.images`) and raw slides (tile
    features extracted on first use and cached, :mod:`~wsi_llava.infer.slide_features`). None: image
    parts are answered 400 ``images_not_enabled``, raw slides 400 ``raw_slides_not_enabled``."""
    tile_encoder: str | None = None
    """``gigapath``, ``uni``, ``vit`` or ``timm:<arch>`` (None: the name in the weights' metadata)."""
    max_image_pixels: int = 8192 * 8192
    """Largest ROI image (width × height) accepted; larger ones are answered 400 ``image_too_large``."""
    max_image_bytes: int = 64 * 2**20
    """Largest ROI image file (encoded bytes) accepted; larger ones are answered 400 ``image_too_large``."""
    image_cache_items: int = 64
    """Most encoded ROI images (tile features + coordinates, keyed by the image's SHA-256) kept."""
    image_cache_bytes: int = 256 * 2**20
    """Memory bound of the image cache (bytes of features + coordinates)."""
    feature_cache: str | None = None
    """Folder of the cached tile features of raw slides (None: ``~/.cache/wsi-llava/features``,
    :func:`~wsi_llava.infer.slide_features.default_cache_dir`)."""
    magnification: float = 20.0
    """Magnification raw slides are tiled at."""
    tile_size: int = 256
    """Tile side of raw slides in pixels at ``magnification``."""
    min_tissue: float = MIN_TISSUE_FRACTION
    """A raw slide's tile is kept when at least this share of it is tissue."""
    mpp_csv: str | None = None
    """CSV ``slide,mpp``: the pixel size of raw slides that do not record it (or a correction)."""

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_tokens_limit", "default_max_tokens",
                     "max_messages", "max_listed_slides", "max_image_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.slide_timeout <= 0 or self.slide_readers < 1:
            raise ValueError(f"slide_timeout must be > 0 and slide_readers >= 1, got {self.slide_timeout}, "
                             f"{self.slide_readers}")
        if self.slide_reader not in ("process", "thread"):
            raise ValueError(f"slide_reader must be 'process' or 'thread', got {self.slide_reader!r}")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_limit)
