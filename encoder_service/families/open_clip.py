"""The OpenCLIP family: `open_clip:ARCH/TAG` or `open_clip:ARCH/PATH`.

Reference: open_clip's own path, `model.encode_image(preprocess(img))` and
`model.encode_text(tokenizer(texts))` with `open_clip.create_model_and_transforms` and
`open_clip.get_tokenizer`, each row divided by its norm.

Where the weights are looked for, in order (`--weights-dir` is WEIGHTS_DIR):

1. an explicit path after the architecture: a checkpoint file (`open_clip:ViT-B-32//data/
   vit.safetensors`) or a folder holding one (a copy of the model's Hugging Face repo);
2. the folder `WEIGHTS_DIR/open_clip/ARCH/TAG/` (a copy of the repo, or just its checkpoint);
3. the Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`), then the hub itself when downloads
   are allowed.

Models whose text tower or tokenizer comes from Hugging Face (SigLIP, XLM-R) also need the
tokenizer files and, for a Hugging Face text tower, its `config.json`: taken from the
weights folder when they are there, else from the cache / hub by the name in the model
config (`timm/ViT-B-16-SigLIP`, `xlm-roberta-base`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from encoder_service.errors import ModelLoadError
from encoder_service.families.base import EmptyText, ImageSpec, TextTokenizer, Traits

log = logging.getLogger("clipsearch.encoder.open_clip")

PREFIX = "open_clip:"
CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
               "model.safetensors", "pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "sentencepiece.bpe.model", "spiece.model", "vocab.json", "merges.txt",
                   "vocab.txt", "added_tokens.json")


def is_open_clip_name(name: str) -> bool:
    return name.startswith(PREFIX)


@dataclass(frozen=True)
class Source:
    """Where a model's weights are: the checkpoint and the folder around it, if any."""

    architecture: str
    tag: str | None
    checkpoint: Path
    folder: Path | None


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ModelLoadError("open_clip models need the open-clip-torch package: "
                             "pip install 'clipsearch[encoder]'") from exc
    return open_clip


