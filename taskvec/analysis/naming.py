"""Where a parameter sits in the network, read from its name.

Two questions every per-layer / per-module analysis asks of a tensor name:
which transformer block it belongs to (`layer_index`), and what kind of
weight it is (`module_type`). Both work on the naming schemes of the common
Hugging Face families (Llama/Mistral/Qwen, BERT/RoBERTa, GPT-2, GPT-NeoX,
Falcon, T5, CLIP, Mixtral experts) and on open_clip's ViT.
"""
from __future__ import annotations

import re

# A block container followed by its index: `model.layers.12.`, `encoder.layer.3.`,
# `h.7.`, `transformer.resblocks.0.`, `encoder.block.5.`. The first match wins, so
# the index of an expert inside a block (`experts.3`) never shadows the block's own.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)(?=\.|$)")

_EMBED_PATH_RE = re.compile(r"(^|\.)(embeddings|embed_\w+|embedding)\.")

#: Module types in the order plots list them (attention, then MLP, then the rest).
MODULE_TYPES: tuple[str, ...] = (
    "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o",
    "mlp_gate", "mlp_up", "mlp_down",
    "embedding", "norm", "head", "other",
)

# (module type, pattern on the dotted name). Checked in order; the first hit wins.
# Norms come first: `attention.output.LayerNorm` is a norm, not the attention output.
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("norm", r"(?i)(layernorm|layrnorm|layer_norm|rmsnorm|(^|\.)ln_?\w*\.|(^|\.)norm\w*\.|_norm\.|\.final_norm)"),
        ("embedding", r"(?i)(embed|(^|\.)wte\.|(^|\.)wpe\.|(^|\.)shared\.|positional_embedding|class_embedding|token_embedding)"),
        ("attn_qkv", r"(query_key_value|c_attn|qkv|in_proj_weight|in_proj_bias|Wqkv)"),
        ("attn_q", r"(q_proj|\.query\.|\.q\.|\.q_lin\.)"),
        ("attn_k", r"(k_proj|\.key\.|\.k\.|\.k_lin\.)"),
        ("attn_v", r"(v_proj|\.value\.|\.v\.|\.v_lin\.)"),
        ("attn_o", r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|attention\.dense|self_attention\.dense|self_attn\.dense|"
                   r"SelfAttention\.o\.|EncDecAttention\.o\.|\.out_lin\.|attn\.proj\.|attention\.o\.)"),
        ("mlp_gate", r"(gate_proj|\.w1\.|wi_0|\.gate\.(?!weight$))"),
        ("mlp_down", r"(down_proj|\.w2\.|mlp\.c_proj|dense_4h_to_h|\.fc2\.|\.wo\.|(^|\.)output\.dense\.|\.lin2\.|mlp\.proj\.)"),
        ("mlp_up", r"(up_proj|\.w3\.|mlp\.c_fc|dense_h_to_4h|\.fc1\.|\.wi\.|wi_1|intermediate\.dense|\.lin1\.)"),
        ("head", r"(?i)(lm_head|classifier|(^|\.)score\.|(^|\.)pooler\.|(^|\.)head\.|text_projection|visual_projection|visual\.proj$|^proj$)"),
    )
)


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to, or None outside the blocks.

    >>> layer_index("model.layers.12.mlp.up_proj.weight"), layer_index("encoder.layer.3.output.dense.bias")
    (12, 3)
    >>> layer_index("transformer.h.7.attn.c_attn.weight"), layer_index("model.embed_tokens.weight") is None
    (7, True)
    """
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Kind of weight a parameter is: one of `MODULE_TYPES`.

    >>> [module_type(n) for n in ("model.layers.0.self_attn.q_proj.weight",
    ...  "encoder.layer.0.attention.output.LayerNorm.bias", "encoder.layer.0.output.dense.weight",
    ...  "model.embed_tokens.weight", "lm_head.weight")]
    ['attn_q', 'norm', 'mlp_down', 'embedding', 'head']
    """
    for kind, pattern in _MODULE_RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_label(name: str, num_layers: int | None = None) -> str:
    """Row label for per-layer tables: 'embeddings', '0', '1', ..., or 'other' (final norm, head, ...)."""
    idx = layer_index(name)
    if idx is not None:
        return str(idx)
    # `embeddings.LayerNorm` belongs with the embeddings, though its module type is a norm.
    return "embeddings" if module_type(name) == "embedding" or _EMBED_PATH_RE.search(name) else "other"


def layer_position(label: str) -> float:
    """Sort key that puts embeddings first, blocks in numeric order, the rest last."""
    if label == "embeddings":
        return -1.0
    if label.isdigit():
        return float(label)
    return float("inf")


def sort_layer_labels(labels) -> list[str]:
    """Layer labels in reading order (numeric, not lexicographic: 2 before 10)."""
    return sorted(set(labels), key=lambda s: (layer_position(s), s))
