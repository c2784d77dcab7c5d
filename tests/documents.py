"""Small PDF files written by hand for the tests: a text PDF, a scanned-like page without text, an encrypted copy."""

from __future__ import annotations

import io


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF of ``objects`` (object 1 is the catalog), with a correct cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def _stream(content: bytes) -> bytes:
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def _page(content: bytes, resources: bytes) -> list[bytes]:
    return [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources "
        + resources
        + b" >>",
        _stream(content),
    ]


def text_pdf(lines: list[str]) -> bytes:
    """One page with ``lines`` in Helvetica, one per line (ASCII)."""

    def literal(line: str) -> bytes:
        return (
            b"("
            + line.encode("ascii").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
            + b")"
        )

    body = b"BT /F1 11 Tf 72 740 Td 14 TL " + b" T* ".join(literal(line) + b" Tj" for line in lines) + b" ET"
    objects = _page(body, b"<< /Font << /F1 5 0 R >> >>")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    return _pdf(objects)


def image_only_pdf() -> bytes:
    """One page that only paints (a filled rectangle, as a scan is only an image): no text to extract."""
    return _pdf(_page(b"0.5 g 72 72 468 648 re f", b"<< >>"))


def encrypted_pdf(pdf: bytes, password: str = "secret") -> bytes:
    """``pdf`` encrypted with a user password (RC4, which pypdf implements itself)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=password, owner_password=password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
