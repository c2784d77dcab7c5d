"""The activation verbaliser of a natural-language autoencoder: a causal LM (a copy of the base model) that reads
one activation and writes its explanation as text.

    prompt tokens, one of them the placeholder `config.image_token_id`
      --embeddings, with the placeholder's row replaced by activation_in(activation)-->  the backbone LM  --> text

The activation travels as `pixel_values` (B, d), the name vision-language models give their extra input, so that
TRL's `SFTTrainer` and `GRPOTrainer` (and `generate`) carry it to every forward of the model: the prompt's, the
sampled completions' and the reference model's. The placeholder is looked up in `input_ids`, so a forward without
it (a decoding step after the prompt) ignores `pixel_values`.

This file and `configuration_verbalizer.py` are exported with the weights by `save_pretrained`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_verbalizer import ActivationVerbalizerConfig


class ActivationVerbalizerModel(PreTrainedModel):
    """The backbone (`language_model`, any transformers decoder) with the activation's input projection."""

    config_class = ActivationVerbalizerConfig
    config: ActivationVerbalizerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: ActivationVerbalizerConfig):
        super().__init__(config)
        self.language_model = AutoModel.from_config(config.backbone())
        self.activation_in = nn.Linear(config.activation_dim, self.language_model.config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of `input_ids`, the placeholder's replaced by the projected activation of its row."""
        embeddings = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeddings
        where = input_ids == self.config.image_token_id
        if not where.any():
            return embeddings
        rows, columns = where.nonzero(as_tuple=True)
        if len(pixel_values) != len(input_ids) or (where.sum(-1) > 1).any():
            raise ValueError(
                f"each row reads one activation at one placeholder (token {self.config.image_token_id}): got "
                f"{len(pixel_values)} activations for {len(input_ids)} rows with "
                f"{where.sum(-1).tolist()} placeholders."
            )
        projected = self.activation_in(pixel_values.to(self.activation_in.weight.dtype)).to(embeddings.dtype)
        return embeddings.index_put((rows, columns), projected[rows])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )


class ActivationVerbalizer(PreTrainedModel, GenerationMixin):
    """A causal LM over [`ActivationVerbalizerModel`]: `forward(input_ids, pixel_values=activations, ...)`."""

    config_class = ActivationVerbalizerConfig
    config: ActivationVerbalizerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: ActivationVerbalizerConfig):
        super().__init__(config)
        self.model = ActivationVerbalizerModel(config)
        backbone = self.model.language_model
        self.lm_head = nn.Linear(backbone.config.hidden_size, backbone.config.vocab_size, bias=False)
        # the output embeddings tie to the backbone's input embeddings, whatever the backbone names them
        name = next(n for n, m in backbone.named_modules() if m is backbone.get_input_embeddings())
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        image_token_id: int | None = None,
        layer: int | None = None,
        activation_norm: float | None = None,
        base_model_name_or_path: str | None = None,
    ) -> ActivationVerbalizer:
        """A verbaliser whose LM is a copy of `base_model` (a causal LM whose vocabulary already holds the
        placeholder `image_token_id`; without it, set `config.image_token_id` once the vocabulary has it). With `activation_norm` (the typical norm of an activation) the input
        projection starts as a scaled identity that brings activations to the norm of the token embeddings."""
        config = ActivationVerbalizerConfig.from_backbone(
            base_model.config,
            image_token_id=image_token_id,
            layer=layer,
            base_model_name_or_path=base_model_name_or_path or base_model.config.name_or_path,
        )
        verbalizer = cls(config).to(base_model.dtype)
        state = base_model.state_dict()
        prefix = f"{base_model.base_model_prefix}."
        backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = verbalizer.model.language_model.load_state_dict(backbone, strict=False)
        if missing:
            raise ValueError(f"base model weights do not fit the verbaliser: missing {missing[:5]}")
        head = base_model.get_output_embeddings().weight
        with torch.no_grad():
            verbalizer.lm_head.weight.copy_(head)
            projection = verbalizer.model.activation_in
            if activation_norm and projection.in_features == projection.out_features:
                embedding_norm = verbalizer.get_input_embeddings().weight.float().norm(dim=-1).mean()
                projection.weight.copy_(
                    torch.eye(projection.in_features) * (embedding_norm / activation_norm)
                )
                projection.bias.zero_()
        return verbalizer

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, kept, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


ActivationVerbalizerConfig.register_for_auto_class()
ActivationVerbalizer.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ActivationVerbalizer", "ActivationVerbalizerConfig", "ActivationVerbalizerModel"]
