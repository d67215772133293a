"""annotated_transformer.data: Multi30k loading (shared copy, cache, download), tokenizers, sacreBLEU.

No test touches the network: `_download` is replaced for every test, by default with one that fails
the test if it is called at all."""
import gzip
import os
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import annotated_transformer.data as data

SHARED = (data.shared_data_dir() or Path("no-mirror-set")) / "multi30k"   # conftest names ../shared/data
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared Multi30k copy at {SHARED}")
SPLIT_SIZES = {"train": 29000, "val": 1014, "test": 1000}


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every test: an empty private cache, and a downloader that fails the test if called."""
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_DATA", str(tmp_path / "cache"))

    def refuse(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data, "_download", refuse)


def write_gz(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode("utf-8"), mtime=0))


def copy_split(folder: Path, stem: str = "val") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        shutil.copy(SHARED / f"{stem}.{lang}.gz", folder / f"{stem}.{lang}.gz")
    return folder


# --------------------------------------------------------------------------- loading
@needs_shared
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shared_copies_have_the_published_sizes(split):
    pairs = data.load_multi30k(split)
    assert len(pairs) == SPLIT_SIZES[split]
    assert all(isinstance(de, str) and isinstance(en, str) and de and en for de, en in pairs)
    assert data.locate_multi30k(split) == SHARED


@needs_shared
def test_first_training_pair_is_aligned_and_raw():
    de, en = data.load_multi30k("train")[0]
    assert de == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert en == "Two young, White males are outside near many bushes."


@needs_shared
def test_pinned_checksums_are_those_of_the_shared_copies():
    for name, (sha, lines) in data.MULTI30K_FILES.items():
        assert data.sha256(SHARED / name) == sha, name
        assert len(data.read_lines(SHARED / name)) == lines, name


def test_test_is_the_2016_flickr_split():
    assert data.MULTI30K_SPLITS["test"] == "test_2016_flickr"


def test_fake_root_loads_without_checksum(tmp_path):
    write_gz(tmp_path / "val.de.gz", ["Ein Hund läuft.", "Große Straße"])
    write_gz(tmp_path / "val.en.gz", ["A dog runs.", "Big street"])
    pairs = data.load_multi30k("val", root=tmp_path, verify=False)
    assert pairs == [("Ein Hund läuft.", "A dog runs."), ("Große Straße", "Big street")]


def test_lines_split_on_newline_only(tmp_path):
    # str.splitlines() would cut this German line in two and misalign the pairs.
    write_gz(tmp_path / "val.de.gz", ["eins\u2028zwei", "drei\x85vier"])
    write_gz(tmp_path / "val.en.gz", ["one two", "three four"])
    assert len(data.load_multi30k("val", root=tmp_path, verify=False)) == 2


def test_fake_root_with_checksums_is_refused(tmp_path):
    write_gz(tmp_path / "val.de.gz", ["Ein Hund läuft."])
    write_gz(tmp_path / "val.en.gz", ["A dog runs."])
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val", root=tmp_path, download=False)
    msg = str(err.value)
    assert "SHA-256" in msg and "(1 lines, expected 1014)" in msg
    assert str(tmp_path / "val.de.gz") in msg and str(tmp_path / "val.en.gz") in msg
    assert "root=" in msg


def test_missing_files_name_every_place_looked(tmp_path, monkeypatch):
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(shared))
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_DATA", str(cache))

    def offline(url, dest):
        raise OSError("network is off in this test")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("test")
    msg = str(err.value)
    for folder in (shared / "multi30k", cache / "multi30k"):
        for lang in ("de", "en"):
            assert f"{folder / f'test_2016_flickr.{lang}.gz'}: missing" in msg
    assert "network is off in this test" in msg and data.MULTI30K_URL in msg


def test_explicit_root_is_the_only_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "shared"))
    assert data.multi30k_locations(tmp_path / "mine") == [tmp_path / "mine"]
    assert data.multi30k_locations() == [tmp_path / "shared" / "multi30k", tmp_path / "cache" / "multi30k"]


def test_without_a_mirror_only_the_cache_is_searched(tmp_path, monkeypatch):
    """The package never walks up from its own files to find data: a mirror is named or not used."""
    monkeypatch.delenv("ANNOTATED_TRANSFORMER_SHARED_DATA", raising=False)
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_DATA", str(tmp_path / "cache"))
    assert data.shared_data_dir() is None
    assert data.multi30k_locations() == [tmp_path / "cache" / "multi30k"]
    from annotated_transformer import captions, translation
    assert captions.task2_locations() == [tmp_path / "cache" / "multi30k" / "task2"]
    assert translation.default_checkpoint() == tmp_path / "cache" / "translation" / "model.pt"


@needs_shared
def test_truncated_download_is_reported(tmp_path):
    copy_split(tmp_path)
    raw = (tmp_path / "val.en.gz").read_bytes()
    (tmp_path / "val.en.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val", root=tmp_path, download=False)
    msg = str(err.value)
    assert f"{tmp_path / 'val.en.gz'}: unreadable (EOFError" in msg
    assert "val.de.gz" not in msg  # the intact file is not blamed


@needs_shared
def test_line_count_mismatch_is_reported_even_without_checksums(tmp_path):
    copy_split(tmp_path)
    en = data.read_lines(tmp_path / "val.en.gz")
    write_gz(tmp_path / "val.en.gz", en[:-14])
    with pytest.raises(data.Multi30kError, match="val.de.gz has 1014 lines but val.en.gz has 1000"):
        data.load_multi30k("val", root=tmp_path, verify=False, download=False)


@needs_shared
def test_checksum_mismatch_with_the_right_line_count(tmp_path):
    copy_split(tmp_path)
    en = data.read_lines(tmp_path / "val.en.gz")
    en[5] = en[5].upper()
    write_gz(tmp_path / "val.en.gz", en)
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val", root=tmp_path, download=False)
    assert "SHA-256" in str(err.value) and "(1014 lines, expected 1014)" in str(err.value)
    assert len(data.load_multi30k("val", root=tmp_path, verify=False)) == 1014  # your own data: allowed


@needs_shared
def test_download_into_the_cache_then_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "nothing-here"))
    fetched = []

    cache = tmp_path / "cache" / "multi30k"

    def fake_server(url, dest):  # serves the published files from the shared copy
        fetched.append(url)
        name = url.rsplit("/", 1)[1]
        assert Path(dest).parent == cache and Path(dest).name != name  # a temporary name beside it
        assert not (cache / name).exists()                             # nothing in place before the check
        shutil.copy(SHARED / name, dest)

    monkeypatch.setattr(data, "_download", fake_server)
    pairs = data.load_multi30k("val")
    assert fetched == [f"{data.MULTI30K_URL}/val.de.gz", f"{data.MULTI30K_URL}/val.en.gz"]
    assert len(pairs) == 1014 and data.locate_multi30k("val") == cache
    assert len(fetched) == 2  # the second call used the verified cache
    assert sorted(os.listdir(cache)) == ["val.de.gz", "val.en.gz"]  # no temporary left behind


def test_a_corrupt_download_is_deleted_before_it_is_renamed(tmp_path, monkeypatch):
    """The download goes to a temporary name beside its target and is checked there: a file that fails
    the checksum never reaches its real name, so a later verify=False cannot pick it up."""
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "nothing-here"))
    cache = tmp_path / "cache" / "multi30k"
    written = []

    def rate_limited(url, dest):
        written.append(Path(dest))
        write_gz(Path(dest), ["<html>rate limited</html>"])

    monkeypatch.setattr(data, "_download", rate_limited)
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val")
    msg = str(err.value)
    assert f"{data.MULTI30K_URL}/val.de.gz" in msg and "SHA-256" in msg and "deleted" in msg
    assert written and all(w.parent == cache and w.name not in ("val.de.gz", "val.en.gz") for w in written)
    assert not cache.exists() or sorted(os.listdir(cache)) == []  # neither the file nor a temporary
    with pytest.raises(data.Multi30kError, match="val.de.gz: missing"):
        data.load_multi30k("val", verify=False, download=False)


def test_download_multi30k_checks_before_it_names(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda url, dest: write_gz(Path(dest), ["<html>404</html>"]))
    with pytest.raises(data.Multi30kError, match=r"val\.de\.gz failed the check and was deleted: SHA-256"):
        data.download_multi30k("val", tmp_path / "dl")
    assert os.listdir(tmp_path / "dl") == []


def test_explicit_root_is_never_written(tmp_path, monkeypatch):
    """root= files that fail the checksum are reported, not replaced by a download."""
    write_gz(tmp_path / "mine" / "val.de.gz", ["Ein Hund läuft."])
    write_gz(tmp_path / "mine" / "val.en.gz", ["A dog runs."])
    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    fetched = []

    def server(url, dest):
        fetched.append(url)
        write_gz(Path(dest), ["served"])

    monkeypatch.setattr(data, "_download", server)
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val", root=tmp_path / "mine")
    msg = str(err.value)
    assert str(tmp_path / "mine" / "val.de.gz") in msg and str(tmp_path / "mine" / "val.en.gz") in msg
    assert "root=" in msg and "never written" in msg and str(tmp_path / "cache" / "multi30k") in msg
    assert fetched == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before


def corrupt_deflate(path: Path) -> None:
    """Flip one byte inside the compressed stream of a .gz so that inflating it raises zlib.error."""
    raw = path.read_bytes()
    for offset in range(20, len(raw) - 8):
        bad = bytearray(raw)
        bad[offset] ^= 0xFF
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            path.write_bytes(bytes(bad))
            return
        except Exception:
            continue
    raise AssertionError(f"no flipped byte of {path} makes zlib fail")


def fake_split(folder: Path, n: int = 300):
    write_gz(folder / "val.de.gz", [f"Satz Nummer {i} über {i * 7 % 13} Hunde." for i in range(n)])
    write_gz(folder / "val.en.gz", [f"Sentence number {i} about {i * 7 % 13} dogs." for i in range(n)])


def test_flipped_bytes_are_reported_by_name_and_the_search_moves_on(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "shared"))
    shared, cache = tmp_path / "shared" / "multi30k", tmp_path / "cache" / "multi30k"
    fake_split(shared)
    corrupt_deflate(shared / "val.en.gz")
    with pytest.raises(zlib.error):
        data.read_lines(shared / "val.en.gz")
    with pytest.raises(data.Multi30kError) as err:
        data.load_multi30k("val", verify=False, download=False)
    assert f"{shared / 'val.en.gz'}: unreadable (zlib.error" in str(err.value)
    assert f"{cache / 'val.de.gz'}: missing" in str(err.value)  # it went on to the cache
    fake_split(cache)
    assert data.locate_multi30k("val", verify=False, download=False) == cache
    assert len(data.load_multi30k("val", verify=False, download=False)) == 300


@pytest.mark.parametrize("damage, error", [
    (lambda raw: raw[: len(raw) // 2], "EOFError"),
    (lambda raw: b"\x1f\x8b\x09" + raw[3:], "gzip.BadGzipFile"),          # unknown compression method
    (lambda raw: gzip.compress(b"\xff\xfe caf\xe9\n", mtime=0), "UnicodeDecodeError"),
])
def test_every_decode_error_names_the_file(tmp_path, damage, error):
    fake_split(tmp_path)
    path = tmp_path / "val.de.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(data.Multi30kError, match=re.escape(f"{path}: unreadable ({error}")):
        data.load_multi30k("val", root=tmp_path, verify=False, download=False)


@needs_shared
def test_a_bad_cache_file_is_replaced_by_a_verified_download(tmp_path, monkeypatch):
    """The cache is the package's own folder: a bad file there is replaced, once the download checks out."""
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "nothing-here"))
    cache = tmp_path / "cache" / "multi30k"
    copy_split(cache)
    write_gz(cache / "val.en.gz", ["stale"])
    monkeypatch.setattr(data, "_download", lambda url, dest: shutil.copy(SHARED / url.rsplit("/", 1)[1], dest))
    assert len(data.load_multi30k("val")) == 1014
    assert data.sha256(cache / "val.en.gz") == data.MULTI30K_FILES["val.en.gz"][0]
    assert sorted(os.listdir(cache)) == ["val.de.gz", "val.en.gz"]


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown Multi30k split 'dev'"):
        data.load_multi30k("dev")


