"""Configuration of PEER-MLA: a decoder with product-key expert retrieval (PEER) and multi-head latent attention.

This file is exported next to the weights by `save_pretrained` and loaded with `trust_remote_code=True`, so it
imports nothing from hfx.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

MLA_ABSORB_MODES = ("auto", "always", "never")
ATTENTION_KERNELS = ("auto", "sdpa", "flash_mla", "flash_attn")
PEER_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "identity")


class PeerMlaConfig(PretrainedConfig):
    r"""Configuration of [`PeerMlaForCausalLM`].

    Attention (DeepSeek-V2/V3 multi-head latent attention):
        q_lora_rank (`int` or `None`): rank of the query bottleneck; `None` projects queries directly.
        kv_lora_rank (`int`): size of the key/value latent, the part of the KV cache shared by all heads.
        qk_rope_head_dim (`int`): size of the decoupled RoPE key (one per token, shared across heads).
        qk_nope_head_dim (`int`), v_head_dim (`int`): per-head key (without RoPE) and value sizes.
        mla_absorb (`str`): "auto" uses weight absorption when decoding against a cache and the naive
            (per-head K/V) path otherwise; "always"/"never" force one path.
        attention_kernel (`str`): "auto" picks FlashMLA (decode) / flash-attn (prefill) through the `kernels`
            library on a CUDA device in bf16/fp16, SDPA otherwise; "sdpa", "flash_mla", "flash_attn" force one.

        rope_parameters (`dict`, *optional*): transformers' RoPE parameters, e.g. `{"rope_type": "yarn",
            "factor": 4.0}` for scaling; `rope_theta` is their default base.

    PEER (Parameter Efficient Expert Retrieval, arXiv 2407.04153):
        product_key_dim (`list[int]`): sub-key set sizes; their product is the number of experts
            (`[1024, 1024]` = 1M experts, `[128, 128, 64]`, ...).
        num_experts (`int` or `None`): checked against the product of `product_key_dim` when given.
        peer_num_heads (`int`): retrieval heads, each with its own query and sub-keys, sharing one expert pool.
        num_experts_per_tok (`int`): experts kept per head after scoring the cartesian candidates.
        product_key_topk (`int` or `None`): survivors per sub-key set (capped at the set's size); defaults to
            `num_experts_per_tok`, which makes retrieval equal to an exact top-k over all experts.
        expert_hidden_size (`int`): hidden units per expert (1 = a single neuron, as in the paper).
        peer_query_dim (`int`): per-head query size, split evenly across the `len(product_key_dim)` parts.
        peer_batch_norm (`bool`): BatchNorm on queries, as in the paper.
        peer_activation (`str`): expert activation.
        peer_layers (`"all"`, `list[int]` or `None`): layers whose MLP is a PEER layer; the others use a dense
            SwiGLU MLP of `intermediate_size`.
        peer_kernel_repo (`str` or `None`): a Hub kernel repository ("user/peer-kernel", as `hfx peer-mla
            push-kernel` publishes it) whose `PeerExperts` layer replaces the experts' forward when the model is
            kernelized (`model.kernelize_peer_experts()`, or `from_pretrained(..., use_kernels=True)`), loaded
            through `kernels.get_kernel`: from the Hub cache, downloaded when online. `None`: none named.
        peer_kernel_revision (`str` or `None`): branch, tag or commit of `peer_kernel_repo`; `None` = the
            kernel's version 1 (its `v1` branch).
    """

    model_type = "peer_mla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        q_lora_rank: int | None = None,
        kv_lora_rank: int = 128,
        qk_rope_head_dim: int = 32,
        qk_nope_head_dim: int = 64,
        v_head_dim: int = 64,
        mla_absorb: str = "auto",
        attention_kernel: str = "auto",
        intermediate_size: int = 1408,
        hidden_act: str = "silu",
        peer_layers: str | list[int] | None = "all",
        product_key_dim: list[int] | tuple[int, ...] = (128, 128),
        num_experts: int | None = None,
        peer_num_heads: int = 8,
        num_experts_per_tok: int = 16,
        product_key_topk: int | None = None,
        expert_hidden_size: int = 1,
        peer_query_dim: int = 128,
        peer_batch_norm: bool = True,
        peer_activation: str = "gelu",
        peer_kernel_repo: str | None = None,
        peer_kernel_revision: str | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        self.mla_absorb = mla_absorb
        self.attention_kernel = attention_kernel
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.peer_layers = list(peer_layers) if isinstance(peer_layers, (list, tuple)) else peer_layers
        self.product_key_dim = [int(d) for d in product_key_dim] if product_key_dim is not None else None
        self.peer_num_heads = peer_num_heads
        self.num_experts_per_tok = num_experts_per_tok
        self.product_key_topk = product_key_topk if product_key_topk is not None else num_experts_per_tok
        self.expert_hidden_size = expert_hidden_size
        self.peer_query_dim = peer_query_dim
        self.peer_batch_norm = peer_batch_norm
        self.peer_activation = peer_activation
        self.peer_kernel_repo = peer_kernel_repo
        self.peer_kernel_revision = peer_kernel_revision
        self.max_position_embeddings = max_position_embeddings
        # transformers' RoPE parameters ({"rope_type": "default" | "linear" | "dynamic" | "yarn" | ..., "rope_theta":
        # ...}); `rope_theta` fills them in when not given, and `head_dim` is the rotated size they are computed for.
        self.rope_theta = rope_theta
        self.rope_parameters = dict(rope_parameters) if rope_parameters is not None else None
        self.head_dim = qk_rope_head_dim
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_experts = self._validate(num_experts)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_key_value_heads(self) -> int:
        # The cache holds one latent "head" per token (shared by all query heads).
        return 1

    def is_peer_layer(self, layer_idx: int) -> bool:
        if self.peer_layers == "all":
            return True
        if self.peer_layers is None:
            return False
        return layer_idx in self.peer_layers

    def _validate(self, num_experts: int | None) -> int:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PeerMlaConfig.{name} must be a positive integer, got {value!r}.")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            positive(name)
        positive("q_lora_rank", allow_none=True)
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"PeerMlaConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}."
            )
        if self.mla_absorb not in MLA_ABSORB_MODES:
            raise ValueError(
                f"PeerMlaConfig.mla_absorb must be one of {MLA_ABSORB_MODES}, got {self.mla_absorb!r}."
            )
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"PeerMlaConfig.attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}."
            )
        repo = self.peer_kernel_repo
        if repo is not None and not (
            isinstance(repo, str) and repo.count("/") == 1 and all(part.strip() for part in repo.split("/"))
        ):
            raise ValueError(
                f"PeerMlaConfig.peer_kernel_repo must be a Hub repository id 'owner/name' or None, got {repo!r}."
            )
        revision = self.peer_kernel_revision
        if revision is not None and not (isinstance(revision, str) and revision.strip()):
            raise ValueError(
                f"PeerMlaConfig.peer_kernel_revision must be a branch, tag or commit (a non-empty string) or None, "
                f"got {revision!r}."
            )
        if revision is not None and repo is None:
            raise ValueError(
                f"PeerMlaConfig.peer_kernel_revision={revision!r} is set but peer_kernel_repo is not: name the "
                "kernel repository it is a revision of, or drop the revision."
            )

        if self.peer_layers not in ("all", None):
            if not isinstance(self.peer_layers, list) or not all(
                isinstance(i, int) for i in self.peer_layers
            ):
                raise ValueError(
                    f"PeerMlaConfig.peer_layers must be 'all', None or a list of layer indices, got {self.peer_layers!r}."
                )
            bad = [i for i in self.peer_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"PeerMlaConfig.peer_layers has indices {bad} outside 0..{self.num_hidden_layers - 1} "
                    f"(num_hidden_layers={self.num_hidden_layers})."
                )
        if self.peer_layers is None or self.peer_layers == []:
            return num_experts or 0

        dims = self.product_key_dim
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(
                f"PeerMlaConfig.product_key_dim must be a non-empty list of positive integers, got {dims!r}."
            )
        product = math.prod(dims)
        if num_experts is not None and num_experts != product:
            raise ValueError(
                f"PeerMlaConfig.num_experts={num_experts} does not equal the product of product_key_dim={dims} "
                f"({product}); drop num_experts or change product_key_dim so that the product matches."
            )
        for name in (
            "peer_num_heads",
            "num_experts_per_tok",
            "product_key_topk",
            "expert_hidden_size",
            "peer_query_dim",
        ):
            positive(name)
        if self.peer_query_dim % len(dims):
            raise ValueError(
                f"PeerMlaConfig.peer_query_dim={self.peer_query_dim} must be divisible by the number of product-key "
                f"parts ({len(dims)}) so that each part gets an equal slice of the query."
            )
        candidates = math.prod(min(self.product_key_topk, d) for d in dims)
        if self.num_experts_per_tok > candidates:
            raise ValueError(
                f"PeerMlaConfig.num_experts_per_tok={self.num_experts_per_tok} is larger than the candidate set "
                f"({candidates} = product over product_key_dim={dims} of min(product_key_topk={self.product_key_topk}, "
                f"dim)); raise product_key_topk or lower num_experts_per_tok."
            )
        if self.peer_activation not in PEER_ACTIVATIONS:
            raise ValueError(
                f"PeerMlaConfig.peer_activation must be one of {PEER_ACTIVATIONS}, got {self.peer_activation!r}."
            )
        return product


__all__ = ["PeerMlaConfig"]
