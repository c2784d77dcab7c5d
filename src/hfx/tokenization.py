"""Byte-level BPE tokenizers trained on the spot, for models that are not the embedded one.

* :func:`train_bpe` trains one on any texts (PEER-MLA pretraining uses it for a vocabulary sized to its model).
* :func:`small_chat_tokenizer` is a small one with a ChatML chat template, trained on the bundled scikit-learn
  descriptions in about a second. Random-weight models built from configs use it where the embedded model is not
  installed or its weights cannot travel (the GPU tests and benchmarks), since every hfx stage needs a tokenizer
  and the cartridge stages need a chat template.
"""

from __future__ import annotations

from collections.abc import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], **special_roles):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) of ``vocab_size`` tokens trained on ``texts``.

    ``special_tokens`` are added first (ids 0, 1, ...); ``special_roles`` names their roles (``eos_token=...``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=1_000_000, **special_roles)


def small_chat_tokenizer(vocab_size: int = 1024):
    """A ChatML chat tokenizer of ``vocab_size`` tokens trained on the bundled scikit-learn descriptions."""
    from hfx import embedded

    tokenizer = train_bpe(
        (text for _, text in embedded.collection_documents("sklearn_descr")),
        vocab_size,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