# --------------------------------------------------------------------------- tokenizers
GERMAN = ["Ein Hund läuft im Schnee.", "Zwei Mädchen überqueren eine große Straße.", "Die Öfen sind heiß.",
          "Übermäßig schöne Äpfel liegen auf dem Tisch.", "Ein Mann mit einem weißen Hut fährt Fahrrad."]
ENGLISH = ["A dog runs in the snow.", "Two girls cross a big street.", "The ovens are hot.",
           "Exceedingly beautiful apples lie on the table.", "A man in a white hat rides a bike."]
CORPUS = (GERMAN + ENGLISH) * 20


@pytest.fixture(scope="module")
def bpe():
    return data.train_tokenizer(CORPUS, 200, "bpe")


def test_special_token_ids(bpe):
    assert [bpe.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (data.PAD_IDX, data.BOS_IDX, data.EOS_IDX, data.UNK_IDX) == (0, 1, 2, 3)


@pytest.mark.parametrize("model", ["bpe", "unigram", "word"])
def test_roundtrip_of_raw_cased_text_with_umlauts(model):
    tok = data.train_tokenizer(CORPUS, 120, model, min_frequency=1)
    sentences = ["Ein Hund läuft im Schnee.", "Die Öfen sind heiß.", GERMAN[3]]
    ids = data.encode_sentences(tok, sentences)
    assert all(x[-1] == data.EOS_IDX for x in ids)
    assert data.decode_ids(tok, ids) == sentences


def test_subwords_cover_unseen_words_made_of_seen_characters(bpe):
    sentences = ["Übergröße Äste schäumen", "Das Mädchenfahrrad ist weiß."]
    ids = data.encode_sentences(bpe, sentences, eos=False)
    assert data.UNK_IDX not in sum(ids, [])
    assert data.decode_ids(bpe, ids) == sentences


def test_word_level_loses_unseen_words():
    tok = data.train_tokenizer(CORPUS, 100, "word")
    ids = data.encode_sentences(tok, ["Ein Hund schläft."], eos=False)[0]
    assert data.UNK_IDX in ids
    assert data.tokenizer_stats(tok, ["Ein Hund schläft."])["roundtrip"] == 0.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet=sorted(set("".join(CORPUS)) - {" "}), min_size=1, max_size=12), min_size=1, max_size=8))
