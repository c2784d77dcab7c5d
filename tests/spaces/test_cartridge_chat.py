"""The cartridge-chat Space: its functions on the embedded model, the real server in headless Chromium, and eight
concurrent API users.

Cartridges are made without training (``initialization="first_tokens"``: the document's system turn cut to p
tokens), from two short bundled corpora, so they are real cartridges of the embedded model in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from hfx.cartridges import chat
from hfx.cartridges.corpus import load_corpus, user_turn_ids
from hfx.cartridges.training import create_cartridge, write_metadata
from hfx.models import model_id
from tests.browser import chromium_page
from tests.conftest import make_tiny_llama
from tests.servers import free_port, serving

APP = Path(__file__).resolve().parents[2] / "spaces" / "cartridge-chat" / "app.py"
STARTUP_SECONDS = 180
MAX_NEW_TOKENS = 12
ANSWER_MS = 120_000  # a streamed answer (and the first ICL prefill) on a busy 2-core machine
UPLOAD_MS = 30_000
CORPORA = (("linnerud", 8), ("covtype", 12))  # two short descriptions: (corpus, p)


def load_app_module():
    spec = importlib.util.spec_from_file_location("cartridge_chat_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app_module()


def save_cartridge(model, tokenizer, corpus_name: str, p: int, directory: Path, base_model: str) -> Path:
    peft_model = create_cartridge(
        model,
        tokenizer,
        load_corpus(corpus_name, tokenizer),
        num_virtual_tokens=p,
        initialization="first_tokens",
    )
    peft_model.save_pretrained(directory)
    write_metadata(directory, {"base_model": base_model, "corpus": corpus_name, "num_virtual_tokens": p})
    return directory


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{folder.name}/{file.name}")
    return target


@pytest.fixture(scope="module")
def cartridges(tmp_path_factory, embedded_model, tokenizer) -> dict[str, Path]:
    """Two good cartridges of the embedded model, and the bad uploads: another base model, another shape,
    truncated weights; plus a good and a truncated one as .zip files."""
    root = tmp_path_factory.mktemp("cartridges")
    base = model_id("embedded")
    paths = {}
    for corpus_name, p in CORPORA:
        paths[corpus_name] = save_cartridge(
            embedded_model, tokenizer, corpus_name, p, root / corpus_name, base
        )

    paths["other_base"] = Path(shutil.copytree(paths["linnerud"], root / "other_base"))
    metadata = json.loads((paths["other_base"] / "hfx_cartridge.json").read_text())
    write_metadata(paths["other_base"], {**metadata, "base_model": "someone/Other-7B"})

    tiny = make_tiny_llama(tokenizer)
    paths["other_shape"] = save_cartridge(tiny, tokenizer, "linnerud", 4, root / "other_shape", base)

    paths["truncated"] = Path(shutil.copytree(paths["covtype"], root / "truncated"))
    weights = paths["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    paths["good_zip"] = zip_folder(paths["covtype"], root / "covtype.zip")
    paths["truncated_zip"] = zip_folder(paths["truncated"], root / "truncated.zip")
    return paths


def files_of(folder: Path) -> list[str]:
    return [
        str(folder / name)
        for name in ("adapter_config.json", "adapter_model.safetensors", "hfx_cartridge.json")
    ]


# ----------------------------------------------------------------------------------------------------------------
# The app's functions, in process


def test_uploads_unpack_safely_and_refuse_what_is_not_a_cartridge(app, tmp_path):
    folder = tmp_path / "cart"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")

    # A zip entry that tries to climb out lands inside the destination, under its own name only.
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../outside/adapter_config.json", "{}")
        archive.writestr("../../outside/adapter_model.safetensors", "x")
        archive.writestr("../../outside/run.py", "print('no')")
    (unpacked,) = chat.unpack_upload([str(evil)], tmp_path / "out")
    assert unpacked.resolve().is_relative_to((tmp_path / "out").resolve())
    assert sorted(p.name for p in unpacked.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path.parent / "outside").exists()

    (loose,) = chat.unpack_upload(files_of(folder)[:2], tmp_path / "loose")
    assert (loose / "adapter_model.safetensors").read_bytes() == b"x"

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(chat.ChatError, match="notes.txt: not a cartridge file"):
        chat.unpack_upload([str(notes)], tmp_path / "x")
    with pytest.raises(chat.ChatError, match="no adapter_model.safetensors"):
        chat.unpack_upload([str(folder / "adapter_config.json")], tmp_path / "x")
    pickled = tmp_path / "adapter_model.bin"
    pickled.write_bytes(b"x")
    with pytest.raises(chat.ChatError, match="pickled weights are not loaded"):
        chat.unpack_upload([str(pickled)], tmp_path / "x")
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("README.md", "nothing")
    with pytest.raises(chat.ChatError, match="empty.zip: no adapter_config.json inside"):
        chat.unpack_upload([str(empty_zip)], tmp_path / "x")
    half_zip = tmp_path / "half.zip"
    with zipfile.ZipFile(half_zip, "w") as archive:
        archive.writestr("cart/adapter_config.json", "{}")
    with pytest.raises(chat.ChatError, match="half.zip: cart has adapter_config.json but no adapter_model"):
        chat.unpack_upload([str(half_zip)], tmp_path / "x")
    fake_zip = tmp_path / "fake.zip"
    fake_zip.write_bytes(b"PK not really")
    with pytest.raises(chat.ChatError, match="fake.zip: not a readable .zip"):
        chat.unpack_upload([str(fake_zip)], tmp_path / "x")

    # Chatbot values as Gradio hands them over (content blocks) become plain turns.
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": "hello"},
    ]
    assert chat.history_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_base_models_are_picked_by_name_and_cartridges_checked_against_the_one_picked(
    app, tmp_path, tokenizer, tiny_model_dir
):
    tiny = str(tiny_model_dir)
    model = make_tiny_llama(tokenizer)
    cartridge_dir = save_cartridge(model, tokenizer, "linnerud", 4, tmp_path / "tiny-cart", model_id(tiny))
    engine = chat.ChatEngine(["embedded", tiny], [cartridge_dir], max_new_tokens=4)
    ui = app.ChatUI(engine)
    keys = list(engine.cartridges)
    memory, status = ui.refresh(tiny, keys, chat.DOC_FROM_CARTRIDGES, chat.new_session())
    assert status == "" and f"on {tiny}" in memory and "cartridge: 1 part, 4 tokens" in memory
    assert "ICL (linnerud)" in memory
    assert set(engine._models) == {tiny}  # the embedded model is loaded only when someone picks it
    with pytest.raises(chat.ChatError, match="Unknown base model 'gpt-9'"):
        engine.base("gpt-9")
    with pytest.raises(
        app.gr.Error, match=r"Unknown cartridges \['nope'\]; this server has 'linnerud \(p=4\)'"
    ):
        list(ui.ask("hi", ["nope"], base_model=tiny))


@pytest.fixture(scope="module")
def engine(app, cartridges, embedded_model, tokenizer, embedded_dir):
    return chat.ChatEngine(
        ["embedded"],
        [cartridges["linnerud"], cartridges["covtype"]],
        document="linnerud",
        max_new_tokens=MAX_NEW_TOKENS,
        loader=lambda name: (embedded_model, tokenizer),
    )


@pytest.mark.integration
def test_composition_memory_and_bad_cartridges(app, engine, cartridges):
    base = engine.base()
    good = list(engine.cartridges.values())
    assert [c.label for c in good] == ["linnerud (p=8)", "covtype (p=12)"]
    prefix = engine.compose(base, good)
    assert prefix.num_tokens == 20
    assert prefix.nbytes == 20 * base.kv_bytes_per_token
    assert engine.compose(base, good) is prefix  # shared by every request, built once

    summary = engine.memory_summary(base, good, engine.document)
    icl_tokens, _ = engine.icl_tokens(base, engine.document[1])
    assert "cartridge: 2 parts, 20 tokens" in summary
    assert f"ICL (linnerud): {icl_tokens:,} tokens" in summary
    assert "× the cartridge" in summary
    assert "cartridge: none" in engine.memory_summary(base, [], None)

    def bad(name: str):
        return chat.Cartridge(name, name, cartridges[name])

    with pytest.raises(chat.ChatError, match=r"trained on 'someone/Other-7B'.*SmolLM2-135M-Instruct"):
        engine.compose(base, [good[0], bad("other_base")])
    with pytest.raises(
        chat.ChatError, match="other_shape: this cartridge was trained for a base model of another"
    ):
        engine.compose(base, [bad("other_shape")])
    with pytest.raises(
        chat.ChatError, match="truncated/adapter_model.safetensors: the cartridge's weights cannot be read"
    ):
        engine.compose(base, [bad("truncated")])
    # The messages name the cartridge as the user knows it, never a server-side path.
    with pytest.raises(chat.ChatError) as caught:
        engine.compose(base, [bad("truncated")])
    assert str(cartridges["truncated"]) not in str(caught.value)

    # The cartridges' own documents: both bundled corpora, in order.
    name, text = engine.resolve_document(chat.DOC_FROM_CARTRIDGES, good, None)
    assert name == "linnerud + covtype" and "Linnerud" in text


@pytest.mark.integration
def test_prompts_follow_the_evaluation_conditions(app, engine, tokenizer):
    base = engine.base()
    turn = [{"role": "user", "content": "What is measured?"}]
    assert chat.prompt_ids(base, turn, after_system=False) == user_turn_ids(
        tokenizer, turn[0]["content"], False
    )
    assert chat.prompt_ids(base, turn, after_system=True) == user_turn_ids(
        tokenizer, turn[0]["content"], True
    )

    history = [
        {"role": "user", "content": "First question, quite a long one " * 20},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second?"},
    ]
    full = chat.prompt_ids(base, history, after_system=True)
    assert chat.fit_conversation(base, history, True, room=len(full), what="x") == full
    # Too little room: the oldest exchange goes, the latest message stays.
    assert chat.fit_conversation(base, history, True, room=len(full) - 1, what="x") == chat.prompt_ids(
        base, history[2:], after_system=True
    )
    with pytest.raises(chat.ChatError, match="Your message is .* tokens, but after the cartridge"):
        chat.fit_conversation(base, history[:1], False, room=5, what="the cartridge (20 tokens)")


@pytest.mark.integration
def test_answers_stream_word_by_word_for_the_cartridge_and_icl(engine):
    base = engine.base()
    sides = engine.sides(
        base,
        list(engine.cartridges.values()),
        [],
        engine.document,
        [],
        "What does the dataset measure?",
        MAX_NEW_TOKENS,
    )
    assert [side.name for side in sides] == ["cartridge", "icl"]
    states = list(engine.stream(base, sides, MAX_NEW_TOKENS))
    for side in ("cartridge", "icl"):
        texts = [state[side] for state in states]
        assert texts[-1].strip(), f"{side}: empty answer"
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
        assert len({text for text in texts if text}) >= 3, f"{side}: not streamed ({texts})"

    # Closing the stream early stops generation; the engine answers the next request normally.
    stream = engine.stream(base, sides[:1], MAX_NEW_TOKENS)
    next(stream)
    stream.close()
    (last,) = [state["cartridge"] for state in engine.stream(base, sides[:1], 3)][-1:]
    assert last.strip()


#: The library controls of ``respond`` when the server has no library: (library mode, router, k, routed log).
NO_LIBRARY = (False, "bm25", 2, "")


@pytest.mark.integration
def test_ui_handlers_report_problems_and_keep_working(app, engine, cartridges):
    ui = app.ChatUI(engine)
    session = chat.new_session()
    keys = list(engine.cartridges)

    with pytest.warns(UserWarning, match="Type a message first"):
        (only,) = list(
            ui.respond("  ", [], [], None, keys, chat.DOC_FROM_ARGUMENT, True, 8, *NO_LIBRARY, session)
        )
    assert only[4].startswith("⚠️ Type a message first")

    for upload, expected in (
        (files_of(cartridges["other_base"]), "trained on 'someone/Other-7B'"),
        (files_of(cartridges["other_shape"]), "another shape"),
        ([str(cartridges["truncated_zip"])], "weights cannot be read"),
    ):
        with pytest.warns(UserWarning, match=expected):
            group, session, memory, status, cleared = ui.add_cartridges(upload, None, keys, None, session)
        assert expected in status and status.startswith("⚠️")
        assert group.value == keys and session["uploads"] == {}

    group, session, memory, status, _ = ui.add_cartridges(
        [str(cartridges["good_zip"])], None, keys, chat.DOC_FROM_ARGUMENT, session
    )
    assert status == "Added covtype (p=12)."
    assert len(group.value) == 3 and "cartridge: 3 parts, 32 tokens" in memory

    updates = list(
        ui.respond("Hello?", [], [], None, group.value, chat.DOC_FROM_ARGUMENT, True, 6, *NO_LIBRARY, session)
    )
    assert updates[0][2] == ""  # the message box is emptied as soon as the answer starts
    cartridge_chat, icl_chat, _, memory, status, _ = updates[-1]
    assert status.startswith("Answered in")
    assert cartridge_chat[-1]["role"] == "assistant" and cartridge_chat[-1]["content"].strip()
    assert icl_chat[-1]["content"].strip()

    # Someone else's upload key (or a made-up one) is not this session's cartridge.
    assert engine.selected(["upload-not-mine", keys[0]], chat.new_session()) == [engine.cartridges[keys[0]]]
    chat.delete_session(session)
    assert not Path(session["folder"]).exists()


# ----------------------------------------------------------------------------------------------------------------
# The real server


@pytest.fixture(scope="module")
def server(tmp_path_factory, cartridges):
    """``python app.py`` with the two good cartridges and a bundled document, on a free loopback port."""
    directory = tmp_path_factory.mktemp("cartridge-chat")
    port = free_port()
    log_path = directory / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
    }
    command = [sys.executable, str(APP), "--port", str(port), "--document", "linnerud"]
    command += ["--cartridge", str(cartridges["linnerud"]), "--cartridge", str(cartridges["covtype"])]
    command += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    url = f"http://127.0.0.1:{port}/"
    with serving(command, url, log_path, env, STARTUP_SECONDS):
        yield url


def test_help_lists_the_options(app, capsys):
    with pytest.raises(SystemExit) as exited:
        app.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--base-model", "--cartridge DIR", "--document FILE", "--port", "--concurrency"):
        assert option in out


# Records each distinct text of the latest answer in a chat, so the test sees the answer grow.
WATCH_JS = """(selector) => {
  window.__seen = window.__seen || {};
  const seen = (window.__seen[selector] = []);
  const root = document.querySelector(selector);
  const record = () => {
    const bots = root.querySelectorAll('[data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  };
  new MutationObserver(record).observe(root, {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.integration
def test_chat_in_the_browser_streams_shows_memory_and_reports_bad_uploads(server, cartridges):
    with chromium_page(timeout_ms=90_000) as page:
        from playwright.sync_api import expect

        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server)
        memory = page.locator("#memory")
        expect(memory).to_contain_text("cartridge: 2 parts, 20 tokens", timeout=UPLOAD_MS)
        expect(memory).to_contain_text("ICL (linnerud):")
        expect(page.locator("#cartridges label")).to_have_text(["linnerud (p=8)", "covtype (p=12)"])

        page.locator("#with-icl input").check()
        expect(page.locator("#icl-chat")).to_be_visible()
        page.evaluate(WATCH_JS, "#cartridge-chat")
        page.evaluate(WATCH_JS, "#icl-chat")
        page.fill("#message textarea", "What does the dataset measure?")
        page.click("#send")
        status = page.locator("#status")
        expect(status).to_contain_text("Answered in", timeout=ANSWER_MS)
        expect(page.locator("#message textarea")).to_have_value("")
        answer = page.locator("#cartridge-chat [data-testid=bot]").last.inner_text().strip()
        icl_answer = page.locator("#icl-chat [data-testid=bot]").last.inner_text().strip()
        assert answer and icl_answer
        seen = page.evaluate("window.__seen['#cartridge-chat']")
        assert len(seen) >= 2, f"no intermediate states seen: {seen}"
        assert seen[-1] == answer
        assert page.evaluate("window.__seen['#icl-chat']")[-1] == icl_answer

        upload = page.locator("#cartridge-upload input[type=file]")
        upload.set_input_files(files_of(cartridges["other_base"]))
        expect(status).to_contain_text("trained on 'someone/Other-7B'", timeout=UPLOAD_MS)
        upload.set_input_files(files_of(cartridges["other_shape"]))
        expect(status).to_contain_text("another shape", timeout=UPLOAD_MS)
        upload.set_input_files([str(cartridges["truncated_zip"])])
        expect(status).to_contain_text("weights cannot be read", timeout=UPLOAD_MS)
        expect(page.locator("#cartridges label")).to_have_count(2)

        upload.set_input_files([str(cartridges["good_zip"])])
        expect(status).to_contain_text("Added covtype (p=12).", timeout=UPLOAD_MS)
        expect(page.locator("#cartridges label")).to_have_count(3)
        expect(memory).to_contain_text("cartridge: 3 parts, 32 tokens")
        expect(status).to_contain_text("Added covtype (p=12).")  # not wiped by the selection's own refresh
        page.locator("#cartridges label").first.click()  # untick linnerud: the composition follows
        expect(memory).to_contain_text("cartridge: 2 parts, 24 tokens", timeout=UPLOAD_MS)

        # Still answering after the bad uploads, now through the two covtype cartridges, as a second turn.
        page.fill("#message textarea", "And what else?")
        page.keyboard.press("Enter")
        expect(status).to_contain_text("Answered in", timeout=ANSWER_MS)
        expect(page.locator("#cartridge-chat [data-testid=bot]")).to_have_count(2)
        assert page.locator("#cartridge-chat [data-testid=bot]").last.inner_text().strip()
        assert errors == []


@pytest.mark.integration
def test_eight_concurrent_users_all_get_an_answer(server):
    from gradio_client import Client

    users = 8
    clients = [Client(server, verbose=False) for _ in range(users)]
    barrier = threading.Barrier(users)
    results: list[tuple[float, object]] = [(0.0, None)] * users

    def ask(index: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            answer = clients[index].predict(
                f"Question {index}: what does the dataset describe?", None, False, 8, api_name="/ask"
            )
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            answer = err
        results[index] = (time.perf_counter() - start, answer)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    errors = [answer for _, answer in results if not isinstance(answer, (list, tuple))]
    assert not errors, errors
    for _, (cartridge_answer, icl_answer) in results:
        assert isinstance(cartridge_answer, str) and cartridge_answer.strip()
        assert icl_answer == ""
    latencies = sorted(seconds for seconds, _ in results)
    print(
        f"\n{users} concurrent users: latency min {latencies[0]:.2f} s, "
        f"median {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s"
    )


# ----------------------------------------------------------------------------------------------------------------
# Library mode: a library of a tiny model, each question routed to its cartridges


@pytest.fixture(scope="module")
def library_server(tmp_path_factory, tiny_model_dir):
    """``python app.py --library LIB`` over a three-document library of a tiny random Llama."""
    from hfx.cartridges.library import build_library
    from tests.cartridges.test_library import DOCUMENTS, tiny_settings, write_documents

    directory = tmp_path_factory.mktemp("library-chat")
    docs = write_documents(directory / "docs", DOCUMENTS)
    build_library(  # trained alone, then tuned together (one epoch: three steps), as a library is by default
        [str(docs)], directory / "lib", tiny_settings(tiny_model_dir, distractors="none"), tune_epochs=1
    )
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(APP), "--port", str(port), "--base-model", str(tiny_model_dir)]
    command += ["--library", str(directory / "lib"), "--max-new-tokens", "6"]
    url = f"http://127.0.0.1:{port}/"
    with serving(command, url, directory / "server.log", env, STARTUP_SECONDS):
        yield url


@pytest.mark.integration
def test_library_mode_routes_each_question_and_shows_the_cartridges_used(library_server):
    with chromium_page(timeout_ms=60_000) as page:
        from playwright.sync_api import expect

        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(library_server)
        expect(page.locator("#library-mode input")).to_be_checked()
        expect(page.locator("#library-mode")).to_contain_text("3 documents, cartridges tuned together")
        page.fill("#message textarea", "Where does Kelvara moss grow?")
        page.click("#send")
        status, routed, memory = page.locator("#status"), page.locator("#routed"), page.locator("#memory")
        expect(status).to_contain_text("Answered in", timeout=ANSWER_MS)
        expect(routed).to_contain_text("answer 1 (bm25): kelvara.md (p=8)")
        expect(memory).to_contain_text("cartridge: 2 parts, 16 tokens")

        page.locator("#router label", has_text="calibrated_likelihood").click()
        page.fill("#message textarea", "What does the Quintessa lighthouse burn?")
        page.keyboard.press("Enter")
        expect(routed).to_contain_text("answer 2 (calibrated_likelihood):", timeout=ANSWER_MS)
        expect(status).to_contain_text("Answered in", timeout=ANSWER_MS)
        expect(page.locator("#cartridge-chat [data-testid=bot]")).to_have_count(2)
        assert errors == []

    from gradio_client import Client

    answer, used = Client(library_server, verbose=False).predict(
        "What does the Quintessa lighthouse burn?", 1, "bm25", 4, api_name="/ask_library"
    )
    assert used == ["quintessa.txt (p=8)"] and isinstance(answer, str)
