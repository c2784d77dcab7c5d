"""`hfx` console script: one subcommand group per system. Thin: parse, call, print.

    hfx cartridge run         synthesize + train + evaluate on a corpus (the main job)
    hfx cartridge synthesize  self-study conversations -> a Parquet dataset with a card
    hfx cartridge train       a dataset -> a PEFT CARTRIDGE adapter with a card
    hfx cartridge eval        no context vs ICL vs cartridge, one table
    hfx cartridge compose     k >= 2 cartridges -> one adapter; composed vs single vs ICL on multi-document questions
    hfx cartridge push        a cartridge (+ its dataset) to the Hub with linked cards; --dry-run DIR to inspect
    hfx peer-mla analyze      total vs active parameters per token, by component, with a PNG plot
    hfx peer-mla init         a randomly initialised PEER-MLA model folder (code, config, safetensors, card)
    hfx peer-mla pretrain     pretrain a PEER-MLA LM (or its dense baseline) on a streamed data mixture (Trainer)
    hfx quanta run            quanta discovery: losses -> filter -> gradients -> similarity -> cluster -> view
    hfx quanta losses         per-token losses of a causal LM over a corpus (resumable Parquet shards)
    hfx quanta filter         keep low-loss tokens that induction does not explain
    hfx quanta gradients      per-token loss gradients, batched, optionally randomly projected (resumable)
    hfx quanta similarity     cosine similarity of the gradients, in blocks
    hfx quanta cluster        spectral clustering + cluster-size power law + dataset card
    hfx quanta view           a static HTML page to browse the clusters
    hfx lens dump             activations of a frozen model at one layer -> a Parquet dataset with a card
    hfx lens train            train a Consistency Lens on them (LensTrainer)
    hfx lens eval             KL of the lens vs mean/zero ablation, FVE, samples -> JSON
    hfx corpora               the bundled corpora and their sizes

Each cartridge, quanta, lens and peer-mla pretrain subcommand takes `--config file.yaml` plus command-line overrides (TRL's parser); `--help` lists
every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _parser(prog: str, *dataclass_types):
    from trl import TrlParser

    return TrlParser(dataclass_types, prog=prog)


def _cartridge_synthesize(argv: list[str]) -> None:
    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.pipeline import SynthesizeArguments
    from hfx.cartridges.server import ServerArguments
    from hfx.cartridges.synthesis import SynthesisConfig, synthesize
    from hfx.models import load_causal_lm, model_id, process_state

    args, config, server = _parser(
        "hfx cartridge synthesize", SynthesizeArguments, SynthesisConfig, ServerArguments
    ).parse_args_and_config(argv)
    model, tokenizer = load_causal_lm(args.model_name_or_path, device=args.device, dtype=args.dtype)
    corpus = load_corpus(args.corpus, tokenizer)
    dataset = synthesize(
        model,
        tokenizer,
        corpus,
        args.synthesis_dir,
        config,
        model_name=model_id(args.model_name_or_path),
        server=server,
    )
    if not process_state().is_main_process:  # under `accelerate launch`, one process reports and uploads
        return
    print(f"{len(dataset)} conversations in {args.synthesis_dir}")
    if args.hub_repo_id:
        from hfx.hub import push_folder

        print(push_folder(args.synthesis_dir, args.hub_repo_id, repo_type="dataset"))


def _cartridge_train(argv: list[str]) -> None:
    from hfx.cartridges.pipeline import TrainArguments, train_and_report
    from hfx.cartridges.training import CartridgeTrainingArguments

    args, training_args = _parser(
        "hfx cartridge train", TrainArguments, CartridgeTrainingArguments
    ).parse_args_and_config(argv)
    report = train_and_report(args, training_args)
    if report:
        print(report["table"])
    print(f"cartridge saved in {training_args.output_dir}")


def _cartridge_eval(argv: list[str]) -> None:
    from hfx.cartridges.pipeline import EvalArguments, evaluate_cartridge, write_cartridge_card

    (args,) = _parser("hfx cartridge eval", EvalArguments).parse_args_and_config(argv)
    if not args.questions:
        raise SystemExit("hfx cartridge eval: --questions FILE.jsonl is required.")
    report = evaluate_cartridge(
        args.cartridge,
        args.corpus,
        args.questions,
        model_name_or_path=args.model_name_or_path,
        max_context_tokens=args.max_context_tokens,
        throughput_batch=args.throughput_batch,
        throughput_tokens=args.throughput_tokens,
        device=args.device,
        dtype=args.dtype,
    )
    write_cartridge_card(args.cartridge, report)
    print(report["table"])


def _cartridge_compose(argv: list[str]) -> None:
    from hfx.cartridges.pipeline import ComposeArguments, compose_and_evaluate

    (args,) = _parser("hfx cartridge compose", ComposeArguments).parse_args_and_config(argv)
    report = compose_and_evaluate(args)
    if report:
        print(report["table"])
    print(f"composed cartridge saved in {args.output_dir}")


def _cartridge_run(argv: list[str]) -> None:
    from hfx.cartridges.pipeline import RunArguments, run_from_arguments
    from hfx.cartridges.server import ServerArguments
    from hfx.cartridges.synthesis import SynthesisConfig

    args, config, server = _parser(
        "hfx cartridge run", RunArguments, SynthesisConfig, ServerArguments
    ).parse_args_and_config(argv)
    result = run_from_arguments(args, config, server)
    if result.report:
        print(result.report["table"])
    print(f"cartridge saved in {result.cartridge_dir} ({result.seconds / 60:.1f} min)")


def _cartridge_push(argv: list[str]) -> None:
    from hfx.cartridges.hub import PushArguments, push_cartridge_to_hub

    (args,) = _parser("hfx cartridge push", PushArguments).parse_args_and_config(argv)
    result = push_cartridge_to_hub(
        args.cartridge,
        args.repo_id,
        synthesis_dir=args.synthesis_dir,
        dataset_repo_id=args.dataset_repo_id,
        base_model=args.base_model,
        private=args.private,
        dry_run_dir=args.dry_run,
        commit_message=args.commit_message,
    )
    for name in ("model", "dataset"):
        if name not in result:
            continue
        repo = result[name]
        if result["dry_run"]:
            print(f"{name} for {repo['url']}: {repo['folder']} ({', '.join(repo['files'])})")
        else:
            print(f"{name} uploaded to {repo['url']}: {repo['commit_url']}")
    if result["dry_run"]:
        print(f"dry run: nothing uploaded; the folders are in {args.dry_run}")


def _corpora(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    from hfx import embedded

    argparse.ArgumentParser(prog="hfx corpora", description="List the bundled corpora.").parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(embedded.embedded_model_path())
    for name in embedded.corpus_names():
        tokens = len(tokenizer(embedded.load_corpus(name), add_special_tokens=False)["input_ids"])
        default = "  (default)" if name == embedded.DEFAULT_CORPUS else ""
        print(f"{name:24s} {tokens:6d} tokens{default}")


def _peer_mla_analyze(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hfx peer-mla analyze",
        description="Total vs per-token active parameters of a PEER-MLA configuration, by component.",
    )
    parser.add_argument(
        "--config", required=True, help="YAML/JSON of PeerMlaConfig fields, or a model directory"
    )
    parser.add_argument("--output", default="peer_mla_parameters.png", help="where to write the PNG plot")
    parser.add_argument("--json", default=None, help="also write the counts as JSON here")
    args = parser.parse_args(argv)

    import json
    from pathlib import Path

    from hfx.atomic import write_text_atomic
    from hfx.peer_mla.analysis import analyze_parameters, format_table, load_config, plot_parameters

    config = load_config(args.config)
    report = analyze_parameters(config)
    print(format_table(report))
    plot_parameters(report, args.output, title=f"{Path(args.config).name}")
    print(f"plot saved in {args.output}")
    if args.json:
        write_text_atomic(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"counts saved in {args.json}")


def _peer_mla_init(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hfx peer-mla init",
        description="Write a randomly initialised PEER-MLA model that loads with trust_remote_code=True.",
    )
    parser.add_argument(
        "--config", required=True, help="YAML/JSON of PeerMlaConfig fields, or a model directory"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--tokenizer",
        default="embedded",
        help="tokenizer to ship with the model ('embedded' = SmolLM2's, 'none')",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from hfx.peer_mla.analysis import init_model, load_config

    config = load_config(args.config)
    tokenizer = None if args.tokenizer == "none" else args.tokenizer
    path = init_model(config, args.output_dir, tokenizer=tokenizer, seed=args.seed, dtype=args.dtype)
    print((path / "README.md").read_text().split("## Parameters", 1)[1].split("## Kernels", 1)[0].strip())
    print(f"model saved in {path}")


def _peer_mla_pretrain(argv: list[str]) -> None:
    from hfx.peer_mla.data import DataArguments
    from hfx.peer_mla.training import ModelArguments, PeerMlaTrainingArguments, pretrain

    model_args, data_args, training_args = _parser(
        "hfx peer-mla pretrain", ModelArguments, DataArguments, PeerMlaTrainingArguments
    ).parse_args_and_config(argv)
    results = pretrain(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps(results, indent=2))
        print(f"model saved in {training_args.output_dir}")


def _quanta(stage: str):
    def command(argv: list[str]) -> None:
        from hfx.quanta import pipeline as quanta

        groups = {
            "losses": (quanta.LossesArguments,),
            "filter": (quanta.FilterArguments,),
            "gradients": (quanta.GradientArguments,),
            "similarity": (),
            "cluster": (quanta.ClusterArguments,),
            "view": (quanta.ViewArguments,),
            "run": (
                quanta.LossesArguments,
                quanta.FilterArguments,
                quanta.GradientArguments,
                quanta.ClusterArguments,
                quanta.ViewArguments,
            ),
        }[stage]
        run, *args = _parser(f"hfx quanta {stage}", quanta.RunArguments, *groups).parse_args_and_config(argv)
        if stage == "run":
            summary = quanta.run_discovery(run, *args)
            if not summary:  # not the main process of an `accelerate launch`
                return
            clusters = json.loads((Path(summary["clusters"]) / "clusters.json").read_text())
            print(_quanta_summary(clusters))
            print(
                "stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_seconds"].items())
            )
            print(f"clusters saved in {summary['clusters']}; page: {summary['page']}")
        elif stage == "losses":
            losses = quanta.run_losses(run, *args)
            print(f"{sum(len(ids) for ids in losses['input_ids'])} tokens scored in {run.output_dir}/losses")
        elif stage == "filter":
            out = quanta.run_filter(run, *args)
            print(f"{json.loads((out / 'filter_config.json').read_text())['kept']} tokens kept in {out}")
        elif stage == "gradients":
            print(f"gradients saved in {quanta.run_gradients(run, *args)}")
        elif stage == "similarity":
            print(f"similarity saved in {quanta.run_similarity(run)}")
        elif stage == "cluster":
            out = quanta.run_cluster(run, *args)
            print(_quanta_summary(json.loads((out / "clusters.json").read_text())))
            print(f"clusters saved in {out}")
        else:
            print(f"page saved in {quanta.run_view(run, *args)}")

    return command


def _lens_dump(argv: list[str]) -> None:
    from hfx.lens.pipeline import DumpArguments, run_dump

    (args,) = _parser("hfx lens dump", DumpArguments).parse_args_and_config(argv)
    dataset = run_dump(args)
    print(f"{len(dataset)} activations of layer {args.layer} saved in {args.output_dir}")


def _lens_train(argv: list[str]) -> None:
    from hfx.lens.pipeline import LensArguments, run_train
    from hfx.lens.training import LensTrainingArguments

    args, training_args = _parser(
        "hfx lens train", LensArguments, LensTrainingArguments
    ).parse_args_and_config(argv)
    print(f"lens saved in {run_train(args, training_args)}")


@dataclass
class _LensEvalArguments:
    lens: str = field(default="outputs/lens", metadata={"help": "a trained lens directory"})
    output: str | None = field(
        default=None, metadata={"help": "results JSON (default: <lens>/eval_results.json)"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "examples per forward"})


def _lens_eval(argv: list[str]) -> None:
    from hfx.lens.pipeline import LensArguments, run_eval

    args, extra = _parser("hfx lens eval", LensArguments, _LensEvalArguments).parse_args_and_config(argv)
    results = run_eval(args, extra.lens, extra.output, extra.eval_batch_size)
    kl = results["kl"]
    print(
        f"{results['examples']} held-out activations of layer {results['layer']}: KL lens {kl['lens']:.4f}, "
        f"mean ablation {kl['mean_ablation']:.4f}, zero ablation {kl['zero_ablation']:.4f}; FVE {results['fve']:.3f}"
        f" (encoder reading the true context: KL {kl['encoder_reading_context']:.4f}, "
        f"FVE {results['fve_encoder_reading_context']:.3f})"
    )
    for sample in results["samples"]:
        print(f"  ...{sample['context']!r} -> {sample['explanation']!r}")


def _quanta_summary(clusters: dict) -> str:
    lines = [
        f"{clusters['n_tokens']} tokens in {clusters['n_clusters']} clusters; sizes ~ rank^-"
        f"{clusters['power_law']['exponent']:.2f} (r2 {clusters['power_law']['r2']:.2f})",
        "largest clusters (size: most frequent tokens):",
    ]
    for cluster, (size, tokens) in enumerate(zip(clusters["sizes"], clusters["top_tokens"], strict=True)):
        if cluster == 10:
            break
        lines.append(f"  {cluster:3d} {size:5d}: " + ", ".join(repr(t) for t in tokens))
    return "\n".join(lines)


COMMANDS = {
    ("cartridge", "run"): _cartridge_run,
    ("cartridge", "synthesize"): _cartridge_synthesize,
    ("cartridge", "train"): _cartridge_train,
    ("cartridge", "eval"): _cartridge_eval,
    ("cartridge", "compose"): _cartridge_compose,
    ("cartridge", "push"): _cartridge_push,
    ("peer-mla", "analyze"): _peer_mla_analyze,
    ("peer-mla", "init"): _peer_mla_init,
    ("peer-mla", "pretrain"): _peer_mla_pretrain,
    **{
        ("quanta", stage): _quanta(stage)
        for stage in ("run", "losses", "filter", "gradients", "similarity", "cluster", "view")
    },
    ("lens", "dump"): _lens_dump,
    ("lens", "train"): _lens_train,
    ("lens", "eval"): _lens_eval,
    ("corpora",): _corpora,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for key, command in COMMANDS.items():
        if tuple(argv[: len(key)]) == key:
            try:
                command(argv[len(key) :])
            except (ValueError, FileNotFoundError, FileExistsError) as err:
                raise SystemExit(f"hfx {' '.join(key)}: error: {err}") from None
            return
    print(__doc__.strip())
    if argv and argv[0] not in ("-h", "--help", "help"):
        raise SystemExit(f"\nhfx: unknown command {' '.join(argv)!r}")


if __name__ == "__main__":
    main()