def test_bpe_roundtrip_property(bpe, words):
    """Any single-spaced text over characters seen in training decodes back exactly."""
    text = " ".join(words)
    assert data.decode_ids(bpe, data.encode_sentences(bpe, [text])) == [text]


def test_unseen_characters_become_unk_and_are_dropped(bpe):
    ids = data.encode_sentences(bpe, ["Hund, Hund!"], eos=False)[0]  # no "," or "!" in the training text
    assert ids.count(data.UNK_IDX) == 2
    assert data.decode_ids(bpe, [ids]) == ["Hund Hund"]


def test_encode_sentences_adds_bos_and_eos(bpe):
    plain = data.encode_sentences(bpe, ["Ein Hund"], eos=False)[0]
    assert data.encode_sentences(bpe, ["Ein Hund"], bos=True)[0] == [data.BOS_IDX] + plain + [data.EOS_IDX]


def test_decode_ids_stops_at_eos_and_drops_padding(bpe):
    rows = data.encode_sentences(bpe, ["Ein Hund läuft.", "Die Öfen"], bos=True)
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [data.PAD_IDX] * (width - len(r)) for r in rows])  # (2, width)
    assert data.decode_ids(bpe, batch) == ["Ein Hund läuft.", "Die Öfen"]
    garbage_after_eos = data.encode_sentences(bpe, ["Ein Hund"])[0] + data.encode_sentences(bpe, ["Öfen"], eos=False)[0]
    assert data.decode_ids(bpe, [garbage_after_eos]) == ["Ein Hund"]


