"""Every setting of the encoder service, in one place (flags + CLIPSEARCH_ENCODER_* variables)."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

from clipsearch.options import option
from clipsearch.serving import ServerConfig

ENV_PREFIX = "CLIPSEARCH_ENCODER_"
DEFAULT_PORT = 50051
DECODE_IN = ("auto", "threads", "processes")


@dataclass
class EncoderConfig(ServerConfig):
    port: int = option("port to listen on", default=DEFAULT_PORT)
    model: str = option("CLIP model name (clip.available_models()) or a checkpoint path "
                        "(JIT archive or state dict); or an OpenCLIP model, "
                        "open_clip:ARCH/TAG (open_clip:ViT-B-16-SigLIP/webli) or "
                        "open_clip:ARCH/PATH (a checkpoint file or a folder holding one)",
                        default="ViT-B/32")
    weights_dir: str = option("where named models' weights are looked for and downloaded to",
                              default="~/.cache/clip")
    download: bool = option("download named weights when missing from --weights-dir",
                            default=True)
    weights_mirror: str = option("base URL serving OpenAI's checkpoint layout "
                                 "<mirror>/<sha256>/<file>.pt, asked instead of OpenAI's "
                                 "host (the SHA-256 is still checked; empty: OpenAI)",
                                 default="")
    download_timeout_s: float = option("seconds connecting, or any single read, of a weights "
                                       "download may wait for data before it fails as "
                                       "stalled", default=60.0)
    device: str = option("auto | cpu | cuda | cuda:N (auto takes CUDA when present)",
                         default="auto")
    precision: str = option("auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA, bf16 on a CPU "
                            "with native bf16, else fp32)", default="auto")
    max_batch: int = option("largest model batch the dynamic batcher forms (0: per device, "
                            "32 on a CPU, 256 on a GPU; lower it when warm-up reports that "
                            "it does not fit in GPU memory)", default=0)
    max_delay_ms: float = option("longest a batch waits for more requests once the model is "
                                 "free (0, as Triton's default: batches form from what queued "
                                 "while the previous one ran)", default=0.0)
    max_queue: int = option("items waiting for the model beyond which calls get "
                            "RESOURCE_EXHAUSTED", default=2048)
    max_items_per_call: int = option("most texts or images in one call", default=256)
    max_pixels: int = option("largest decoded image, in pixels (decompression-bomb guard)",
                             default=40_000_000)
    max_text_bytes: int = option("longest text accepted, in UTF-8 bytes", default=4096)
    decode_threads: int = option("threads (or worker processes, see --decode-in) decoding "
                                 "and preprocessing images (0: one per CPU this process may "
                                 "use, by its affinity and cgroup quota; processes: at most "
                                 "16)", default=0)
    decode_in: str = option("where images decode: threads (in the encoder's process), "
                            "processes (worker processes, each with its own Python GIL), or "
                            "auto: processes when the model runs on a GPU, threads on a CPU "
                            "(encoder_service/decoding.py says why)", default="auto")
    decode_nice: int = option("how many steps below the process's OS priority (nice) the "
                              "decoding threads run, so that they do not stall the model's "
                              "OpenMP threads on shared cores; they still have the cores "
                              "whenever the model waits (Linux; 0: same priority)",
                              default=10)
    torch_threads: int = option("intra-op threads for image batches on CPU (0: torch "
                                "default, one per core)", default=0)
    text_threads: int = option("intra-op threads for text batches on CPU (0: as images); "
                               "one suits a machine shared with the search service and "
                               "Milvus: a short text's matrices are too small to share and "
                               "idle OpenMP threads spin on the cores they need; an encoder "
                               "with a CPU machine of its own may do better with 0 under "
                               "load (docs/deployment.md)",
                               default=1)
    omp_wait_policy: str = option("what torch's idle OpenMP threads do between parallel "
                                  "regions, set as OMP_WAIT_POLICY before torch loads: "
                                  "passive (sleep), active (spin), or empty to leave "
                                  "OMP_WAIT_POLICY as the environment has it. Passive "
                                  "because image decoding, gRPC and other processes share "
                                  "the cores: a spinning thread takes a core from them and "
                                  "stalls the next region (results/benchmarks.md, Ingest)",
                                  default="passive")

    def check(self) -> None:
        """Rejects values no run could use (ValueError, with the flag and what it takes)."""
        if self.decode_in not in DECODE_IN:
            raise ValueError(f"--decode-in {self.decode_in!r}: expected "
                             f"{', '.join(DECODE_IN)}")

    def apply_openmp_policy(self) -> None:
        """Sets OMP_WAIT_POLICY from `omp_wait_policy`. OpenMP reads it once, when torch's
        runtime loads, so this must run before torch is imported."""
        if not self.omp_wait_policy:
            return
        if self.omp_wait_policy.lower() not in ("passive", "active"):
            raise ValueError(f"--omp-wait-policy {self.omp_wait_policy!r}: expected passive, "
                             f"active or empty")
        if "torch" in sys.modules:  # an in-process caller: too late to take effect
            warnings.warn("torch is already loaded: --omp-wait-policy has no effect",
                          stacklevel=2)
            return
        os.environ["OMP_WAIT_POLICY"] = self.omp_wait_policy.upper()
