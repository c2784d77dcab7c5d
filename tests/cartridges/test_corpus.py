import pytest

from hfx.cartridges.corpus import (
    document_prefix_ids,
    document_prefix_ids_within,
    load_corpus,
    user_turn_ids,
)
from hfx.documents import read_document


def test_named_corpus_and_files(tmp_path, tokenizer):
    name, text = read_document("wine_data")
    assert name == "wine_data" and "Wine" in text
    (tmp_path / "a.md").write_text("# Alpha\nfirst file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    name, text = read_document(tmp_path)
    assert text == "# Alpha\nfirst file\n\nsecond file"
    corpus = load_corpus(tmp_path / "a.md", tokenizer)
    assert corpus.name == "a" and corpus.num_tokens == len(tokenizer("# Alpha\nfirst file")["input_ids"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"  \n\n ", "empty"),
        (b"\x7fELF\x00\x00binary", "binary"),
        (b"caf\xe9 latin-1", "not valid UTF-8"),
    ],
)
def test_bad_documents_are_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_document(path)
    assert str(path) in str(err.value)


def test_missing_path_and_folder_without_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_document(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no .txt/.md/.rst/.py/.pdf/.html/.htm files"):
        read_document(tmp_path)


def test_prompt_pieces_concatenate_to_the_chat_template(tokenizer):
    doc, question = "The answer is 42.", "What is the answer?"
    full = tokenizer.apply_chat_template(
        [
            {
                "role": "system",
                "content": __import__("hfx.cartridges.corpus", fromlist=["x"]).document_system_prompt(doc),
            },
            {"role": "user", "content": question},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    pieces = document_prefix_ids(tokenizer, doc) + user_turn_ids(tokenizer, question, after_system=True)
    assert (
        pieces == tokenizer(full, add_special_tokens=False)["input_ids"]
    )  # the same ids, not just the same text
    alone = user_turn_ids(tokenizer, question, after_system=False)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert alone == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(alone).startswith("<|im_start|>system")  # the template's default system turn


def test_a_document_cut_to_a_token_limit_keeps_the_system_turn_whole(tokenizer):
    _, text = read_document("sklearn_descr")
    full = document_prefix_ids(tokenizer, text)
    assert document_prefix_ids_within(tokenizer, text, len(full)) == (full, False)
    closing = document_prefix_ids(tokenizer, "x")[-4:]  # "</document>" and the end of the turn
    for limit in (64, 300, 1001, 7936):
        ids, cut = document_prefix_ids_within(tokenizer, text, limit)
        assert cut and limit - 8 <= len(ids) <= limit, (limit, len(ids))
        assert ids[:10] == full[:10] and ids[-4:] == closing  # the template's head and tail, the document cut
    with pytest.raises(ValueError, match="cannot hold the document's system turn"):
        document_prefix_ids_within(tokenizer, text, 5)
