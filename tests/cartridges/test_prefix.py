import torch
from peft import CartridgeConfig, get_peft_model

from hfx.cartridges.prefix import PrefixKV, forward_with_prefix, generate_after_prefix


def test_prefix_cache_reproduces_the_full_forward(tiny_model):
    ids = torch.randint(100, 1000, (1, 20))
    full = tiny_model(ids).logits
    prefix = PrefixKV.prefill(tiny_model, ids[0, :12].tolist())
    assert prefix.num_tokens == 12
    cfg = tiny_model.config
    assert (
        prefix.nbytes
        == 2
        * cfg.num_hidden_layers
        * 12
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
        * 4
    )
    # Two rows, the second right-padded: the prefix is shared by both.
    suffix = torch.stack([ids[0, 12:], torch.cat([ids[0, 12:17], torch.zeros(3, dtype=torch.long)])])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    out = forward_with_prefix(tiny_model, prefix, suffix, mask).logits
    torch.testing.assert_close(out[0], full[0, 12:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :5], full[0, 12:17], rtol=1e-4, atol=1e-4)


def test_cartridge_prefix_equals_what_peft_feeds_the_model(tiny_model):
    peft_model = get_peft_model(tiny_model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    ids = torch.randint(100, 1000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        prefix = PrefixKV.from_peft_model(peft_model)
        with peft_model.disable_adapter():
            got = forward_with_prefix(peft_model.get_base_model(), prefix, ids, mask).logits
    assert prefix.num_tokens == 6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_generate_after_prefix_matches_generate_on_whole_prompts(tiny_model, tokenizer):
    prefix_ids = torch.randint(100, 1000, (10,)).tolist()
    prompts = [torch.randint(100, 1000, (n,)).tolist() for n in (3, 6)]
    prefix = PrefixKV.prefill(tiny_model, prefix_ids)
    out, width = generate_after_prefix(
        tiny_model,
        prefix,
        prompts,
        tokenizer.pad_token_id,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
    )
    for row, prompt in enumerate(prompts):
        alone = tiny_model.generate(
            torch.tensor([prefix_ids + prompt]),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out[row, width:].tolist() == alone[0, len(prefix_ids) + len(prompt) :].tolist()