def parse_name(name: str) -> tuple[str, str]:
    """`open_clip:ARCH/REST` -> (ARCH, REST); checks ARCH is an open_clip architecture."""
    open_clip = _open_clip()
    arch, _, rest = name[len(PREFIX):].partition("/")
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"{name}: {arch!r} is not an open_clip architecture (e.g. ViT-B-32, ViT-L-14, "
            f"ViT-B-16-SigLIP, xlm-roberta-base-ViT-B-32; `python -c \"import open_clip; "
            f"print(open_clip.list_models())\"` lists all)")
    if not rest:
        raise ModelLoadError(
            f"{name}: say which weights, open_clip:{arch}/TAG or open_clip:{arch}/PATH "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    return arch, rest


def _checkpoint_in(folder: Path) -> Path | None:
    for name in CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    return found[0] if found else None


def locate(name: str, weights_dir: str, download: bool) -> Source:
    """Finds the checkpoint of `name` (see the module docstring for the order)."""
    open_clip = _open_clip()
    arch, rest = parse_name(name)
    path = Path(rest).expanduser()
    if path.is_file():
        return Source(arch, None, path, path.parent)
    if path.is_dir():
        checkpoint = _checkpoint_in(path)
        if checkpoint is None:
            raise ModelLoadError(f"{name}: no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) "
                                 f"in the folder {path}")
        return Source(arch, None, checkpoint, path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if rest not in tags:
        raise ModelLoadError(f"{name}: {rest!r} is neither a pretrained tag of {arch} "
                             f"({', '.join(tags) or 'it has none'}) nor an existing file or "
                             f"folder")
    folder = Path(weights_dir).expanduser() / "open_clip" / arch / rest
    looked = [str(folder)]
    if folder.is_dir() and (checkpoint := _checkpoint_in(folder)) is not None:
        return Source(arch, rest, checkpoint, folder)
    hub = open_clip.get_pretrained_cfg(arch, rest).get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, hf_hub_download
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin"]
        reasons = []
        for local_only in (True, False) if download else (True,):
            for file in names:
                try:
                    found = Path(hf_hub_download(repo, file, local_files_only=local_only))
                    return Source(arch, rest, found, found.parent)
                except Exception as exc:  # offline, missing file, no such repo...
                    reasons.append(f"{file}: {type(exc).__name__}")
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE} (repo {repo})"
        looked.append(where + (" and the hub itself" if download else ""))
    raise ModelLoadError(
        f"open_clip weights for {arch}/{rest} not found; looked in {'; '.join(looked)}"
        f"{'' if download else ' (downloads are off)'}. Provide them by copying the model's "
        f"files (its Hugging Face repo {hub or '?'}: open_clip_model.safetensors, and the "
        f"tokenizer files where it has them) into {folder}, or pass a checkpoint with "
        f"--model open_clip:{arch}/PATH.")


def _pretrained_defaults(arch: str, tag: str | None, folder: Path | None) -> dict[str, Any]:
    """Preprocessing and quick_gelu of the weights: from the tag's config, else the
    folder's open_clip_config.json, else what every tag of the architecture agrees on."""
    open_clip = _open_clip()
    from open_clip.transform import PreprocessCfg
    if tag is not None:
        return dict(open_clip.get_pretrained_cfg(arch, tag))
    config_file = folder / "open_clip_config.json" if folder else None
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        return {**config.get("preprocess_cfg", {}),
                "quick_gelu": config.get("model_cfg", {}).get("quick_gelu", False)}
    keys = [f.name for f in fields(PreprocessCfg)] + ["quick_gelu"]
    seen = {json.dumps({k: open_clip.get_pretrained_cfg(arch, t).get(k) for k in keys})
            for t in open_clip.list_pretrained_tags_by_model(arch)}
    if len(seen) == 1:
        return {k: v for k, v in json.loads(seen.pop()).items() if v is not None}
    log.warning("%s from a checkpoint without a tag: its tags differ in preprocessing, so "
                "open_clip's defaults are used; name the tag to get its own", arch)
    return {}


def _hf_folder(name: str, folder: Path | None, files: tuple[str, ...], what: str,
               download: bool, check: str = "") -> str:
    """A local folder holding `files` of the Hugging Face repo `name`: the weights folder
    when it has them, else the Hugging Face cache, else (downloads on) the hub."""
    def usable(d: Path) -> bool:
        present = [d / f for f in files if (d / f).is_file()]
        if not present:
            return False
        return not check or check in present[0].read_text(errors="ignore")
    if folder is not None and usable(folder):
        return str(folder)
    from huggingface_hub import constants, snapshot_download
    for local_only in (True, False) if download else (True,):
        try:
            got = Path(snapshot_download(name, allow_patterns=list(files),
                                         local_files_only=local_only))
            if usable(got):
                return str(got)
        except Exception as exc:
            log.debug("%s %s from the hub (local_only=%s): %s", what, name, local_only, exc)
    raise ModelLoadError(
        f"the {what} of this model ({name} on Hugging Face: {', '.join(files[:2])}...) is "
        f"neither in the weights folder {folder} nor in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE}{'' if download else ' (downloads are off)'}; copy those "
        f"files into the weights folder")


class OpenClipBpeTokenizer(TextTokenizer):
    """open_clip's SimpleTokenizer (CLIP BPE with the model's text cleaning)."""

    kind = "clip-bpe"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(int(tokenizer.context_length))
        self.inner = tokenizer
        n = self.context_length
        self.truncation = (f"texts over {n} tokens (start and end markers included) keep "
                           f"their first {n - 1} tokens and end-of-text")

    def _tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        bpe = self.inner.encode(text)
        if not bpe:
            raise EmptyText("empty text (no tokens)")
        return self.inner([text])[0], len(bpe) + 2 > self.context_length


class HuggingFaceTokenizer(TextTokenizer):
    """open_clip's HFTokenizer (SigLIP's SentencePiece, XLM-R's, ...)."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        super().__init__(int(tokenizer.context_length))
        self.inner = tokenizer
        self.kind = f"hf:{source}"
        self.truncation = (f"texts over {self.context_length} tokens (special tokens "
                           f"included) are cut by the tokenizer's own truncation")

    def _tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        cleaned = self.inner.clean_fn(text)
        plain = self.inner.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        if not cleaned.strip() or not plain:
            raise EmptyText("empty text (no tokens)")
        if self.inner.tokenizer_mode == "clips":
            cut = len(plain) > self.context_length - 3
        else:
            full = self.inner.tokenizer(cleaned, add_special_tokens=True)["input_ids"]
            cut = len(full) > self.context_length
        return self.inner([text])[0], cut


def _tokenizer(arch: str, text_cfg: dict[str, Any], folder: Path | None,
               download: bool) -> TextTokenizer:
    """The tokenizer open_clip.get_tokenizer(arch) makes, from local files."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    hf_name = text_cfg.get("hf_tokenizer_name", "")
    if hf_name:
        source = _hf_folder(hf_name, folder, TOKENIZER_FILES, "tokenizer", download)
        try:
            inner = HFTokenizer(source, context_length=context_length,
                                tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"cannot build the tokenizer from {source}: {exc}") from exc
        return HuggingFaceTokenizer(inner, hf_name)
    if "siglip" in arch.lower():
        raise ModelLoadError(f"{arch}: its SentencePiece tokenizer is downloaded by open_clip "
                             f"from Google storage; not supported offline")
    return OpenClipBpeTokenizer(SimpleTokenizer(context_length=context_length, **kwargs))


def _causal_pooled_at_eot(model: Any) -> bool:
    """True for open_clip's built-in CLIP text tower when trimming is exact: a causal mask
    and pooling at the end-of-text token (argmax of the ids, CLIP's BPE)."""
    open_clip = _open_clip()
    return (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "") == "argmax")


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text over the first L positions (L = last end-of-text + 1):
    exact for a causal tower pooled at end-of-text (see `_causal_pooled_at_eot`)."""
    from open_clip.transformer import text_global_pool
    length = int(tokens.argmax(dim=-1).max()) + 1
    device = model.positional_embedding.device
    tokens = tokens[:, :length].to(device, non_blocking=True)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)  # type: ignore[no-any-return]
    return x @ model.text_projection  # type: ignore[no-any-return]


def build(name: str, weights_dir: str, download: bool,
          precision: str) -> tuple[Any, Any, Source, dict[str, Any], TextTokenizer]:
    """Builds the model on the CPU with its weights, in open_clip's own layout for
    `precision`: fp16 as create_model(precision="fp16") makes it (fp16 matmul weights,
    LayerNormFp32 modules computing in fp32: the model must be built so, converting an fp32
    model's weights afterwards leaves LayerNorms that fail on fp16 input on CUDA); fp32 and
    bf16 (autocast) keep fp32 weights, and so does fp16 with a Hugging Face text tower,
    which open_clip's fp16 layout cannot run (its embeddings and LayerNorms stay fp32 and
    feed fp16 linears): it runs under fp16 autocast, open_clip's "amp". Returns the model
    with its eval preprocess, the weights' source, the model config and the tokenizer."""
    open_clip = _open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2
    source = locate(name, weights_dir, download)
    arch = source.architecture
    model_cfg = open_clip.get_model_config(arch)
    text_cfg = dict(model_cfg["text_cfg"])
    defaults = _pretrained_defaults(arch, source.tag, source.folder)
    preprocess_keys = {f.name for f in fields(PreprocessCfg)}
    overrides: dict[str, Any] = {}
    if "hf_model_name" in text_cfg:  # a Hugging Face text tower: its config.json is needed
        text_cfg["hf_model_name"] = _hf_folder(text_cfg["hf_model_name"], source.folder,
                                               ("config.json",), "text tower config",
                                               download, check='"model_type"')
        text_cfg["hf_model_pretrained"] = False
        overrides["text_cfg"] = text_cfg
    tokenizer = _tokenizer(arch, model_cfg["text_cfg"], source.folder, download)
    try:
        model = open_clip.create_model(
            arch, pretrained=str(source.checkpoint),
            precision="fp16" if fp16_layout(precision, model_cfg) else "fp32", device="cpu",
            force_quick_gelu=bool(defaults.get("quick_gelu", False)),
            force_preprocess_cfg={k: v for k, v in defaults.items() if k in preprocess_keys},
            pretrained_image=False, pretrained_text=False, **overrides)
    except Exception as exc:  # a wrong or damaged checkpoint can raise almost anything
        raise ModelLoadError(f"{name}: cannot load {source.checkpoint} into {arch}: "
                             f"{str(exc)[:500]}") from exc
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.eval(), preprocess, source, model_cfg, tokenizer


