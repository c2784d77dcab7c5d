"""Your own documents: PDF (text extracted), HTML (text without markup), a URL; clear errors naming the file."""

from __future__ import annotations

import json

import pytest

from hfx.documents import load_documents, read_document, read_text_file
from tests.documents import encrypted_pdf, image_only_pdf, text_pdf
from tests.servers import static_files

LINES = [
    "The Zorblat protocol was designed in 1987 by Mara Quell.",
    "It runs over the Ostrava ring (a token ring) at 4 Mbit/s.",
    "Version 2 added checksums in 1991.",
]


def test_a_pdf_reads_as_its_text(tmp_path):
    path = tmp_path / "zorblat.pdf"
    path.write_bytes(text_pdf(LINES))
    text = read_text_file(path)
    for line in LINES:
        assert " ".join(line.split()) in " ".join(text.split())
    assert read_document(path) == ("zorblat", text.strip())
    assert load_documents(str(tmp_path)) == [("zorblat.pdf", text)]


def test_an_html_page_reads_as_its_text_without_markup(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<!doctype html><html><head><title>T</title><style>p {color: red}</style>"
        "<script>var secret = 'no';</script></head><body><h1>Zorblat</h1>"
        "<p>Designed in 1987 by <b>Mara&nbsp;Quell</b> &amp; friends.</p><ul><li>ring</li><li>4 Mbit/s</li></ul>"
        "</body></html>"
    )
    text = read_text_file(path)
    assert text.splitlines() == [
        "Zorblat",
        "Designed in 1987 by Mara Quell & friends.",
        "ring",
        "4 Mbit/s",
    ]
    assert "secret" not in text and "color" not in text and "<" not in text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scan.pdf", image_only_pdf(), r"scan\.pdf: the PDF has no text to extract \(1 page\(s\)\).*OCR"),
        ("locked.pdf", encrypted_pdf(text_pdf(LINES)), r"locked\.pdf: the PDF is encrypted"),
        ("broken.pdf", b"%PDF-1.4\nnot really a pdf", r"broken\.pdf: cannot be read as a PDF"),
        (
            "empty.html",
            b"<html><script>x()</script><img src=a.png></html>",
            r"empty\.html: the page has no text",
        ),
    ],
)
def test_documents_without_text_are_clear_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_document(path)


@pytest.fixture
def web_server(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(text_pdf(LINES))
    (tmp_path / "page.html").write_text("<html><body><p>Hello from the page.</p></body></html>")
    with static_files(tmp_path) as url:
        yield url.rstrip("/")


def test_a_url_reads_as_the_document_it_serves(web_server):
    name, text = read_document(f"{web_server}/doc.pdf")
    assert name == "doc" and "Mara Quell" in text
    assert read_document(f"{web_server}/page.html") == ("page", "Hello from the page.")
    with pytest.raises(ValueError, match=r"/missing\.pdf: cannot be fetched \(HTTPError: HTTP Error 404"):
        read_document(f"{web_server}/missing.pdf")


def test_a_cartridge_from_a_pdf(tmp_path, tiny_model_dir, capsys):
    from hfx.cli import main

    pdf = tmp_path / "zorblat.pdf"
    pdf.write_bytes(text_pdf(LINES * 4))
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps(
            {
                "question": "Who designed the Zorblat protocol?",
                "choices": ["Mara Quell", "Ivo Brand"],
                "answer": 0,
            }
        )
        + "\n"
    )
    main(
        [
            "cartridge", "run", "--corpus", str(pdf), "--model_name_or_path", str(tiny_model_dir),
            "--output_dir", str(tmp_path / "run"), "--questions", str(questions), "--num_conversations", "4",
            "--conversations_per_chunk", "2", "--chunk_min_tokens", "20", "--chunk_max_tokens", "40",
            "--max_question_tokens", "4", "--max_answer_tokens", "4", "--num_virtual_tokens", "8",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| cartridge (p=8) |" in out
    metadata = json.loads((tmp_path / "run" / "cartridge" / "hfx_cartridge.json").read_text())
    assert metadata["corpus"] == "zorblat"
    assert "next: hfx cartridge push" in out


def test_one_reader_for_corpora_collections_files_and_datasets(tmp_path):
    """--corpus and --dataset take the same inputs: a cartridge's document is the reader's documents joined."""
    from hfx import embedded

    assert load_documents("iris") == [("iris", embedded.corpus_text("iris"))]
    assert [name for name, _ in load_documents("iris,wine_data")] == ["iris", "wine_data"]
    assert read_document("sklearn_descr") == ("sklearn_descr", embedded.corpus_text("sklearn_descr"))
    rows = tmp_path / "notes.jsonl"
    rows.write_text(json.dumps({"text": "first note"}) + "\n" + json.dumps({"text": "second note"}) + "\n")
    assert read_document(rows) == ("notes", "first note\n\nsecond note")
    with pytest.raises(FileNotFoundError, match="missing/doc.txt: no such file or folder"):
        read_document("missing/doc.txt")
    with pytest.raises(ValueError, match="neither an existing path nor bundled collection names"):
        load_documents("no_such_name")