def test_encode_sentences_and_decode_ids_refuse_unbatched_input(bpe):
    with pytest.raises(TypeError, match="list of sentences"):
        data.encode_sentences(bpe, "Ein Hund")
    with pytest.raises(TypeError, match="batch"):
        data.decode_ids(bpe, [5, 6, 7])


def test_bpe_training_is_deterministic():
    assert data.train_tokenizer(CORPUS, 150).to_str() == data.train_tokenizer(CORPUS, 150).to_str()


def test_save_and_load(bpe, tmp_path):
    path = data.save_tokenizer(bpe, tmp_path / "sub" / "tokenizer.json")
    assert path.is_file()
    assert data.load_tokenizer(path).to_str() == bpe.to_str()


def test_load_refuses_foreign_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, trainers

    foreign = Tokenizer(models.BPE(unk_token="[UNK]"))
    foreign.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]", "[PAD]"],
                                                           show_progress=False))
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(ValueError, match="special tokens|must map"):
        data.load_tokenizer(tmp_path / "foreign.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        data.load_tokenizer(tmp_path / "absent.json")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(texts=CORPUS, vocab_size=200, model="wordpiece"), ValueError, "model must be one of"),
    (dict(texts=CORPUS, vocab_size=4), ValueError, "vocab_size must be an int > 4"),
    (dict(texts=[], vocab_size=100), ValueError, "no text"),
    (dict(texts="Ein Hund", vocab_size=100), TypeError, "not one string"),
])
def test_train_tokenizer_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        data.train_tokenizer(**kwargs)