def fp16_layout(precision: str, model_cfg: dict[str, Any]) -> bool:
    """Whether the model is built in open_clip's fp16 layout (else fp32 weights)."""
    return precision == "fp16" and "hf_model_name" not in model_cfg["text_cfg"]


def checkpoint_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The checkpoint's own state dict (for the weights' fingerprint, which is then the same
    whatever precision the model runs in)."""
    from open_clip.factory import load_state_dict
    return load_state_dict(str(source.checkpoint))  # type: ignore[no-any-return]


def traits(model: Any, source: Source, model_cfg: dict[str, Any], tokenizer: TextTokenizer,
           precision: str) -> Traits:
    """The traits of a placed open_clip model."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    trimmed = _causal_pooled_at_eot(model)

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        if trimmed:
            return encode_text_trimmed(model, tokens)
        return model.encode_text(tokens.to(device, non_blocking=True))  # type: ignore[no-any-return]

    return Traits(
        family="open_clip",
        architecture=source.architecture + (f"/{source.tag}" if source.tag else ""),
        dimension=int(model_cfg["embed_dim"]), tokenizer=tokenizer, encode_text=encode_text,
        image=ImageSpec(height=int(height), width=int(width), resize_mode=cfg["resize_mode"],
                        interpolation=cfg["interpolation"],
                        crop=cfg["resize_mode"] == "shortest",
                        mean=tuple(cfg["mean"]), std=tuple(cfg["std"])),
        input_dtype=torch.float16 if fp16_layout(precision, model_cfg) else torch.float32,
        autocast="" if precision == "fp32" or fp16_layout(precision, model_cfg) else precision,
        text_path="trimmed" if trimmed else "full")
