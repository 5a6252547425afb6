"""The Hugging Face ``transformers`` layout of a ViT, both ways.

Public ViTs are mostly shared as ``transformers`` checkpoints (``ViTModel``,
``ViTForImageClassification``, ``ViTMAEForPreTraining``), whose names differ from timm / MAE's:
``vit.embeddings.patch_embeddings.projection`` is our ``patch_embed.proj``, each block's
attention has separate query / key / value projections where we fuse them into one ``qkv``, and
so on. ``from_hf`` reads both spellings transformers has used (4.x: ``encoder.layer.N.attention.
attention.query``, ``intermediate.dense``; 5.x: ``layers.N.attention.q_proj``, ``mlp.fc1``);
``to_hf`` writes the 4.x spelling, which every transformers version loads.

Only the ViT encoder and the MAE decoder are mapped; a ``classifier`` becomes ``head``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from medveil.errors import MedVeilError

# (pattern, replacement) applied in order to each transformers key
_FROM_HF = [
    (r"^(vit\.)?embeddings\.cls_token$", "cls_token"),
    (r"^(vit\.)?embeddings\.position_embeddings$", "pos_embed"),
    (r"^(vit\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(vit\.)?(encoder\.layer|layers)\.(\d+)\.", r"blocks.\3."),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^(vit\.)?layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^decoder\.", ""),
    (r"layernorm_before", "norm1"),
    (r"layernorm_after", "norm2"),
    (r"attention\.(output\.dense|o_proj)", "attn.proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"(?<!mlp\.)output\.dense", "mlp.fc2"),
]
_QKV = re.compile(r"(.*?)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")
_HF_MARKERS = ("embeddings.patch_embeddings.", "embeddings.cls_token", "encoder.layer.", "layers.0.attention")


def is_hf_layout(sd: dict[str, Any]) -> bool:
    """True when the keys are transformers' ViT / ViT-MAE names (and not timm / MAE's)."""
    return any(marker in k for k in sd for marker in _HF_MARKERS) and "blocks.0.attn.qkv.weight" not in sd


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViT / ViT-MAE state dict -> timm / MAE names (query, key, value fused to qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(("vit.pooler.", "pooler.")):
            continue  # ViTModel's tanh pooler: not part of a timm / MAE ViT
        for pattern, repl in _FROM_HF:
            key = re.sub(pattern, repl, key)
        m = _QKV.match(key)
        if m:
            which = {"query": "q", "key": "k", "value": "v"}.get(m[2], m[2][0])
            qkv.setdefault(f"{m[1]}.attn.qkv.{m[3]}", {})[which] = value
            continue
        out[key] = value
    for key, parts in qkv.items():
        missing = [w for w in "qkv" if w not in parts]
        if missing:
            raise MedVeilError(f"transformers checkpoint: {key} lacks its {'/'.join(missing)} projection(s)")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_hf(sd: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """timm / MAE encoder state dict -> transformers ``ViTModel`` names (prefix "") or
    ``ViTForImageClassification`` names (prefix "vit.", ``head`` -> ``classifier``), 4.x spelling."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            out["classifier." + key[len("head."):]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if not m:
            name = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}.get(key)
            if name is None:
                raise KeyError(f"{key}: no transformers ViT name")
            out[prefix + name] = value
            continue
        base, rest = f"{prefix}encoder.layer.{m[1]}.", m[2]
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, name in zip(value.chunk(3, dim=0), ("query", "key", "value"), strict=True):
                out[f"{base}attention.attention.{name}.{kind}"] = part.contiguous()
            continue
        rest = (rest.replace("norm1", "layernorm_before").replace("norm2", "layernorm_after")
                .replace("attn.proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
                .replace("mlp.fc2", "output.dense"))
        out[base + rest] = value
    return out


def vit_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``config.json`` (ViT or ViT-MAE) -> our ViTConfig fields."""
    out = {"img_size": hf.get("image_size", 224), "patch_size": hf.get("patch_size", 16),
           "in_chans": hf.get("num_channels", 3), "embed_dim": hf.get("hidden_size", 768),
           "depth": hf.get("num_hidden_layers", 12), "num_heads": hf.get("num_attention_heads", 12),
           "mlp_ratio": hf.get("intermediate_size", 3072) / hf.get("hidden_size", 768)}
    if "decoder_hidden_size" in hf:
        out.update(decoder_embed_dim=hf["decoder_hidden_size"], decoder_depth=hf["decoder_num_hidden_layers"],
                   decoder_num_heads=hf["decoder_num_attention_heads"],
                   norm_pix_loss=bool(hf.get("norm_pix_loss", False)))
    return out


def hf_config(cfg: dict[str, Any], class_names: list[str] | None = None) -> dict[str, Any]:
    """Our ViTConfig fields -> a transformers ``ViTConfig`` dict (``config.json``)."""
    out: dict[str, Any] = {
        "model_type": "vit", "architectures": ["ViTForImageClassification" if class_names else "ViTModel"],
        "image_size": cfg["img_size"], "patch_size": cfg["patch_size"], "num_channels": cfg["in_chans"],
        "hidden_size": cfg["embed_dim"], "num_hidden_layers": cfg["depth"],
        "num_attention_heads": cfg["num_heads"], "intermediate_size": int(cfg["embed_dim"] * cfg["mlp_ratio"]),
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if class_names:
        out["id2label"] = {str(i): n for i, n in enumerate(class_names)}
        out["label2id"] = {n: i for i, n in enumerate(class_names)}
    return out
