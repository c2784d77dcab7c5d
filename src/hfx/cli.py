"""The ``hfx`` command: one group of commands per system (cartridge, peer-mla, quanta, lens), built on argparse.

Each command's options come from its dataclasses through TRL's ``TrlParser`` (``--config file.yaml`` plus
command-line overrides); its ``--help`` adds what it does and an example (:data:`COMMANDS`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hfx import __version__


def nearest(word: str, choices) -> str:
    """ " Did you mean ...?" naming the valid choices closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _with_suggestions(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` of an "unrecognized arguments" or "invalid choice" error, with the nearest valid names."""
    if message.startswith("unrecognized arguments: "):
        options = [o for action in parser._actions for o in action.option_strings]
        unknown = [w for w in message.split(": ", 1)[1].split() if w.startswith("-")]
        message += "".join(nearest(word.split("=", 1)[0], options) for word in unknown)
    elif "invalid choice: " in message:
        word = message.split("invalid choice: ", 1)[1].split("'")[1]
        choices = [c for action in parser._actions if action.choices for c in action.choices]
        message += nearest(word, choices)
    return message


class _SuggestingParser(argparse.ArgumentParser):
    """argparse, whose "unrecognized arguments" and "invalid choice" errors name the nearest valid ones."""

    def error(self, message: str):
        super().error(_with_suggestions(self, message))


def _argparser(prog: str) -> argparse.ArgumentParser:
    """A plain argparse parser for ``prog`` with its help text and suggestions (commands without dataclasses)."""
    command = COMMANDS[tuple(prog.split()[1:])]
    return _SuggestingParser(
        prog=prog,
        description=textwrap.fill(command.description, 100),
        epilog=command.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _parser(prog: str, *dataclass_types):
    """A ``TrlParser`` for ``prog`` with its help text (description, example, what to run next) and suggestions."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str):
            super().error(_with_suggestions(self, message))

        def parse_args_into_dataclasses(self, *args, **kwargs):
            # HfArgumentParser raises a ValueError listing the options it did not use; make it argparse's
            # "unrecognized arguments" error, which names the nearest valid options.
            try:
                return super().parse_args_into_dataclasses(*args, **kwargs)
            except ValueError as err:
                prefix = "Some specified arguments are not used by the HfArgumentParser: "
                if not str(err).startswith(prefix):
                    raise
                self.error("unrecognized arguments: " + " ".join(ast.literal_eval(str(err)[len(prefix) :])))

    command = COMMANDS[tuple(prog.split()[1:])]
    return Parser(
        dataclass_types,
        prog=prog,
        description=textwrap.fill(command.description, 100),
        epilog=command.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


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
        overwrite=args.overwrite,
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


def _cartridge_library_build(argv: list[str]) -> None:
    from hfx.cartridges.library import LibraryBuildArguments, build_from_arguments
    from hfx.cartridges.synthesis import SynthesisConfig

    args, config = _parser(
        "hfx cartridge library build", LibraryBuildArguments, SynthesisConfig
    ).parse_args_and_config(argv)
    report = build_from_arguments(args, config)
    for doc_id, reason in report.trained.items():
        print(f"trained {doc_id} ({reason})")
    if report.kept:
        print(f"kept {len(report.kept)} up-to-date cartridges: {', '.join(report.kept)}")
    if report.removed:
        print(f"removed {', '.join(report.removed)} (no longer among the documents)")
    tuning = report.tuning
    if tuning is not None:
        done = "up to date" if tuning.status == "done" else "tuned"
        print(
            f"cartridges tuned together in {tuning.library} ({done}: {tuning.steps} steps, {tuning.minutes:.1f} min)"
        )
    print(f"library in {report.library} ({report.library / 'library.json'})")


def _cartridge_library_tune(argv: list[str]) -> None:
    from hfx.cartridges.library_tuning import LibraryTuneCommand, LibraryTuningArguments, tune_library

    command, args = _parser(
        "hfx cartridge library tune", LibraryTuneCommand, LibraryTuningArguments
    ).parse_args_and_config(argv)
    report = tune_library(
        command.library,
        args.output_dir,
        args,
        model_name_or_path=command.model_name_or_path,
        overwrite=command.overwrite,
    )
    if report.status == "done":
        print(
            f"{report.library} is up to date ({report.steps} steps, {report.minutes:.1f} min); nothing to do"
        )
    else:
        loss = f", loss {report.train_loss:.3f}" if report.train_loss is not None else ""
        print(f"tuned library in {report.library}: {report.steps} steps in {report.minutes:.1f} min{loss}")


def _cartridge_library_ask(argv: list[str]) -> None:
    from hfx.cartridges.library import ROUTERS, CartridgeLibrary
    from hfx.models import load_causal_lm

    parser = _argparser("hfx cartridge library ask")
    parser.add_argument("library", help="A library's folder (made by `hfx cartridge library build`).")
    parser.add_argument("question", nargs="+", help="The question (one or more; each is routed on its own).")
    parser.add_argument("--k", type=int, default=2, help="How many cartridges to compose per question.")
    parser.add_argument("--router", choices=ROUTERS, default="bm25", help="How to pick the cartridges.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the library's).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per answer.")
    args = parser.parse_args(argv)
    library = CartridgeLibrary(args.library)
    model, tokenizer = load_causal_lm(
        args.model_name_or_path or library.model_name_or_path, device=args.device, dtype=args.dtype
    )
    for question in args.question:
        answer = library.answer(
            question, model, tokenizer, k=args.k, router=args.router, max_new_tokens=args.max_new_tokens
        )
        if args.json:
            import dataclasses

            print(json.dumps(dataclasses.asdict(answer)))
            continue
        used = ", ".join(f"{c} ({s:.2f})" for c, s in zip(answer.cartridges, answer.scores, strict=True))
        print(f"Q: {question}\ncartridges [{answer.router}]: {used}\nA: {answer.text}\n")


def _cartridge_library_push(argv: list[str]) -> None:
    from hfx.cartridges.library import push_library_to_hub

    parser = _argparser("hfx cartridge library push")
    parser.add_argument("library", help="A library's folder (made by `hfx cartridge library build`).")
    parser.add_argument("--repo_id", required=True, help="The model repo to upload it to (USER/NAME).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument(
        "--dry-run", dest="dry_run", metavar="DIR", help="Write the upload folder to DIR; upload nothing."
    )
    parser.add_argument("--commit_message", default=None)
    args = parser.parse_args(argv)
    result = push_library_to_hub(
        args.library,
        args.repo_id,
        private=args.private,
        dry_run_dir=args.dry_run,
        commit_message=args.commit_message,
    )
    if result["dry_run"]:
        print(f"library for {result['url']}: {result['folder']} ({len(result['files'])} files)")
    else:
        print(f"library uploaded to {result['url']}: {result['commit_url']}")


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
    from hfx import embedded
    from hfx.models import load_tokenizer

    _argparser("hfx corpora").parse_args(argv)
    tokenizer = load_tokenizer("embedded")
    for name in embedded.corpus_names():
        tokens = len(tokenizer(embedded.corpus_text(name), add_special_tokens=False)["input_ids"])
        default = "  (default)" if name == embedded.DEFAULT_CORPUS else ""
        print(f"{name:24s} {tokens:6d} tokens{default}")


def _peer_mla_analyze(argv: list[str]) -> None:
    parser = _argparser("hfx peer-mla analyze")
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
    parser = _argparser("hfx peer-mla init")
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


def _peer_mla_push_kernel(argv: list[str]) -> None:
    from hfx.peer_mla.hub import PushKernelArguments, push_peer_kernel

    (args,) = _parser("hfx peer-mla push-kernel", PushKernelArguments).parse_args_and_config(argv)
    result = push_peer_kernel(
        args.repo_id,
        args.kernel_dir,
        private=args.private,
        dry_run_dir=args.dry_run,
        commit_message=args.commit_message,
    )
    where = f"{result['url']} (version {result['version']}, branch {result['revision']})"
    if result["dry_run"]:
        print(f"kernel for {where}: {result['folder']} ({', '.join(result['files'])})")
        print(f"dry run: nothing uploaded; the folder is in {args.dry_run}")
        return
    print(f"kernel {result['kernel_dir']} uploaded to {where}: {result['commit_url']}")
    print(
        f'use it: PeerMlaConfig(peer_kernel_repo="{args.repo_id}"), then model.kernelize_peer_experts(); '
        f'or kernels.get_kernel("{args.repo_id}", version={result["version"]})'
    )


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


def _lens_sft(argv: list[str]) -> None:
    from hfx.lens.nla_pipeline import NLAArguments, VerbalizerSFTConfig, run_sft

    args, sft_config = _parser("hfx lens sft", NLAArguments, VerbalizerSFTConfig).parse_args_and_config(argv)
    print(f"verbaliser and reconstructor saved in {run_sft(args, sft_config)}")


def _lens_grpo(argv: list[str]) -> None:
    from hfx.lens.nla_pipeline import NLAArguments, VerbalizerGRPOConfig, run_grpo

    args, grpo_config = _parser("hfx lens grpo", NLAArguments, VerbalizerGRPOConfig).parse_args_and_config(
        argv
    )
    print(f"verbaliser and reconstructor saved in {run_grpo(args, grpo_config)}")


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
    from hfx.lens.evaluation import format_lens_table

    results = run_eval(args, extra.lens, extra.output, extra.eval_batch_size)
    print(format_lens_table(results))
    for sample in results["samples"]:
        print(f"  ...{sample['context']!r} -> {sample['explanation']!r}")
    print(f"results saved in {extra.output or Path(extra.lens) / 'eval_results.json'} (and the lens's card)")


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


@dataclass(frozen=True)
class Command:
    """One ``hfx`` command: its function, one-line summary, what it does, an example and what to run next."""

    run: Callable[[list[str]], None]
    summary: str
    description: str
    example: str
    next: str = ""

    def epilog(self) -> str:
        text = f"example:\n  {self.example}"
        return text + (f"\n\nnext:\n  {self.next}" if self.next else "")


GROUPS = {
    "cartridge": "Cartridges: a document becomes a small trained KV-cache prefix (a PEFT CARTRIDGE adapter) that "
    "answers like the document in context, at a fraction of the memory.",
    "peer-mla": "PEER-MLA: a causal LM with product-key retrieval over up to millions of tiny experts and "
    "DeepSeek-style multi-head latent attention.",
    "quanta": "Quanta discovery: per-token losses and gradients of a causal LM, clustered into the skills "
    "(quanta) it uses, browsable as a page.",
    "lens": "Consistency Lens: a decoder writes a model's activation as a few tokens, an encoder reads them back, "
    "trained so the model's behaviour is kept.",
}

#: Groups inside a group (their commands are keyed by three words).
LIBRARY_GROUP = (
    "A cartridge library: many documents, one cartridge each, trained to be mixed, kept in one folder with a "
    "manifest, and routed per question (BM25 over the documents, or the cartridges themselves)."
)
SUBGROUPS = {("cartridge", "library"): LIBRARY_GROUP}

COMMANDS: dict[tuple[str, ...], Command] = {
    ("cartridge", "run"): Command(
        _cartridge_run,
        "synthesize + train + evaluate a cartridge of a document (the main job)",
        "Make a cartridge of a document in one output directory: synthesize conversations about it, distil the "
        "model-with-document into the model-with-cartridge, and score no context, ICL and the cartridge. "
        "Resumable. Main options: --corpus (a bundled corpus, a text file or folder), --questions (a JSONL of "
        "multiple-choice questions for the final table), --budget_minutes (plan the run to fit), --output_dir.",
        "hfx cartridge run --corpus rcv1 --questions tests/data/questions/rcv1.jsonl --budget_minutes 18",
        "hfx cartridge push --cartridge OUTPUT_DIR/cartridge --repo_id you/my-cartridge   (share it)",
    ),
    ("cartridge", "library", "build"): Command(
        _cartridge_library_build,
        "many documents -> a library of cartridges trained to be mixed (library.json)",
        "Train one cartridge per document (the main job, --budget_minutes per document) into one folder with a "
        "manifest, then tune them together so that any mix of them composes (OUTPUT_DIR/tuned, which the library "
        "serves; --tune_epochs, 2 by default, 0: none). A rerun trains only new documents and those whose text or "
        "settings changed, resumes an interrupted one, removes those no longer given, and tunes again only when a "
        "cartridge changed. Under `accelerate launch` the processes share the documents; the first one tunes. Main "
        "options: --documents, --output_dir, --budget_minutes, --tune_epochs, --compression.",
        "hfx cartridge library build --documents sklearn_descr --output_dir outputs/library --budget_minutes 6",
        'hfx cartridge library ask OUTPUT_DIR "How many samples does the iris dataset have?"',
    ),
    ("cartridge", "library", "tune"): Command(
        _cartridge_library_tune,
        "a built library -> its cartridges tuned together, so that any mix of them composes",
        "Train all of a library's cartridges together on their own synthesized conversations: each step puts one "
        "document's cartridge among a changing set of the others (0 to --max_others, random order) and trains every "
        "cartridge in the prefix, the document's own to answer and the others to keep out of its answers. Writes a "
        "new library folder (resumable, reused when up to date); `build` does this into LIB/tuned by default, this "
        "command tunes a copy with other settings. Trainer options as TrainingArguments "
        "(--num_train_epochs, --max_steps, --learning_rate); --conversations_per_step.",
        "hfx cartridge library tune --library outputs/library --output_dir outputs/library-tuned",
        'hfx cartridge library ask outputs/library-tuned "How many samples does the iris dataset have?"',
    ),
    ("cartridge", "library", "ask"): Command(
        _cartridge_library_ask,
        "route a question to a library's cartridges and answer with them composed",
        "Pick the top-k cartridges of a library for each question (BM25 over the documents, or the question's "
        "likelihood under each cartridge) and answer with them composed; prints which cartridges each answer used.",
        'hfx cartridge library ask outputs/library "How many samples does the iris dataset have?" --k 2',
    ),
    ("cartridge", "library", "push"): Command(
        _cartridge_library_push,
        "a library (cartridges, texts, manifest) to a Hub model repo with a card",
        "Upload a library's finished cartridges (adapter, metadata, card), the documents' text and library.json to "
        "one model repo, with a card listing the documents; CartridgeLibrary.from_pretrained(REPO) loads it back. "
        "--dry-run DIR writes the upload folder and uploads nothing.",
        "hfx cartridge library push outputs/library --repo_id you/my-library --dry-run outputs/library-upload",
    ),
    ("cartridge", "synthesize"): Command(
        _cartridge_synthesize,
        "self-study conversations about a document -> a Parquet dataset with a card",
        "Synthesize the training data of a cartridge: conversations about chunks of the document, with the "
        "teacher's (the model with the chunk in context) top-k distribution at every answer token. Resumable shard "
        "by shard; locally or through an OpenAI-compatible server (--server_url). Main options: --corpus, "
        "--synthesis_dir, --num_conversations.",
        "hfx cartridge synthesize --corpus rcv1 --synthesis_dir outputs/synthesis --num_conversations 256",
        "hfx cartridge train --synthesis_dir SYNTHESIS_DIR --corpus CORPUS --output_dir outputs/cartridge",
    ),
    ("cartridge", "train"): Command(
        _cartridge_train,
        "a synthesized dataset -> a PEFT CARTRIDGE adapter with a card",
        "Train a cartridge (CartridgeTrainer, a transformers Trainer) by top-k distillation on a synthesized "
        "dataset; every TrainingArguments option applies. Main options: --synthesis_dir, --corpus, --output_dir, "
        "--num_virtual_tokens, --learning_rate, --questions (score it at the end).",
        "hfx cartridge train --synthesis_dir outputs/synthesis --corpus rcv1 --output_dir outputs/cartridge",
        "hfx cartridge eval --cartridge OUTPUT_DIR --corpus CORPUS --questions QUESTIONS.jsonl",
    ),
    ("cartridge", "eval"): Command(
        _cartridge_eval,
        "no context vs ICL vs cartridge on multiple-choice questions, one table",
        "Score a trained cartridge against the same base model without context and with the whole document in "
        "context (ICL): accuracy, answer log-perplexity, KV-cache bytes, decode throughput. The table also goes "
        "into the cartridge's card. Main options: --cartridge, --corpus, --questions.",
        "hfx cartridge eval --cartridge outputs/self-study/cartridge --corpus rcv1 "
        "--questions tests/data/questions/rcv1.jsonl",
        "hfx cartridge push --cartridge CARTRIDGE --repo_id you/my-cartridge",
    ),
    ("cartridge", "compose"): Command(
        _cartridge_compose,
        "two or more cartridges -> one adapter; composed vs single vs ICL on multi-document questions",
        "Concatenate cartridges of different documents into one adapter (PEFT's compose_cartridge_adapters) and "
        "score it against each cartridge alone and against ICL of all the documents. Main options: --cartridges, "
        "--corpora, --questions, --output_dir.",
        "hfx cartridge compose --cartridges outputs/rcv1/cartridge outputs/iris/cartridge --corpora rcv1 iris "
        "--questions tests/data/questions/two_documents.jsonl --output_dir outputs/composed",
        "hfx cartridge eval --cartridge OUTPUT_DIR --corpus CORPUS --questions QUESTIONS.jsonl",
    ),
    ("cartridge", "push"): Command(
        _cartridge_push,
        "a cartridge (and its dataset) to the Hub with linked cards",
        "Upload a cartridge folder as a model repository and, with --synthesis_dir, its training data as a dataset "
        "repository, with cards that link to each other and to the base model. --dry_run DIR writes the folders "
        "that would be uploaded instead.",
        "hfx cartridge push --cartridge outputs/self-study/cartridge --repo_id you/rcv1-cartridge --dry_run outputs/push",
    ),
    ("peer-mla", "analyze"): Command(
        _peer_mla_analyze,
        "total vs per-token active parameters by component, with a PNG plot",
        "Build a PEER-MLA configuration on the meta device (no memory) and count its parameters: in total and "
        "active per token, by component (embeddings, attention, PEER experts, router, dense MLPs).",
        "hfx peer-mla analyze --config examples/peer_mla/configs/model_1m_experts.yaml --output params.png",
        "hfx peer-mla init --config CONFIG --output_dir outputs/peer-mla   (a model folder of it)",
    ),
    ("peer-mla", "init"): Command(
        _peer_mla_init,
        "a randomly initialised PEER-MLA model folder (code, config, safetensors, card)",
        "Write a randomly initialised PEER-MLA model that loads with AutoModelForCausalLM.from_pretrained(path, "
        "trust_remote_code=True) where hfx is not installed, with a tokenizer and a model card.",
        "hfx peer-mla init --config examples/peer_mla/configs/model_small.yaml --output_dir outputs/peer-mla-small",
        "hfx peer-mla pretrain --model_config OUTPUT_DIR --output_dir outputs/pretrain",
    ),
    ("peer-mla", "pretrain"): Command(
        _peer_mla_pretrain,
        "pretrain a PEER-MLA LM (or its dense baseline) on a streamed data mixture",
        "Pretrain with a transformers Trainer on a mixture of streamed text datasets, resumable from its last "
        "complete checkpoint; --mlp dense trains the baseline with the same active parameters per token. Runs "
        "under accelerate launch on several processes or GPUs.",
        "hfx peer-mla pretrain --config examples/peer_mla/configs/pretrain_cpu.yaml --output_dir outputs/pretrain",
    ),
    ("peer-mla", "push-kernel"): Command(
        _peer_mla_push_kernel,
        "publish the PEER Triton kernel as a Hub kernel repository (the `kernels` layout)",
        "Upload the PEER Triton kernel shipped with hfx (or --kernel_dir) to a Hub repository of type kernel: the "
        "build variants on the branch v<version>, the card on main, as kernels.get_kernel reads them. A PEER-MLA "
        "config naming it (peer_kernel_repo) kernelizes its experts from there, also where hfx is not installed. "
        "--dry_run DIR writes the folder that would be uploaded instead.",
        "hfx peer-mla push-kernel --repo_id you/peer-kernel --dry_run outputs/peer-kernel",
        "set peer_kernel_repo: you/peer-kernel in a model's config, then model.kernelize_peer_experts()",
    ),
    ("quanta", "run"): Command(
        _quanta("run"),
        "quanta discovery end to end: losses -> filter -> gradients -> similarity -> cluster -> page",
        "Run every stage of quanta discovery in one output directory (each resumable): per-token losses of a "
        "causal LM over a corpus, the low-loss tokens induction does not explain, their loss gradients, the cosine "
        "similarity of the gradients, spectral clustering, and a static page to browse the clusters.",
        "hfx quanta run --dataset python_stdlib --max_tokens 20000 --output_dir outputs/quanta",
        "open OUTPUT_DIR/viewer/index.html in a browser",
    ),
    ("quanta", "losses"): Command(
        _quanta("losses"),
        "per-token losses of a causal LM over a corpus (resumable Parquet shards)",
        "Score every token of a corpus with a causal LM; the losses are written as Parquet shards with a card.",
        "hfx quanta losses --dataset python_stdlib --max_tokens 20000 --output_dir outputs/quanta",
        "hfx quanta filter --output_dir OUTPUT_DIR",
    ),
    ("quanta", "filter"): Command(
        _quanta("filter"),
        "keep the low-loss tokens that induction does not explain",
        "Keep the tokens the model predicts well (loss below a threshold) whose next token is not a copy of an "
        "earlier continuation of the same context (induction).",
        "hfx quanta filter --output_dir outputs/quanta",
        "hfx quanta gradients --output_dir OUTPUT_DIR",
    ),
    ("quanta", "gradients"): Command(
        _quanta("gradients"),
        "per-token loss gradients, batched, optionally randomly projected (resumable)",
        "Compute the gradient of each kept token's loss with respect to the model's parameters, batched with "
        "torch.func, optionally randomly projected to a smaller size.",
        "hfx quanta gradients --output_dir outputs/quanta",
        "hfx quanta similarity --output_dir OUTPUT_DIR",
    ),
    ("quanta", "similarity"): Command(
        _quanta("similarity"),
        "cosine similarity of the gradients, in blocks",
        "The cosine similarity between every pair of per-token gradients, computed in blocks.",
        "hfx quanta similarity --output_dir outputs/quanta",
        "hfx quanta cluster --output_dir OUTPUT_DIR",
    ),
    ("quanta", "cluster"): Command(
        _quanta("cluster"),
        "spectral clustering + cluster-size power law + dataset card",
        "Cluster the tokens by gradient similarity (scikit-learn's SpectralClustering) and fit a power law to the "
        "cluster sizes.",
        "hfx quanta cluster --output_dir outputs/quanta --n_clusters 40",
        "hfx quanta view --output_dir OUTPUT_DIR",
    ),
    ("quanta", "view"): Command(
        _quanta("view"),
        "a static HTML page to browse the clusters",
        "Write a self-contained page (viewer/index.html) to browse each cluster's tokens in their context.",
        "hfx quanta view --output_dir outputs/quanta",
        "open OUTPUT_DIR/viewer/index.html in a browser",
    ),
    ("lens", "dump"): Command(
        _lens_dump,
        "activations of a frozen model at one layer -> a Parquet dataset with a card",
        "Run a frozen model over a corpus and store the residual-stream activations of one layer with their "
        "contexts, as the training data of a lens.",
        "hfx lens dump --layer 15 --max_examples 4096 --output_dir outputs/lens-activations",
        "hfx lens train --activations_dir OUTPUT_DIR --output_dir outputs/lens",
    ),
    ("lens", "train"): Command(
        _lens_train,
        "train a Consistency Lens on dumped activations (LensTrainer)",
        "Train a lens (LensTrainer, a transformers Trainer): the decoder writes each activation as a few tokens, the "
        "encoder reads them back, and the loss is the KL between the model's next-token distributions with the "
        "original and the reconstructed activation.",
        "hfx lens train --activations_dir outputs/lens-activations --output_dir outputs/lens",
        "hfx lens eval --lens OUTPUT_DIR",
    ),
    ("lens", "sft"): Command(
        _lens_sft,
        "natural-language autoencoder, phase 1: SFT of a verbaliser (TRL SFTTrainer) and its reconstructor",
        "Write explanation targets for dumped activations (the base model's continuation, its top predictions or "
        "the context's last tokens), train a verbaliser (a copy of the base model reading the activation at a "
        "placeholder token) to write them with TRL's SFTTrainer, and fit a reconstructor (the base's first "
        "layer + 1 layers and a linear head, cosine regression) to read them back.",
        "hfx lens sft --activations_dir outputs/lens-activations --output_dir outputs/lens-sft",
        "hfx lens grpo --sft_dir OUTPUT_DIR --output_dir outputs/lens-grpo",
    ),
    ("lens", "grpo"): Command(
        _lens_grpo,
        "natural-language autoencoder, phase 2: GRPO of the verbaliser (TRL GRPOTrainer), reconstruction reward",
        "Train the SFT verbaliser with TRL's GRPOTrainer: it samples explanations of each activation, rewarded by "
        "the cosine between the activation and the reconstructor's reading of the explanation (optionally minus "
        "the KL of the model's next-token distribution with it patched in) and a length penalty, with a KL "
        "penalty to the SFT verbaliser.",
        "hfx lens grpo --sft_dir outputs/lens-sft --output_dir outputs/lens-grpo",
        "hfx lens eval --lens OUTPUT_DIR",
    ),
    ("lens", "eval"): Command(
        _lens_eval,
        "KL and FVE of the lens vs ablations, empty/random explanations; copy rate, faithfulness -> JSON",
        "Score a trained lens on held-out activations, one table: KL, fraction of variance explained and cosine for "
        "the lens, mean and zero ablation, an empty explanation, a random one and the true last tokens of the "
        "context (diagnostic); the copy rate of its explanations; how much swapping two explanations or editing one "
        "token changes the result; sample explanations.",
        "hfx lens eval --lens outputs/lens",
    ),
    ("corpora",): Command(
        _corpora,
        "the bundled corpora and their sizes in tokens",
        "List the corpora that ship with hfx's dependencies (scikit-learn's dataset descriptions, Python's "
        "standard library) and their sizes in the embedded model's tokens.",
        "hfx corpora",
        "hfx cartridge run --corpus NAME --output_dir outputs/NAME",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    """``hfx`` and ``hfx GROUP``: argparse sub-parsers that list the groups and commands (the commands themselves
    parse their own options)."""
    parser = _SuggestingParser(
        prog="hfx",
        description=textwrap.fill(
            "Hugging Face-ecosystem extensions: cartridges, PEER-MLA, quanta discovery and the consistency lens, "
            "as commands. `hfx GROUP --help` lists a group's commands, `hfx GROUP COMMAND --help` a command's "
            "options.",
            100,
        ),
        epilog="example:\n  hfx cartridge run --corpus rcv1 --questions tests/data/questions/rcv1.jsonl "
        "--budget_minutes 18",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hfx {__version__}")
    groups = parser.add_subparsers(
        dest="group", title="command groups", metavar="GROUP", parser_class=_SuggestingParser
    )
    for group, description in GROUPS.items():
        commands = {key[1]: command for key, command in COMMANDS.items() if key[0] == group}
        group_parser = groups.add_parser(
            group,
            help=description.split(":")[1].strip().split(",")[0].rstrip("."),
            description=textwrap.fill(description, 100),
            epilog=f"example:\n  {next(iter(commands.values())).example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub = group_parser.add_subparsers(
            dest="command", title="commands", metavar="COMMAND", parser_class=_SuggestingParser
        )
        nested: dict[str, dict[str, Command]] = {}
        for key, command in COMMANDS.items():
            if key[0] == group and len(key) == 3:
                nested.setdefault(key[1], {})[key[2]] = command
        for name, command in commands.items():
            if name in nested:  # a group inside the group (`hfx cartridge library build`)
                if name in sub.choices:
                    continue
                inner = sub.add_parser(
                    name,
                    help=f"{name} commands: {', '.join(nested[name])}",
                    description=textwrap.fill(SUBGROUPS[(group, name)], 100),
                    epilog=f"example:\n  {next(iter(nested[name].values())).example}",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                )
                inner_sub = inner.add_subparsers(
                    dest="subcommand", title="commands", metavar="COMMAND", parser_class=_SuggestingParser
                )
                for inner_name, inner_command in nested[name].items():
                    inner_sub.add_parser(inner_name, help=inner_command.summary, add_help=False)
                continue
            sub.add_parser(name, help=command.summary, add_help=False)
    groups.add_parser("corpora", help=COMMANDS[("corpora",)].summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    for key, command in COMMANDS.items():
        if tuple(argv[: len(key)]) == key:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            try:
                command.run(argv[len(key) :])
            except (ValueError, FileNotFoundError, FileExistsError) as err:
                raise SystemExit(f"hfx {' '.join(key)}: error: {err}") from None
            if command.next and os.environ.get("RANK", "0") == "0":  # one process of a launch says it
                print(f"next: {command.next}")
            return
    parser = _top_parser()
    args = parser.parse_args(argv)  # --help, --version and unknown groups or commands end here
    if args.group is None:
        parser.print_help()
    elif args.command is None:  # a group without a command
        parser.parse_args([args.group, "--help"])
    else:  # a group inside a group, without its command
        parser.parse_args([args.group, args.command, "--help"])


if __name__ == "__main__":
    main()
