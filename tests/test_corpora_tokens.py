import json

import numpy as np
import pytest

from pipeline.data import corpora
from pipeline.data.corpora import Document, documents, split_of
from pipeline.core.errors import UserError
from pipeline.data.models import byte_tokenizer
from pipeline.data.tokens import pack


@pytest.mark.parametrize("name", ["bbc", "sotu", "wiki", "shakespeare"])
def test_bundled_corpus_split_is_disjoint_deterministic_and_complete(name):
    train = [d.key for d in documents(name, "train")]
    again = [d.key for d in documents(name, "train")]
    evaluation = [d.key for d in documents(name, "eval")]
    assert train == again
    assert not set(train) & set(evaluation)
    assert len(evaluation) > 0 and len(train) > 10 * len(evaluation)
    assert all(split_of(k) == "eval" for k in evaluation)


def test_bbc_reads_the_non_utf8_file_and_prefix_mixes_topics():
    docs = list(documents("bbc", "train"))
    assert len(docs) > 2000
    assert not any("\ufffd" in d.text for d in docs[:50])
    topics = {d.key.split("/")[1] for d in docs[:40]}
    assert len(topics) >= 4  # hash order, not directory order


def test_mix_prefix_holds_every_bundled_corpus():
    first = [d.key.split("/")[0] for _, d in zip(range(40), documents("mix", "train"))]
    assert set(first) == {"bbc", "sotu", "wiki", "shakespeare"}


def test_local_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"line {i}"}) + "\n")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(200)]}), tmp_path / "c.parquet")
    keys = [d.key for s in corpora.SPLITS for d in documents(str(tmp_path), s)]
    assert len(keys) == 401
    texts = {d.text for d in documents(str(tmp_path / "b.jsonl"), "train")}
    assert texts and texts <= {f"line {i}" for i in range(200)}


def test_unknown_corpus_and_offline_hub_fail_fast(monkeypatch):
    with pytest.raises(UserError, match="unknown DATA"):
        list(documents("no_such_corpus", "train"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable"):
        list(documents("someone/some-dataset", "train"))


def test_pack_windows_start_with_bos_and_grow_as_a_prefix():
    tok = byte_tokenizer()
    docs = [Document(f"d{i}", "abc " * (i + 1)) for i in range(30)]
    small = pack(tok, docs, ctx=8, bos_id=1, separator_id=0, n_rows=20)
    big = pack(tok, docs, ctx=8, bos_id=1, separator_id=0, n_rows=200)
    assert small.ids.shape == (3, 8) and small.n_rows == 21  # rounded up to whole windows
    assert (big.ids[:, 0] == 1).all() and (big.doc[:, 0] == -1).all()
    np.testing.assert_array_equal(big.ids[:3], small.ids)
    tokens, doc, pos = big.rows()
    assert len(tokens) == big.n_rows and set(pos) == set(range(1, 8))
    # each document is followed by one separator that belongs to it
    stream = big.ids[:, 1:].reshape(-1)
    first_doc = tok("abc ", add_special_tokens=False)["input_ids"] + [0]
    assert stream[: len(first_doc)].tolist() == first_doc
    assert (np.diff(doc) >= 0).all()


def test_pack_refuses_more_tokens_than_the_split_has():
    tok = byte_tokenizer()
    with pytest.raises(UserError, match="TOKENS=100000 is larger than"):
        pack(tok, [Document("a", "tiny text")], ctx=8, bos_id=1, separator_id=0, n_rows=100_000)
