"""The tiny kit's evaluation scorers: random-weight DINO and SigLIP of the real architectures, real formats.

``imgrag eval`` scores with checkpoints the agent never selects with (:mod:`imgrag.scoring.scorers`); ImageRAG (arXiv
2502.09411) reports DINO image-image and CLIP and SigLIP text-image similarities. The tiny kit carries miniature
copies so that the same loaders run offline:

- ``dino/``: a transformers ``ViTModel`` without pooler plus a ``ViTImageProcessor``, the layout of
  ``facebook/dino-vits16`` (DINO ViT-S/16; ``AutoModel.from_pretrained`` loads either, as it loads DINOv2);
- ``siglip/``: open_clip's ``local-dir:`` schema for a SigLIP ``CustomTextCLIP``: the vision tower is a timm
  ``VisionTransformer`` with SigLIP's attention-pooling ("map") head and no class token (timm's ``test_vit3``,
  the smallest registered one of that kind; the real ``vit_so400m_patch14_siglip_384`` is the same class),
  the text tower open_clip's non-causal transformer pooled at the last token, a learnt logit bias, and a
  Hugging Face tokenizer in the folder (open_clip reads it from there for ``local-dir:``).

Their scores are noise, like every tiny model's.
"""

from __future__ import annotations

import json
from pathlib import Path

DINO_CONFIG = {  # facebook/dino-vits16 is hidden 384, 12 layers, 6 heads, 224 px, patch 16
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "image_size": 32, "patch_size": 16, "qkv_bias": True,
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # DINO's preprocessing statistics
IMAGENET_STD = [0.229, 0.224, 0.225]

SIGLIP_TIMM_MODEL = "test_vit3"  # VisionTransformer(class_token=False, global_pool="map"), 96 wide, 160 px
SIGLIP_IMAGE_SIZE = 160
SIGLIP_EMBED_DIM = 96  # the vision trunk's width: SigLIP has no projection after the attention pool
SIGLIP_CONTEXT = 16
SIGLIP_PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                         "resize_mode": "squash"}  # what timm/ViT-SO400M-14-SigLIP-384 ships
SIGLIP_CORPUS = ["a photo of a cat", "a photo of a dog", "a photo of a bird on a branch", "a red fox",
                 "a wooden cradle", "an aircraft on a runway", "a rare flower in a field"]


def siglip_model_cfg(vocab_size: int) -> dict:
    """open_clip ``model_cfg`` of the tiny SigLIP (the keys of open_clip's ViT-SO400M-14-SigLIP-384.json)."""
    return {
        "embed_dim": SIGLIP_EMBED_DIM,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": SIGLIP_IMAGE_SIZE, "timm_model_name": SIGLIP_TIMM_MODEL,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": SIGLIP_CONTEXT, "vocab_size": vocab_size,
                     # the real one's name; for local-dir: open_clip loads the tokenizer in the folder instead
                     "hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "tokenizer_kwargs": {"clean": "canonicalize"},
                     "width": 32, "heads": 2, "layers": 2, "no_causal_mask": True, "proj_bias": True,
                     "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }


def build_dino(dest: Path, seed: int) -> None:
    """``ViTModel`` (no pooler, as the DINO checkpoints) + ``ViTImageProcessor`` saved into ``dest``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**DINO_CONFIG), add_pooling_layer=False).save_pretrained(dest, safe_serialization=True)
    side = DINO_CONFIG["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(dest)


def build_siglip(dest: Path, seed: int) -> None:
    """open_clip local-dir folder: ``open_clip_config.json``, ``open_clip_model.safetensors`` and the
    tokenizer files (a small unigram model with SigLIP's ``</s>`` end and ``<pad>`` tokens)."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    # show_progress=False: the trainer otherwise writes its (empty, off a terminal) bars to stdout as blank lines.
    tok.train_from_iterator(SIGLIP_CORPUS, trainers.UnigramTrainer(vocab_size=80, special_tokens=specials,
                                                                   unk_token="<unk>", show_progress=False))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=SIGLIP_CONTEXT)
    fast.save_pretrained(dest)
    cfg = siglip_model_cfg(len(fast))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})  # factory's flag
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "open_clip_model.safetensors"))
    config = {"model_cfg": cfg, "preprocess_cfg": SIGLIP_PREPROCESS_CFG}
    (dest / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
