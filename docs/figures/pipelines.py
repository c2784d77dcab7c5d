"""Writes the pipeline figures of the documentation (one SVG per system): `python docs/figures/pipelines.py`."""

from __future__ import annotations

from html import escape
from pathlib import Path

PIPELINES = {
    "cartridges": [
        ("document", "text, PDF, HTML, URL"),
        ("synthesize", "continuations, quotes, self-study chats + teacher top-k"),
        ("train", "CartridgeTrainer: top-k distillation into p KV tokens"),
        ("cartridge", "a PEFT CARTRIDGE adapter"),
        ("evaluate", "no context vs ICL vs cartridge"),
    ],
    "peer-mla": [
        ("tokens", ""),
        ("MLA attention", "latent KV cache, absorbed decode"),
        ("PEER layer", "product-key top-k over up to 1M experts"),
        ("LM head", ""),
    ],
    "quanta": [
        ("losses", "per token"),
        ("filter", "low loss, not induction"),
        ("gradients", "per token, projected"),
        ("similarity", "cosine, in blocks"),
        ("clusters", "spectral + power law"),
        ("page", "browse"),
    ],
    "lens": [
        ("activation", "layer L of a frozen model"),
        ("decoder", "writes k tokens (Gumbel, straight-through)"),
        ("explanation", "k tokens of text"),
        ("encoder", "reads them back"),
        ("reconstruction", "patched in: KL to the model's output"),
    ],
}


def svg(steps: list[tuple[str, str]]) -> str:
    box_w, box_h, gap, pad = 170, 74, 34, 10
    width = pad * 2 + len(steps) * box_w + (len(steps) - 1) * gap
    height = box_h + pad * 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        '<defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="9" refY="5" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    ]
    for i, (title, detail) in enumerate(steps):
        x = pad + i * (box_w + gap)
        parts.append(
            f'<rect x="{x}" y="{pad}" width="{box_w}" height="{box_h}" rx="8" fill="#fff7e6" stroke="#d97706"/>'
        )
        parts.append(
            f'<text x="{x + box_w / 2}" y="{pad + 28}" text-anchor="middle" font-size="15" '
            f'font-weight="bold">{escape(title)}</text>'
        )
        words, lines, line = detail.split(), [], ""
        for word in words:
            if len(line) + len(word) > 24:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:2]):
            parts.append(
                f'<text x="{x + box_w / 2}" y="{pad + 48 + 14 * j}" text-anchor="middle" font-size="11" '
                f'fill="#444">{escape(text)}</text>'
            )
        if i:
            parts.append(
                f'<line x1="{x - gap + 2}" y1="{pad + box_h / 2}" x2="{x - 2}" y2="{pad + box_h / 2}" '
                'stroke="#555" stroke-width="2" marker-end="url(#arrow)"/>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name, steps in PIPELINES.items():
        (here / f"{name}.svg").write_text(svg(steps))
