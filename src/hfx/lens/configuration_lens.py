"""Configuration of the Consistency Lens: an activation -> text -> activation autoencoder around a frozen LM.

Exported next to the weights by `save_pretrained` and loaded with `trust_remote_code=True`: imports nothing
from hfx.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


class ConsistencyLensConfig(PretrainedConfig):
    r"""Configuration of [`ConsistencyLens`].

    Args:
        backbone_config (`dict` or `PretrainedConfig`): config of the causal LM whose architecture the decoder and
            the encoder copy (and whose weights `ConsistencyLens.from_base` copies in); usually the base model's.
        base_model_name_or_path (`str`): the frozen model the lens explains (provenance; the trainer loads it).
        layer (`int`): the base model's decoder layer whose output activation (residual stream) is explained.
        activation_dim (`int`): size of that activation (defaults to the backbone's hidden size).
        explanation_length (`int`): tokens the decoder writes per activation.
        decoder_num_layers / encoder_num_layers (`int` or `None`): keep only the first n backbone layers.
        encoder_output_layer (`int`): encoder layer whose output (the residual stream, never the final norm) is
            read at the last position: 0 = the input embeddings, n = the output of layer n, -1 = the last layer.
        write_backwards (`bool`): the decoder writes the explanation last token first (outputs, the encoder and
            the fluency loss always see it in reading order): right for explanations that end at the position,
            whose most recent token is the one the activation shows most clearly.
        read_token (`bool`): append a learned read token after the explanation and read there (otherwise the
            reading is at the explanation's last token).
        max_output_norm (`float` or `None`): the reconstruction's norm is capped at this (scaled down onto it when
            longer); `hfx lens sft` sets it to the training activations' largest norm, so that no explanation is
            read as a vector outside the activations' range (a run of one repeated token can drive the encoder's
            residual stream to several times its usual norm). `None`: no cap.
    """

    model_type = "consistency_lens"

    def __init__(
        self,
        backbone_config: dict | PretrainedConfig | None = None,
        base_model_name_or_path: str | None = None,
        layer: int = 0,
        activation_dim: int | None = None,
        explanation_length: int = 8,
        decoder_num_layers: int | None = None,
        encoder_num_layers: int | None = None,
        encoder_output_layer: int = -1,
        read_token: bool = False,
        write_backwards: bool = False,
        initializer_range: float = 0.02,
        max_output_norm: float | None = None,
        **kwargs,
    ):
        if isinstance(backbone_config, PretrainedConfig):
            backbone_config = backbone_config.to_dict()
        self.backbone_config = backbone_config
        self.base_model_name_or_path = base_model_name_or_path
        self.layer = layer
        self.explanation_length = explanation_length
        self.decoder_num_layers = decoder_num_layers
        self.encoder_num_layers = encoder_num_layers
        self.encoder_output_layer = encoder_output_layer
        self.read_token = read_token
        self.write_backwards = write_backwards
        self.initializer_range = initializer_range
        self.max_output_norm = max_output_norm
        backbone = self.backbone() if backbone_config is not None else None
        self.activation_dim = activation_dim or (backbone.hidden_size if backbone is not None else None)
        if backbone is not None:
            self._validate(backbone)
        super().__init__(**kwargs)

    def backbone(self, num_layers: int | None = None) -> PretrainedConfig:
        """The backbone config, optionally truncated to `num_layers` layers."""
        values = dict(self.backbone_config)
        model_type = values.pop("model_type")
        # The decoder and encoder are built in the dtype the lens is built or loaded in, not the one the base
        # model happened to be saved in (else a lens trained in bf16 could not be loaded in fp32, nor the reverse).
        values.pop("dtype", None)
        values.pop("torch_dtype", None)
        config = AutoConfig.for_model(model_type, **values)
        if num_layers is not None:
            config.num_hidden_layers = num_layers
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[:num_layers]
        return config

    def backbone_num_layers(self, part: str) -> int:
        """Layers of the "decoder" or the "encoder"."""
        value = self.decoder_num_layers if part == "decoder" else self.encoder_num_layers
        return value or self.backbone_config["num_hidden_layers"]

    def _validate(self, backbone: PretrainedConfig) -> None:
        total = backbone.num_hidden_layers
        for name in ("decoder_num_layers", "encoder_num_layers"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= total:
                raise ValueError(
                    f"ConsistencyLensConfig.{name}={value} must be between 1 and {total} (backbone layers)."
                )
        if self.explanation_length < 1:
            raise ValueError(
                f"ConsistencyLensConfig.explanation_length must be >= 1, got {self.explanation_length}."
            )
        encoder_layers = self.encoder_num_layers or total
        if not -(encoder_layers + 1) <= self.encoder_output_layer <= encoder_layers:
            raise ValueError(
                f"ConsistencyLensConfig.encoder_output_layer={self.encoder_output_layer} is outside the encoder's "
                f"hidden states (0..{encoder_layers}, or negative from the end)."
            )
        if not 0 <= self.layer < total:
            raise ValueError(
                f"ConsistencyLensConfig.layer={self.layer} is outside the base model's decoder layers (0..{total - 1})."
            )


__all__ = ["ConsistencyLensConfig"]
