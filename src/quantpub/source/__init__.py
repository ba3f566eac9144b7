"""The source model, as far as its ``config.json`` tells: architecture, shapes, context.

Only the config is read (from a local directory, or from the hub when it is reachable);
no weights are downloaded before the plan is accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpub import naming
from quantpub.errors import ModelError


@dataclass(frozen=True)
class Linear:
    """One linear layer inside a decoder block; ``count`` copies per block (experts)."""

    name: str
    in_features: int
    out_features: int
    count: int = 1


@dataclass(frozen=True)
class ModelFacts:
    model: str
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # 1 for a dense model
    experts_per_token: int
    tie_word_embeddings: bool
    context_length: int
    rope_scaling: dict | None
    sliding_window: int | None
    torch_dtype: str | None

    @property
    def name(self) -> str:
        return naming.model_basename(self.model)

    def block_linears(self) -> list[Linear]:
        """The linear layers of one decoder block that GPTQ/AWQ quantize."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i, e = self.intermediate_size, self.num_experts
        return [
            Linear("q_proj", h, q), Linear("k_proj", h, kv), Linear("v_proj", h, kv), Linear("o_proj", q, h),
            Linear("gate_proj", h, i, e), Linear("up_proj", h, i, e), Linear("down_proj", i, h, e),
        ]

    @property
    def quantized_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what GPTQ/AWQ turn into integers)."""
        per_block = sum(l.in_features * l.out_features * l.count for l in self.block_linears())
        return per_block * self.num_layers

    @property
    def unquantized_params(self) -> int:
        """Embeddings, LM head, norms and MoE routers: kept in 16-bit by GPTQ/AWQ."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        norms = 2 * self.hidden_size
        return embed + head + self.num_layers * (norms + router) + self.hidden_size

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.unquantized_params

    @property
    def largest_tensor_params(self) -> int:
        largest_linear = max(l.in_features * l.out_features for l in self.block_linears())
        return max(largest_linear, self.vocab_size * self.hidden_size)


def read_config(model: str) -> dict[str, Any]:
    """``config.json`` of a local checkpoint directory or a hub repo id.

    Raises:
        ModelError: not found locally and not obtainable from the hub, or not valid JSON.
    """
    path = Path(model)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelError(model, f"{config_path} does not exist; a checkpoint directory needs a config.json")
    elif path.suffix == ".json" and path.is_file():
        config_path = path
    elif path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise ModelError(model, "not a checkpoint directory and not a hub repo id (namespace/name)")
    else:
        config_path = _hub_config(model)
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(model, f"cannot read {config_path}: {exc}") from None


def _hub_config(model: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(model, "config.json"))
    except RepositoryNotFoundError:
        raise ModelError(model, "no such repo on the hub (or it is private and no token is set)") from None
    except LocalEntryNotFoundError:
        raise ModelError(model, "the hub is not reachable and config.json is not in the local cache; "
                                "pass a local checkpoint directory or set HF_ENDPOINT") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(model, f"cannot fetch config.json: {exc}") from None


def model_facts(model: str, config: dict[str, Any] | None = None) -> ModelFacts:
    """Read the facts the plan needs; ``config`` skips reading when already at hand.

    Raises:
        ModelError: the config lacks a field every supported architecture has.
    """
    cfg = read_config(model) if config is None else config
    # Multimodal-style configs nest the language model's fields.
    cfg = {**cfg, **cfg.get("text_config", {})}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelFacts(
            model=model,
            model_type=str(cfg.get("model_type", "unknown")),
            architectures=tuple(cfg.get("architectures") or ()),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            num_experts=int(cfg.get("num_local_experts") or 1),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            context_length=int(cfg.get("max_position_embeddings") or 2048),
            rope_scaling=_rope_scaling(cfg),
            sliding_window=cfg.get("sliding_window"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )
    except KeyError as exc:
        raise ModelError(model, f"config.json has no {exc.args[0]!r}; is this a causal language model?") from None
    except (TypeError, ValueError) as exc:
        raise ModelError(model, f"config.json has a malformed field: {exc}") from None


def _rope_scaling(cfg: dict[str, Any]) -> dict | None:
    """``rope_scaling`` (transformers 4) or a non-default ``rope_parameters`` (transformers 5)."""
    if cfg.get("rope_scaling"):
        return cfg["rope_scaling"]
    params = cfg.get("rope_parameters") or {}
    return params if params.get("rope_type", "default") != "default" else None


def groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


# what a checkpoint directory holds that quantpub reads: config, weights, tokenizer and chat template files
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def local_checkpoint(model: str) -> Path:
    """The checkpoint directory of ``model``: a local directory as it is, a hub id from the hub's cache
    (downloaded on first use: config, weights, tokenizer and chat-template files)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=CHECKPOINT_PATTERNS))
