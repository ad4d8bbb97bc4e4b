"""Every setting of the search service, in one place (flags + CLIPSEARCH_SEARCH_* variables)."""

from __future__ import annotations

from dataclasses import dataclass

from clipsearch.options import option
from clipsearch.serving import ServerConfig

ENV_PREFIX = "CLIPSEARCH_SEARCH_"
DEFAULT_PORT = 50052
# Search-time defaults of --search-ef and --search-nprobe, from results/ann.md (10k, 100k
# and 1M rows on a milvus 2.3.5 server): HNSW ef 64 found every true top-10 unfiltered;
# IVF_FLAT (nlist 128) at nprobe 16 kept recall@10 >= 0.996 under a 10% filter at every
# size, where nprobe 8 (13 ms p50 instead of 22 at 1M) fell to 0.969 at 10k.
DEFAULT_SEARCH_EF = 64
DEFAULT_SEARCH_NPROBE = 16


@dataclass
class SearchConfig(ServerConfig):
    port: int = option("port to listen on", default=DEFAULT_PORT)
    encoder: str = option("encoder address(es): host:port, a comma-separated list balanced "
                          "round-robin, or dns:///name:port (or ipv4:a:port,b:port) to balance "
                          "over every address of one target; calls go only to replicas whose "
                          "health is SERVING", default="127.0.0.1:50051")
    encoder_token: str = option("bearer token sent to the encoder", default="")
    encoder_tls_ca: str = option("PEM CA bundle to verify the encoder's certificate", default="")
    encoder_tls_cert: str = option("PEM client certificate for mTLS to the encoder", default="")
    encoder_tls_key: str = option("PEM private key for --encoder-tls-cert", default="")
    encoder_timeout_s: float = option("deadline of one encoder call (the caller's remaining "
                                      "deadline, when shorter, wins)", default=30.0)
    encoder_retries: int = option("retries of an encoder call that got UNAVAILABLE, with "
                                  "exponential backoff, across replicas", default=3)
    encoder_wait_s: float = option("at startup, how long to wait for the encoder to serve",
                                   default=600.0)
    milvus: str = option("Milvus: a local path (Milvus Lite, e.g. ./data/milvus.db) or "
                         "http://host:19530 (a Milvus server)", default="./data/milvus.db")
    milvus_token: str = option("Milvus server token (user:password or API key)", default="")
    collection: str = option("Milvus collection name", default="clipsearch_images")
    index_type: str = option("vector index for a new collection: FLAT (exact, the default; "
                             "Lite's HNSW/IVF miss rows under filters), AUTO (FLAT on Milvus "
                             "Lite, an ANN index on a server; results/ann.md), HNSW, "
                             "IVF_FLAT, IVF_SQ8, ...; an existing collection keeps its own",
                             default="FLAT")
    search_ef: int = option("HNSW: candidates explored per search (ef; raised to top_k when "
                            "smaller); more is slower and finds more, see results/ann.md",
                            default=DEFAULT_SEARCH_EF)
    search_nprobe: int = option("IVF_FLAT/IVF_SQ8: lists probed per search (nprobe); more is "
                                "slower and finds more, see results/ann.md",
                                default=DEFAULT_SEARCH_NPROBE)
    allow_raw_filters: bool = option("accept raw Milvus filter expressions from callers",
                                     default=False)
    max_top_k: int = option("largest top_k a search may ask for", default=1000)
    index_batch: int = option("images per encoder call and Milvus write during Index "
                              "(fewer where the encoder takes fewer per call, or where their "
                              "bytes would pass its message limit)", default=32)
    index_pipeline: int = option("Index batches prepared at once (checked, looked up, "
                                 "encoded) while the oldest is stored; more keeps a fast "
                                 "(GPU) encoder busy, see results/gpu.md", default=2)
    max_uri_bytes: int = option("longest uri accepted at Index", default=2048)
    max_metadata_bytes: int = option("largest metadata JSON accepted at Index", default=16384)
    max_pixels: int = option("largest image accepted, in pixels", default=40_000_000)
    blas_threads: int = option("threads numpy's BLAS may use (Milvus Lite's exact search runs "
                               "on it); more threads spin between small searches and starve "
                               "the gRPC threads (0: BLAS's default)", default=1)
    query_batch_delay_ms: float = option("how long a search waits for concurrent searches to "
                                         "share its encoder call and Milvus search",
                                         default=0.0)
    query_batches: int = option("search batches (each one encoder call and one Milvus "
                                "search for the queries that queued) in flight at once",
                                default=2)
    query_cache: bool = option("keep query texts' vectors (keyed by the text and the "
                               "encoder's model fingerprint) so a repeated query skips the "
                               "encoder; --no-query-cache turns it off", default=True)
    query_cache_mb: float = option("bytes the query cache may hold, in MiB (least recently "
                                   "used first out; ~2.4 KiB per 512-d query)", default=64.0)
    duplicates_spill_dir: str = option("directory of FindDuplicates' temporary vector file "
                                       "(4 bytes per dimension per scanned row: 2 GiB for "
                                       "1M 512-d rows; unnamed, freed when the call ends); "
                                       "empty: the system's temporary directory (TMPDIR); "
                                       "put it on disk, not tmpfs", default="")
