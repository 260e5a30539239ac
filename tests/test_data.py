"""Corpus files, token streams, training windows and document-aligned evaluation rows."""

import numpy as np
import pytest
import torch

from microlm.data import (IGNORE, CorpusError, document_rows, encode_documents, read_corpus, stream_rows,
                          window_batch)
from microlm.tokenizer import EOT, Tokenizer, train_bpe

DOCS = ["Ann is at the park with a red ball.", "Tom goes to the shop.", "Mia takes the cup from Tom."] * 5


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_bpe(train_bpe(EOT.join(DOCS), 300))


def test_stream_puts_an_end_token_before_and_after_every_document(tok):
    stream = encode_documents(tok, DOCS[:2])
    assert stream.tolist() == [tok.eot_id, *tok.encode(DOCS[0]), tok.eot_id, *tok.encode(DOCS[1]), tok.eot_id]


def test_document_rows_score_every_document_token_and_its_end_token_once(tok):
    rows = document_rows(tok, DOCS, context=24)
    scored = rows.targets[rows.targets != IGNORE]
    assert len(scored) == sum(len(tok.encode(d)) + 1 for d in DOCS)
    assert (rows.inputs[:, 0] == tok.eot_id).all()  # every row starts at a document boundary
    assert rows.n_chars == sum(len(d) + 1 for d in DOCS)
    # inputs and targets are the same row shifted by one
    for x, y in zip(rows.inputs, rows.targets):
        n = int((y != IGNORE).sum())
        assert torch.equal(x[1:n], y[: n - 1])


def test_stream_rows_count_an_end_token_as_one_character_and_drop_only_the_tail(tok):
    text = " ".join(DOCS)
    stream = encode_documents(tok, [text])  # <eot> text <eot>: the last target is the end token
    whole = stream_rows(tok, stream, context=len(stream) - 1)  # one window: every target is scored
    assert whole.targets.numel() == len(stream) - 1 and whole.targets[0, -1] == tok.eot_id
    assert whole.n_chars == len(text) + 1  # as document_rows and characters per token count it
    rows = stream_rows(tok, stream, context=10)  # the last (len - 1) % 10 targets are left out
    assert rows.targets.numel() == (len(stream) - 1) // 10 * 10
    assert torch.equal(rows.targets.flatten(), torch.from_numpy(stream[1: rows.targets.numel() + 1]).long())


def test_a_document_longer_than_the_context_is_an_error(tok):
    with pytest.raises(ValueError, match="does not fit the context"):
        document_rows(tok, [" ".join(DOCS)], context=8)


def test_training_windows_depend_only_on_seed_and_step():
    stream = np.arange(1000, dtype=np.int32)
    a, b = window_batch(stream, 4, 16, seed=1, step=7), window_batch(stream, 4, 16, seed=1, step=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a[0], window_batch(stream, 4, 16, seed=1, step=8)[0])


def test_read_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    with pytest.raises(CorpusError, match="blank.txt: the file is empty"):
        read_corpus(blank)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(CorpusError, match=r"latin.txt: not UTF-8 \(byte 5, line 2\)"):
        read_corpus(latin)
