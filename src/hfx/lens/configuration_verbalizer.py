"""Configuration of the activation verbaliser: a causal LM that reads one activation and writes its explanation.

The config is the backbone LM's own (every field of it, so that caches and generation read it as they read the
backbone's) plus what the verbaliser adds. Exported next to the weights by `save_pretrained`: imports nothing
from hfx.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

#: The fields the verbaliser adds to its backbone's config.
VERBALIZER_FIELDS = (
    "backbone_model_type",
    "activation_dim",
    "image_token_id",
    "layer",
    "base_model_name_or_path",
)


class ActivationVerbalizerConfig(PretrainedConfig):
    r"""Configuration of [`ActivationVerbalizer`].

    Args:
        backbone_model_type (`str`): `model_type` of the causal LM the verbaliser is built on (its other fields
            are passed as keyword arguments, as that model's config holds them).
        activation_dim (`int`): size of the activation the verbaliser reads (defaults to the backbone's width).
        image_token_id (`int`): the placeholder token whose input embedding is replaced by the projected
            activation (the name is the one vision-language models use, so that trainers built for them, such as
            TRL's, suppress it in generation).
        layer (`int`): the base model's decoder layer whose activation is explained (provenance).
        base_model_name_or_path (`str`): the model whose activations are explained (provenance).
    """

    model_type = "activation_verbalizer"

    def __init__(
        self,
        backbone_model_type: str = "llama",
        activation_dim: int | None = None,
        image_token_id: int | None = None,
        layer: int | None = None,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ):
        self.backbone_model_type = backbone_model_type
        self.image_token_id = image_token_id
        self.layer = layer
        self.base_model_name_or_path = base_model_name_or_path
        # the backbone's names for its sizes (GPT-2's n_embd is its hidden_size, ...) hold here too
        self.attribute_map = dict(AutoConfig.for_model(backbone_model_type).attribute_map)
        super().__init__(**kwargs)
        self.activation_dim = activation_dim or self.backbone().hidden_size

    @classmethod
    def from_backbone(cls, backbone: PretrainedConfig, **fields) -> ActivationVerbalizerConfig:
        """The verbaliser config over `backbone` (a causal LM's config) with the verbaliser's `fields`."""
        values = backbone.to_dict()
        for key in (
            "model_type",
            "architectures",
            "auto_map",
            "transformers_version",
            "dtype",
            "torch_dtype",
        ):
            values.pop(key, None)
        return cls(backbone_model_type=backbone.model_type, **values, **fields)

    def backbone(self) -> PretrainedConfig:
        """The backbone LM's config."""
        values = self.to_dict()
        for key in (
            *VERBALIZER_FIELDS,
            "model_type",
            "architectures",
            "auto_map",
            "transformers_version",
            "attribute_map",
        ):
            values.pop(key, None)
        values.pop("dtype", None)
        values.pop("torch_dtype", None)
        return AutoConfig.for_model(self.backbone_model_type, **values)


__all__ = ["ActivationVerbalizerConfig"]
