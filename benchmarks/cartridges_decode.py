"""Decode throughput after a cartridge (p KV tokens) vs after the whole document in context (ICL).

.venv/bin/python benchmarks/cartridges_decode.py --corpus rcv1 --p 96
"""

import argparse

from peft import CartridgeConfig, get_peft_model

from hfx.cartridges.corpus import load_corpus
from hfx.cartridges.evaluation import cartridge_condition, decode_throughput, icl_condition
from hfx.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="rcv1")
    parser.add_argument(
        "--p", type=int, default=96, help="cartridge tokens (throughput does not depend on its values)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("embedded")
    corpus = load_corpus(args.corpus, tokenizer)
    icl = icl_condition(model, tokenizer, corpus.text)
    peft_model = get_peft_model(model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.p))
    cartridge = cartridge_condition(peft_model)
    prompts = [f"Question {i}: what does the document say about its data?" for i in range(args.batch)]
    with peft_model.disable_adapter():
        base = peft_model.get_base_model()
        results = {}
        for condition in (icl, cartridge):
            results[condition.name] = decode_throughput(
                base, tokenizer, condition, prompts, new_tokens=args.new_tokens, repeats=args.repeats
            )
    print(
        f"corpus {corpus.name}: ICL prefix {icl.prefix.num_tokens} tokens ({icl.prefix.nbytes / 2**20:.1f} MiB/seq), "
        f"cartridge {args.p} tokens ({cartridge.prefix.nbytes / 2**20:.1f} MiB/seq)"
    )
    for name, tps in results.items():
        print(
            f"{name:24s} {tps:8.1f} tokens/s (batch {args.batch}, {args.new_tokens} new tokens, best of {args.repeats})"
        )
    print(
        f"ratio cartridge/ICL throughput: {results[cartridge.name] / results[icl.name]:.2f}x; "
        f"KV bytes ICL/cartridge: {icl.prefix.nbytes / cartridge.prefix.nbytes:.1f}x"
    )


if __name__ == "__main__":
    main()
