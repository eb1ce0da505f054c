import json

import numpy as np
import pytest

from pipeline.data import corpora
from pipeline.data.corpora import Document, documents, normalized, split_of
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
    assert all(split_of(d.text) == "eval" for d in documents(name, "eval"))


@pytest.mark.parametrize("name, files, distinct", [("bbc", 2225, 2055), ("sotu", 249, 249), ("wiki", 10033, 10033),
                                                   ("shakespeare", 803, 803), ("mix", 13310, 13140)])
def test_bundled_corpora_are_deduplicated_by_content_and_no_eval_text_is_in_train(name, files, distinct):
    train = [normalized(d.text) for d in documents(name, "train")]
    evaluation = [normalized(d.text) for d in documents(name, "eval")]
    assert len(corpora.BUNDLED[name][1]()) == files
    assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
    assert len(train) + len(evaluation) == distinct
    # no eval document is a training document, nor inside one (a prefix of 200 characters)
    all_train = "\n".join(train)
    assert not [t for t in evaluation if t[:200] in all_train]


def test_no_eval_text_occurs_in_a_training_store(data_dir):
    from pipeline.data.harvest import HarvestConfig, harvest
    from pipeline.data.store import HarvestStore

    cfg = HarvestConfig(lm="tiny-llama", data="bbc", ctx=128, chunk_rows=1270, layers=(0,), tokens=12_700,
                        data_dir=data_dir)
    harvest(cfg, progress=False)
    store = HarvestStore.open(cfg.location)
    text = byte_tokenizer().decode(np.asarray(store.group["tokens"][:]).tolist())
    train_docs = [normalized(d.text) for _, d in zip(range(3), documents("bbc", "train"))]
    assert train_docs[1][:200] in normalized(text)  # the check would see a document if it were there
    assert not [d.key for d in documents("bbc", "eval") if normalized(d.text)[:200] in normalized(text)]


def test_bbc_reads_the_non_utf8_file_and_prefix_mixes_topics():
    docs = list(documents("bbc", "train"))
    assert len(docs) > 1900
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


def test_duplicates_and_near_duplicates_are_kept_once(tmp_path):
    story = " ".join(f"word{i}" for i in range(200))
    lines = [{"text": f"document number {i}"} for i in range(300)]
    lines += [{"text": "document   number\n 7"}, {"text": "document number 8 "}]  # twins up to whitespace
    lines += [{"text": "Headline " + story}, {"text": "New headline " + story.replace("word50 ", "edited ")}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    texts = [d.text for s in corpora.SPLITS for d in documents(str(tmp_path / "d.jsonl"), s)]
    assert len(texts) == 301 and "document number 7" in texts and "Headline " + story in texts


def test_one_document_is_split_by_position(tmp_path):
    lines = [f"line {i} of the only document" for i in range(100)]
    (tmp_path / "one.txt").write_text("\n".join(lines))
    (train,) = documents(str(tmp_path / "one.txt"), "train")
    (held_out,) = documents(str(tmp_path / "one.txt"), "eval")
    assert train.text.splitlines() == lines[:95] and held_out.text.splitlines() == lines[95:]


@pytest.mark.parametrize("case", ["no_field", "malformed", "not_text", "binary", "parquet_column"])
def test_bad_local_corpus_gives_one_clear_line(tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / ("d.parquet" if case == "parquet_column" else "d.txt" if case == "binary" else "d.jsonl")
    good = json.dumps({"text": "fine"}) + "\n"
    if case == "no_field":
        path.write_text(good + json.dumps({"body": "x", "id": 1}) + "\n")
        expect = f"DATA file {path} line 2 has no field 'text' (it has: body, id); name the text field with"
    elif case == "malformed":
        path.write_text(good + '{"text": "unterminated\n')
        expect = f"DATA file {path} line 2 is not valid JSON"
    elif case == "not_text":
        path.write_text(json.dumps({"text": 3}) + "\n")
        expect = "field 'text' is int, not text"
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 8)
        expect = f"DATA file {path} is binary, not text"
    else:
        pq.write_table(pa.table({"body": ["a", "b"]}), path)
        expect = f"DATA file {path} has no column 'text' (it has: body)"
    with pytest.raises(UserError) as err:
        list(documents(str(path), "train"))
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_windows_1252_text_is_read_as_text(tmp_path):
    (tmp_path / "a.txt").write_bytes("caf\u00e9 \u2014 na\u00efve\n".encode("cp1252") * 50)
    (tmp_path / "b.txt").write_text("another document")
    texts = [d.text for s in corpora.SPLITS for d in documents(str(tmp_path), s)]
    assert any(t.startswith("café — naïve") for t in texts)