def test_tokenizer_stats(bpe):
    stats = data.tokenizer_stats(bpe, GERMAN)
    assert stats["unk_rate"] == 0.0 and stats["roundtrip"] == 1.0
    n = sum(len(x) for x in data.encode_sentences(bpe, GERMAN, eos=False))
    assert stats["tokens_per_sentence"] == pytest.approx(n / len(GERMAN))


# --------------------------------------------------------------------------- evaluation
def test_bleu_worked_example():
    # clipped precisions 5/6, 3/5, 2/4, 1/3 and equal lengths (BP = 1)
    scores = data.corpus_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)


def test_bleu_brevity_penalty():
    # every n-gram matches, hypothesis 4 tokens, reference 6: BLEU = 100 * exp(1 - 6/4)
    scores = data.corpus_scores(["the cat sat on"], ["the cat sat on the mat"])
    assert scores["bleu"] == pytest.approx(100 * torch.exp(torch.tensor(1 - 6 / 4)).item(), abs=1e-4)


def test_bleu_is_cased_and_detokenized():
    refs = ["A dog runs in the snow ."]
    assert data.corpus_scores(["A dog runs in the snow."], refs)["bleu"] == pytest.approx(100)
    assert data.corpus_scores(["a dog runs in the snow ."], refs)["bleu"] < 100
    assert data.corpus_scores(refs, refs)["chrf"] == pytest.approx(100)


def test_scores_carry_signatures():
    scores = data.corpus_scores(["A dog."], ["A dog."])
    assert "case:mixed" in scores["bleu_signature"] and "tok:13a" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1|case:mixed")


def test_corpus_scores_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        data.corpus_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="detokenized strings"):
        data.corpus_scores([["a", "dog"]], ["a dog"])
    with pytest.raises(TypeError, match="not one string"):
        data.corpus_scores("a dog", "a dog")


def test_trivial_baselines():
    train = [("x", "A dog."), ("y", "A cat."), ("z", "A dog.")]
    out = data.trivial_baselines(["Ein Hund.", "Eine Katze."], train)
    assert out == {"copy source": ["Ein Hund.", "Eine Katze."], "most frequent": ["A dog.", "A dog."]}
