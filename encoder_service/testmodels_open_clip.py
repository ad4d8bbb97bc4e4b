"""Random-weight OpenCLIP models of the real architectures, for machines without weights.

Each is written as a folder laid out like the model's Hugging Face repo, the layout the
encoder reads (encoder_service/families/open_clip.py): `open_clip_model.safetensors`,
`open_clip_config.json` (model and preprocessing config) and, for models with a Hugging
Face tokenizer or text tower, the tokenizer files and the text tower's `config.json`.

The real tokenizers of SigLIP and XLM-R are Hugging Face downloads; here a small
SentencePiece-style (Unigram) tokenizer is trained with `tokenizers` on a few multilingual
sentences and saved with the same special tokens, so the same loading code runs. An
XLM-R text tower has the real xlm-roberta-base shape except its vocabulary, which is the
test tokenizer's (the real 250k-row embedding would add 770 MB and no code path).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from encoder_service.testmodels import _cache_dir, _seeded

TEST_OPEN_CLIP_VERSION = 1
CORPUS = [
    "a photo of a dog", "a white dog on the grass", "a red circle", "a blue square",
    "ein Foto von einem Hund", "eine rote Katze im Garten", "une photo d'un chien",
    "un chat noir dans la rue", "una foto de un perro", "фотография собаки",
    "犬の写真", "赤い丸", "a photo of a {label}.", "tench, goldfish, great white shark",
    "mountain beach city night road tree sky car running quickly over the house",
]


def _train_tokenizer(folder: Path, specials: list[str], template: str, vocab: int) -> int:
    """A Unigram tokenizer saved as a Hugging Face fast tokenizer; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(CORPUS * 10, trainers.UnigramTrainer(
        vocab_size=vocab, special_tokens=specials, unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, specials.index(t)) for t in specials
                                         if t in template])
    names = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if "<s>" in specials:
        names.update(bos_token="<s>", cls_token="<s>", sep_token="</s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names)
    fast.save_pretrained(str(folder))
    return len(fast)


def _write(folder: Path, arch: str, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = open_clip.get_model_config(arch)
    text_cfg = model_cfg["text_cfg"]
    overrides: dict[str, Any] = {}
    if "hf_model_name" in text_cfg:  # XLM-R: <s>=0 <pad>=1 </s>=2 <unk>=3, as xlm-roberta
        from transformers import XLMRobertaConfig

        size = _train_tokenizer(folder, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", 400)
        XLMRobertaConfig(vocab_size=size, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2,
                         layer_norm_eps=1e-5).save_pretrained(str(folder))
        text_cfg = {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}
        overrides["text_cfg"] = text_cfg
    elif text_cfg.get("hf_tokenizer_name"):  # SigLIP: T5-style, </s> ends every text
        _train_tokenizer(folder, ["<pad>", "</s>", "<unk>"], "$A </s>", 400)
    with _seeded(seed):
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, **overrides)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    pretrained = open_clip.get_pretrained_cfg(arch, tags[0]) if tags else {}
    keys = ("mean", "std", "interpolation", "resize_mode")
    config = {"model_cfg": {**model_cfg, "text_cfg": text_cfg},
              "preprocess_cfg": {k: pretrained[k] for k in keys if k in pretrained}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}  # fp16 halves the file, as releases do
    save_file(state, str(folder / "open_clip_model.safetensors"))


def cached_random_open_clip(arch: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The folder of a random-weight `arch` (open_clip name), built on first use under the
    cache directory (see encoder_service.testmodels); readers never see half a folder."""
    out = _cache_dir(cache_dir) / f"open_clip-{arch}-v{TEST_OPEN_CLIP_VERSION}-seed{seed}"
    if (out / "open_clip_model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp, arch, seed)
        if "hf_model_name" in json.loads((tmp / "open_clip_config.json").read_text())[
                "model_cfg"]["text_cfg"]:  # the config names the folder it was built in
            config = json.loads((tmp / "open_clip_config.json").read_text())
            config["model_cfg"]["text_cfg"]["hf_model_name"] = str(out)
            (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "open_clip_model.safetensors").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
