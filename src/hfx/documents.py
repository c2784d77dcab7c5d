"""The one document reader of hfx: what ``--corpus`` and ``--dataset`` take.

`load_documents(spec)` returns (name, text) pairs for
  * bundled names, comma-separated: the collections `pydoc_topics`, `python_stdlib`, `sklearn_descr` (interleaved
    document by document, so a token budget samples all of them) and the named corpora of :mod:`hfx.embedded`
    (one scikit-learn dataset description each: `rcv1`, `iris`, ...);
  * a URL (http/https: a web page's text, or a PDF's);
  * a document file (.txt, .md, .rst, .py text; .pdf, whose text is extracted; .html/.htm, whose text without the
    markup is kept: one document), or a directory of such files (one document each);
  * a `datasets` dataset: a .parquet / .jsonl / .json / .csv file, or a directory written by `save_to_disk`,
    with a text column (`--text_column`, default "text").

`read_document(spec)` is the same input as one document (a cartridge studies one text): its documents joined.
"""

from __future__ import annotations

import itertools
from html.parser import HTMLParser
from pathlib import Path

#: Files read as documents: plain text, PDF (its extracted text) and HTML (its text without the markup).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pdf", ".html", ".htm")
DATASET_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
DEFAULT_DATASET = "pydoc_topics,python_stdlib"


def load_documents(spec: str | Path, text_column: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs; empty documents are dropped. Raises with the path/column when the input is unusable:
    ``FileNotFoundError`` for a path that does not exist, ``ValueError`` for unknown names or unusable files."""
    from hfx import embedded

    spec = str(spec)
    if spec.lower().startswith(("http://", "https://")):
        documents = [fetch_document(spec)]
    elif Path(spec).exists():
        documents = _from_path(Path(spec), text_column)
    elif "/" in spec or Path(spec).suffix:
        raise FileNotFoundError(f"{spec}: no such file or folder.")
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
        corpora = embedded.corpus_names()
        unknown = [n for n in names if n not in embedded.DOCUMENT_COLLECTIONS and n not in corpora]
        if unknown or not names:
            raise ValueError(
                f"{spec!r} is neither an existing path nor bundled collection names "
                f"({', '.join(embedded.DOCUMENT_COLLECTIONS)}) or corpus names ({', '.join(corpora)}), "
                "comma-separated."
            )
        collections = [_bundled(name) for name in names]
        documents = [doc for group in itertools.zip_longest(*collections) for doc in group if doc is not None]
    documents = [(name, text) for name, text in documents if text.strip()]
    if not documents:
        raise ValueError(f"{spec}: no non-empty documents.")
    return documents


def _bundled(name: str) -> list[tuple[str, str]]:
    from hfx import embedded

    if name in embedded.DOCUMENT_COLLECTIONS:
        return [(f"{name}/{doc}", text) for doc, text in embedded.collection_documents(name)]
    return [(name, embedded.corpus_text(name))]


def read_document(spec: str | Path) -> tuple[str, str]:
    """``(name, text)``: what :func:`load_documents` reads from ``spec``, as one document (its documents joined
    with blank lines). The name is the corpus name, the file's stem, the folder's or the page's name.

    Raises ``ValueError`` naming the file for empty or binary input and ``FileNotFoundError`` for missing paths.
    """
    source = str(spec)
    try:
        documents = load_documents(source)
    except ValueError as error:
        if "no non-empty documents" in str(error):
            raise ValueError(f"{source}: the document is empty; a cartridge needs text to study.") from None
        raise
    path = Path(source)
    if source.lower().startswith(("http://", "https://")):
        name = documents[0][0]
    elif path.is_file():
        name = path.stem
    elif path.is_dir():
        name = path.name
    else:
        name = source
    return name, "\n\n".join(text.strip() for _, text in documents)


def _from_path(path: Path, text_column: str) -> list[tuple[str, str]]:
    if path.is_dir() and not (path / "dataset_info.json").exists():
        files = text_files(path)
        if not files:
            raise ValueError(
                f"{path}: directory has no {'/'.join(TEXT_SUFFIXES)} files and is not a saved dataset."
            )
        return [(str(p.relative_to(path)), read_text_file(p)) for p in files]
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return [(path.name, read_text_file(path))]
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    elif path.suffix in DATASET_SUFFIXES:
        dataset = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(
            f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES + tuple(DATASET_SUFFIXES))} or a directory."
        )
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[next(iter(dataset))]
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{path}: no column {text_column!r} (columns: {dataset.column_names}); set --text_column."
        )
    return [(f"{path.name}[{i}]", text or "") for i, text in enumerate(dataset[text_column])]


def text_files(folder: Path) -> list[Path]:
    """The text files of ``folder`` and its subfolders (by suffix, :data:`TEXT_SUFFIXES`), in path order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def read_text_file(path: Path) -> str:
    """The text of the document file ``path``: UTF-8 text, the extracted text of a PDF, or the text of an HTML page
    without its markup. ``ValueError`` naming the file when it is binary, another encoding, an encrypted PDF or a PDF
    without text (scanned pages)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return pdf_text(path.read_bytes(), str(path))
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes), not UTF-8 text.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {error.start}).") from None
    return html_text(text, str(path)) if suffix in (".html", ".htm") else text


def pdf_text(data: bytes, name: str) -> str:
    """The text of a PDF (pypdf), page after page; ``ValueError`` naming ``name`` when it cannot be read, is
    encrypted, or has no text (scanned pages are images: run OCR on them first)."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        locked = reader.is_encrypted and not reader.decrypt("")  # an empty user password still opens some
        pages = [] if locked else [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{name}: cannot be read as a PDF ({type(error).__name__}: {error}).") from error
    if locked:
        raise ValueError(f"{name}: the PDF is encrypted; decrypt it first (e.g. qpdf --decrypt).")
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise ValueError(
            f"{name}: the PDF has no text to extract ({len(pages)} page(s)); scanned pages are images, run OCR "
            "on them first."
        )
    return text


class _TextOfHtml(HTMLParser):
    SKIPPED = {"script", "style", "head", "noscript", "template", "svg"}
    BLOCKS = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "section",
        "article",
        "blockquote",
        "dt",
        "dd",
        "table",
        "ul",
        "ol",
        "hr",
        "title",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(markup: str, name: str) -> str:
    """The text of an HTML page: scripts, styles and the head dropped, one line per block, blank runs collapsed.
    ``ValueError`` naming ``name`` when the page has no text."""
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(line for line in lines if line)
    if not text:
        raise ValueError(f"{name}: the page has no text (only markup, scripts or images).")
    return text


def fetch_document(url: str, timeout: float = 30.0) -> tuple[str, str]:
    """``(name, text)`` of a document at an http(s) URL: an HTML page's text, a PDF's text or plain text, by the
    response's content type. ``ValueError`` naming the URL when it cannot be fetched (offline, HTTP error) or has no
    text."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "hfx"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            kind = response.headers.get_content_type()
            charset = response.headers.get_content_charset() or "utf-8"
    except (urllib.error.URLError, OSError) as error:
        raise ValueError(f"{url}: cannot be fetched ({type(error).__name__}: {error}).") from error
    path = url.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "document"
    if kind == "application/pdf" or path.lower().endswith(".pdf"):
        return name, pdf_text(data, url)
    text = data.decode(charset, errors="replace")
    if kind in ("text/html", "application/xhtml+xml") or path.lower().endswith((".html", ".htm")):
        return name, html_text(text, url)
    if kind.startswith("text/"):
        return name, text
    raise ValueError(f"{url}: content type {kind!r} is not a document (text, HTML or PDF).")
