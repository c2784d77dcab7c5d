"""Consistency Lens: a decoder writes an activation as a few tokens, an encoder reads them back into the activation.

    activation (d) --activation_in--> one input embedding of the decoder LM
                   --decoder, k steps, Gumbel-softmax with straight-through--> k tokens (one-hot, differentiable)
                   --encoder LM over their embeddings (+ an optional learned read token)--> hidden state at the
                     last position, before any final norm --activation_out--> reconstructed activation (d)

With the encoder a copy of the base model's first `layer + 1` layers and an identity output projection, an
explanation that is the text preceding the position reconstructs the activation the base model computes from that
text alone; `context_loss` teaches the decoder to write that text (a warm start the KL objective then refines).

The decoder and encoder are causal-LM backbones (any transformers decoder; `from_base` copies a base model's
weights into them, optionally truncated). Training patches the reconstruction back into the frozen base model
(see `hfx.lens.activations`). This file and `configuration_lens.py` are exported with the weights by
`save_pretrained` and load with `trust_remote_code=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from .configuration_lens import ConsistencyLensConfig


@dataclass
class LensOutput(ModelOutput):
    """reconstruction (B, d); explanation_ids (B, k); explanation (B, k, V) one-hot rows carrying the
    straight-through gradient; logits (B, k, V) of the decoder at each step; with context targets, the decoder's
    teacher-forced context_loss and context_accuracy (see `context_loss`); explanation_lengths (B,) where
    explanations stop on their own (the rest of each row of explanation_ids is padding)."""

    reconstruction: torch.Tensor | None = None
    explanation_ids: torch.Tensor | None = None
    explanation: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    context_loss: torch.Tensor | None = None
    context_accuracy: torch.Tensor | None = None
    explanation_lengths: torch.Tensor | None = None


class ConsistencyLens(PreTrainedModel):
    config_class = ConsistencyLensConfig
    config: ConsistencyLensConfig
    base_model_prefix = "lens"
    supports_gradient_checkpointing = False

    def __init__(self, config: ConsistencyLensConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError(
                "ConsistencyLensConfig.backbone_config is required (the decoder/encoder architecture)."
            )
        decoder_config = config.backbone(config.decoder_num_layers)
        encoder_config = config.backbone(config.encoder_num_layers)
        self.decoder = AutoModelForCausalLM.from_config(decoder_config)
        self.encoder = AutoModel.from_config(encoder_config)
        self.activation_in = nn.Linear(config.activation_dim, decoder_config.hidden_size)
        self.read_embedding = (
            nn.Parameter(torch.zeros(encoder_config.hidden_size)) if config.read_token else None
        )
        self.activation_out = nn.Linear(encoder_config.hidden_size, config.activation_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self and self.read_embedding is not None:
            # transformers' init functions skip a tensor that was loaded from a checkpoint.
            init.normal_(self.read_embedding, std=self.config.initializer_range)

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        layer: int,
        explanation_length: int = 8,
        decoder_num_layers: int | None = None,
        encoder_num_layers: int | None = None,
        encoder_output_layer: int = -1,
        base_model_name_or_path: str | None = None,
        mean_activation: torch.Tensor | None = None,
        activation_norm: float | None = None,
        read_token: bool = False,
        identity_output: bool = False,
        write_backwards: bool = False,
    ) -> ConsistencyLens:
        """A lens whose decoder and encoder start as (truncated) copies of `base_model`.

        Output projection: with `identity_output` it starts as the identity (the encoder's hidden state is the
        reconstruction: right when the encoder is the base's first `layer + 1` layers); otherwise, with
        `mean_activation`, at zero weight and that bias, so the first reconstructions are the mean activation
        (the mean-ablation baseline). With `activation_norm` (the typical norm of an activation) and matching
        sizes, the input projection starts as a scaled identity that brings activations to the norm of the
        decoder's token embeddings, so the decoder reads them from the first step."""
        config = ConsistencyLensConfig(
            backbone_config=base_model.config,
            base_model_name_or_path=base_model_name_or_path or base_model.config.name_or_path,
            layer=layer,
            explanation_length=explanation_length,
            decoder_num_layers=decoder_num_layers,
            encoder_num_layers=encoder_num_layers,
            encoder_output_layer=encoder_output_layer,
            read_token=read_token,
            write_backwards=write_backwards,
        )
        lens = cls(config).to(base_model.dtype)
        state = base_model.state_dict()
        missing, _ = lens.decoder.load_state_dict(state, strict=False)
        _check_copied("decoder", missing)
        prefix = f"{base_model.base_model_prefix}."
        encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, _ = lens.encoder.load_state_dict(encoder_state, strict=False)
        _check_copied("encoder", missing)
        in_features, out_features = lens.activation_in.in_features, lens.activation_in.out_features
        if activation_norm and in_features == out_features:
            with torch.no_grad():
                embedding_norm = lens.decoder.get_input_embeddings().weight.float().norm(dim=-1).mean()
                lens.activation_in.weight.copy_(torch.eye(in_features) * (embedding_norm / activation_norm))
                lens.activation_in.bias.zero_()
        if identity_output:
            out = lens.activation_out
            if out.in_features != out.out_features:
                raise ValueError(
                    f"identity_output needs the encoder width ({out.in_features}) to equal the activation size "
                    f"({out.out_features})."
                )
            with torch.no_grad():
                out.weight.copy_(torch.eye(out.in_features))
                out.bias.zero_()
        elif mean_activation is not None:
            with torch.no_grad():
                lens.activation_out.weight.zero_()
                lens.activation_out.bias.copy_(mean_activation)
        return lens

    def explain(
        self,
        activations: torch.Tensor,
        temperature: float = 1.0,
        hard: bool = True,
        sample: bool | None = None,
    ) -> LensOutput:
        """Write each activation (B, d) as `explanation_length` tokens (returned in reading order). Sampling (default: in training mode) uses
        Gumbel-softmax at `temperature`, otherwise the most likely token; `hard=True` emits one-hot tokens whose
        gradient is the soft distribution's (straight-through)."""
        sample = self.training if sample is None else sample
        embeddings = self.decoder.get_input_embeddings().weight
        inputs = self.activation_in(activations.to(self.activation_in.weight.dtype))[:, None]
        cache = DynamicCache(config=self.decoder.config)
        one_hots, logits = [], []
        for _ in range(self.config.explanation_length):
            out = self.decoder(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
            step_logits = out.logits[:, -1].float()
            if sample:
                one_hot = F.gumbel_softmax(step_logits, tau=temperature, hard=hard)
            else:
                soft = torch.softmax(step_logits / temperature, dim=-1)
                one_hot = soft
                if hard:
                    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype) - soft.detach() + soft
            logits.append(step_logits)
            one_hots.append(one_hot)
            inputs = (one_hot.to(embeddings.dtype) @ embeddings)[:, None]
        explanation, logits = torch.stack(one_hots, dim=1), torch.stack(logits, dim=1)
        if self.config.write_backwards:  # back to reading order
            explanation, logits = explanation.flip(1), logits.flip(1)
        return LensOutput(explanation_ids=explanation.argmax(-1), explanation=explanation, logits=logits)

    def reconstruct(self, explanation: torch.Tensor) -> torch.Tensor:
        """(B, k, V) one-hot (or soft) tokens -> (B, d) activations."""
        embeddings = self.encoder.get_input_embeddings().weight
        return self._read(explanation.to(embeddings.dtype) @ embeddings)

    def read(self, explanation_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k) token ids -> (B, d) activations; with `lengths` (B,), row b's explanation is its first
        `lengths[b]` tokens (at least one) and the rest is padding: explanations of any length, as a verbaliser
        that stops on its own writes them."""
        inputs = self.encoder.get_input_embeddings()(explanation_ids)
        return self._read(inputs, lengths)

    def _read(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, width = inputs.shape[:2]
        rows = torch.arange(batch, device=inputs.device)
        if lengths is None:
            lengths = torch.full((batch,), width, device=inputs.device)
        lengths = lengths.to(inputs.device).clamp(1, width)
        if self.read_embedding is not None:  # the read token goes right after each row's explanation
            inputs = torch.cat([inputs, inputs.new_zeros(batch, 1, inputs.shape[-1])], dim=1)
            read = self.read_embedding.to(inputs.dtype).expand(batch, -1)
            inputs = inputs.index_put((rows, lengths), read)
            last = lengths
        else:
            last = lengths - 1
        index = self.config.encoder_output_layer % (self.config.backbone_num_layers("encoder") + 1)
        if index == 0:
            return self._capped(self.activation_out(inputs[rows, last]))
        # The output of encoder layer `index - 1` as the residual stream carries it (no final norm), at each row's
        # last real position: causal attention keeps the padding after it out of its reading.
        captured = {}

        def hook(module, args, output):
            captured["hidden"] = (output[0] if isinstance(output, tuple) else output)[rows, last]

        handle = decoder_layers(self.encoder)[index - 1].register_forward_hook(hook)
        try:
            self.encoder(inputs_embeds=inputs)
        finally:
            handle.remove()
        return self._capped(self.activation_out(captured["hidden"]))

    def _capped(self, reconstruction: torch.Tensor) -> torch.Tensor:
        """Scaled down onto `config.max_output_norm` where longer (unchanged when it is `None`)."""
        cap = self.config.max_output_norm
        if cap is None:
            return reconstruction
        norm = reconstruction.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return reconstruction * (cap / norm).clamp(max=1.0).to(reconstruction.dtype)

    def context_loss(
        self, activations: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy (and token accuracy) of the decoder writing `targets` (B, k) — the tokens
        that precede and include each activation's position in reading order, -100 where there are none — from the
        activation."""
        if targets.shape[1] != self.config.explanation_length:
            raise ValueError(
                f"context targets have {targets.shape[1]} tokens, the lens writes {self.config.explanation_length}."
            )
        if self.config.write_backwards:
            targets = targets.flip(1)
        embeddings = self.decoder.get_input_embeddings()
        first = self.activation_in(activations.to(self.activation_in.weight.dtype))[:, None]
        inputs = torch.cat([first, embeddings(targets[:, :-1].clamp(min=0))], dim=1)
        logits = self.decoder(inputs_embeds=inputs).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        kept = targets != -100
        accuracy = (logits.argmax(-1) == targets)[kept].float().mean()
        return loss, accuracy

    def forward(
        self,
        activations: torch.Tensor | None = None,
        temperature: float = 1.0,
        hard: bool = True,
        sample: bool | None = None,
        context_targets: torch.Tensor | None = None,
        explain: bool = True,
        explanation_ids: torch.Tensor | None = None,
        explanation_lengths: torch.Tensor | None = None,
    ) -> LensOutput:
        """Explain and reconstruct `activations`; with `context_targets`, also the context loss of the decoder
        (`explain=False`: that loss alone). Every loss of a training step comes from this one call, which is what
        DistributedDataParallel needs to synchronise the gradients of all of them. Given `explanation_ids` (and
        their lengths) instead, only reads them back (`read`): the reconstructor's training step."""
        if explanation_ids is not None:
            return LensOutput(
                explanation_ids=explanation_ids,
                explanation_lengths=explanation_lengths,
                reconstruction=self.read(explanation_ids, explanation_lengths),
            )
        output = LensOutput()
        if explain:
            output = self.explain(activations, temperature, hard, sample)
            output.reconstruction = self.reconstruct(output.explanation)
        if context_targets is not None:
            output.context_loss, output.context_accuracy = self.context_loss(activations, context_targets)
        return output


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (Llama-style `model.layers`, GPT-2-style `transformer.h`, ...)."""
    expected = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == expected:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {expected} decoder layers found.")


def _check_copied(part: str, missing: list[str]) -> None:
    # Only the lens's own projections may be missing from a base model's weights.
    if missing:
        raise ValueError(f"base model weights do not fit the lens {part}: missing {missing[:5]}")


ConsistencyLensConfig.register_for_auto_class()
ConsistencyLens.register_for_auto_class("AutoModel")

__all__ = ["ConsistencyLens", "ConsistencyLensConfig", "LensOutput"]
