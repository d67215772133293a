"""annotated_transformer.translation: batches, checkpoints, decoding, translate() and the command line.

No network and no Multi30k: a tiny model is trained here, in a few seconds, to memorise five sentence
pairs with a tokenizer trained on them; translate() must give those translations back."""
import importlib
import io
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

import pytest
import torch

from annotated_transformer.data import BOS_IDX, EOS_IDX, PAD_IDX, encode_sentences, save_tokenizer, train_tokenizer
from annotated_transformer.train import TrainConfig, fit
import annotated_transformer.translation as translation
from annotated_transformer.translation import (CHECKPOINT_FORMAT, average_states, default_checkpoint, evaluate,
                                               load_translator, make_translator, pad_batch, save_translator,
                                               token_batches, translate, translate_ids, translate_main,
                                               translate_sentences)

ROOT = Path(__file__).resolve().parents[1]
GERMAN = ["Ein Hund läuft im Schnee.", "Zwei Mädchen überqueren eine große Straße.", "Die Öfen sind heiß.",
          "Ein Mann fährt Fahrrad.", "Eine Frau liest ein Buch."]
ENGLISH = ["A dog runs in the snow.", "Two girls cross a big street.", "The ovens are hot.",
           "A man rides a bike.", "A woman reads a book."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, tokenizer, checkpoint path, tokenizer path): a tiny model that has memorised the pairs."""
    torch.manual_seed(0)
    tok = train_tokenizer((GERMAN + ENGLISH) * 10, 150, "bpe", min_frequency=1)
    src, tgt = encode_sentences(tok, GERMAN), encode_sentences(tok, ENGLISH, bos=True)
    model = make_translator(tok.get_vocab_size(), N=1, d_model=64, d_ff=128, h=4, dropout=0.0, max_len=128)
    get_batch = token_batches(src, tgt, max_tokens=1000, seed=0)
    fit(model, get_batch, TrainConfig(steps=250, warmup=20, factor=1.0, smoothing=0.0, log_every=50), progress=False)
    folder = tmp_path_factory.mktemp("translator")
    ckpt = save_translator(folder / "model.pt", model, tok, note="test")
    tok_path = save_tokenizer(tok, folder / "tokenizer.json")
    return model, tok, ckpt, tok_path


# --------------------------------------------------------------------------- batches
def test_pad_batch():
    x = pad_batch([[5, 6, 2], [7, 2]])
    assert x.dtype == torch.long and x.tolist() == [[5, 6, 2], [7, 2, PAD_IDX]]
    with pytest.raises(ValueError, match="at least one row"):
        pad_batch([])


def lengths_data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ls = torch.randint(2, 30, (n,), generator=g).tolist()
    src = [[3 + i % 50] * (n_ - 1) + [EOS_IDX] for i, n_ in enumerate(ls)]
    tgt = [[BOS_IDX] + [4] * max(n_ - 3, 1) + [EOS_IDX] for n_ in ls]
    return src, tgt


def test_token_batches_cover_every_pair_once_per_epoch_within_budget():
    src, tgt = lengths_data()
    get_batch = token_batches(src, tgt, max_tokens=120, seed=3)
    for epoch in range(2):
        seen = []
        for k in range(epoch * get_batch.per_epoch, (epoch + 1) * get_batch.per_epoch):
            b = get_batch(k, 0)
            assert b.src.numel() <= 120 and b.tgt.numel() <= 120
            seen += [tuple(r[r != PAD_IDX].tolist()) for r in b.src]
        assert sorted(seen) == sorted(tuple(s) for s in src)


def test_token_batches_are_a_function_of_the_step():
    src, tgt = lengths_data()
    a, b = token_batches(src, tgt, 120, seed=1), token_batches(src, tgt, 120, seed=1)
    late = 3 * a.per_epoch + 2
    assert torch.equal(a(late, 0).src, b(late, 0).src)      # b jumps straight to a later epoch
    assert torch.equal(a(1, 0).tgt, b(1, 0).tgt)              # and back
    firsts = [a(e * a.per_epoch, 0).src for e in range(4)]
    assert any(not torch.equal(firsts[0], f) for f in firsts[1:])  # epochs are shuffled differently


def test_token_batches_accumulation_uses_distinct_batches():
    src, tgt = lengths_data()
    plain, accum = token_batches(src, tgt, 120, seed=0), token_batches(src, tgt, 120, seed=0, accum=2)
    assert torch.equal(accum(1, 0).src, plain(2, 0).src) and torch.equal(accum(1, 1).src, plain(3, 0).src)


def test_token_batches_teacher_forcing_shift():
    b = token_batches([[5, 6, EOS_IDX]], [[BOS_IDX, 7, 8, EOS_IDX]], 100)(0, 0)
    assert b.tgt_in.tolist() == [[BOS_IDX, 7, 8]] and b.tgt_y.tolist() == [[7, 8, EOS_IDX]] and b.ntokens == 3


def test_token_batches_errors():
    with pytest.raises(ValueError, match="2 source rows but 1 target rows"):
        token_batches([[5, 2], [6, 2]], [[1, 5, 2]], 100)
    with pytest.raises(ValueError, match="at least one sentence pair"):
        token_batches([], [], 100)
    with pytest.raises(ValueError, match="max_tokens=3"):
        token_batches([[5, 6, 7, 2]], [[1, 5, 2]], 3)


# --------------------------------------------------------------------------- model and checkpoints
def test_make_translator_shares_one_matrix():
    m = make_translator(50, N=1, d_model=16, d_ff=32, h=2)
    assert m.src_embed.lut.weight is m.tgt_embed.lut.weight is m.generator.proj.weight
    assert m.config["share_embeddings"] and m.config["tie_output"]


def test_average_states_is_the_elementwise_mean():
    torch.manual_seed(0)
    models = [make_translator(30, N=1, d_model=16, d_ff=32, h=2) for _ in range(3)]
    states = [m.state_dict() for m in models]
    avg = average_states(states)
    assert list(avg) == list(states[-1])
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(st[k] for st in states) / 3)
    one = average_states(states[:1])
    assert all(torch.equal(one[k], states[0][k]) for k in one)
    merged = make_translator(30, N=1, d_model=16, d_ff=32, h=2)
    merged.load_state_dict(avg)  # shared embedding: three keys, one matrix, one mean
    assert torch.equal(merged.generator.proj.weight, avg["generator.proj.weight"])


def test_average_states_keeps_dtype_and_non_float_tensors():
    a = {"w": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([1])}
    b = {"w": torch.full((2,), 3.0, dtype=torch.bfloat16), "n": torch.tensor([7])}
    out = average_states([a, b])
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 2.0]
    assert out["n"].tolist() == [7]


def test_average_states_refuses_other_models():
    with pytest.raises(ValueError, match="at least one"):
        average_states([])
    a = make_translator(30, N=1, d_model=16, d_ff=32, h=2).state_dict()
    with pytest.raises(ValueError, match="other entries"):
        average_states([a, make_translator(30, N=2, d_model=16, d_ff=32, h=2).state_dict()])
    with pytest.raises(ValueError, match="shape"):
        average_states([a, make_translator(40, N=1, d_model=16, d_ff=32, h=2).state_dict()])


def test_the_tiny_model_memorised_its_pairs(trained):
    model, tok, _, _ = trained
    assert translate_sentences(model, tok, GERMAN, beam_size=1) == ENGLISH
    assert translate_sentences(model, tok, GERMAN, beam_size=3) == ENGLISH
    scores = evaluate(model, tok, list(zip(GERMAN, ENGLISH)), beam_size=2)
    assert scores["hypotheses"] == ENGLISH and scores["bleu"] == pytest.approx(100)


def test_translate_round_trip_from_files(trained):
    _, _, ckpt, tok_path = trained
    assert translate(GERMAN[::-1], checkpoint=ckpt, tokenizer=tok_path) == ENGLISH[::-1]
    assert translate(GERMAN[:2], checkpoint=ckpt, beam_size=1) == ENGLISH[:2]  # the tokenizer stored in it
    assert translate([], checkpoint=ckpt) == []


def test_load_translator_restores_the_same_weights(trained):
    model, tok, ckpt, _ = trained
    loaded, loaded_tok = load_translator(ckpt)
    assert not loaded.training and loaded_tok.to_str() == tok.to_str()
    assert loaded.src_embed.lut.weight is loaded.generator.proj.weight  # tying survives the round trip
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["meta"] == {"note": "test"}


def test_batched_decoding_keeps_the_input_order(trained):
    model, tok, _, _ = trained
    src = encode_sentences(tok, GERMAN)
    one_batch = translate_ids(model, src, beam_size=1)
    tiny_batches = translate_ids(model, src, beam_size=1, max_tokens=1)  # one sentence per batch
    assert one_batch == tiny_batches
    assert all(ids[0] == BOS_IDX and ids[-1] == EOS_IDX and PAD_IDX not in ids for ids in one_batch)


def test_translate_ids_errors(trained):
    model, tok, _, _ = trained
    with pytest.raises(ValueError, match="source 1 is empty"):
        translate_ids(model, [[5, EOS_IDX], []])
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        translate_ids(model, [[5, EOS_IDX]], beam_size=0)
    with pytest.raises(TypeError, match="list of sentences"):
        translate_sentences(model, tok, "Ein Hund.")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no translation checkpoint at {tmp_path / 'absent.pt'}"):
        translate(["Ein Hund."], checkpoint=tmp_path / "absent.pt")


def test_missing_tokenizer_names_the_path(trained, tmp_path):
    model, _, _, _ = trained
    bare = save_translator(tmp_path / "bare.pt", model)  # no tokenizer stored, none beside it
    with pytest.raises(FileNotFoundError, match=f"there is no {tmp_path / 'tokenizer.json'}"):
        load_translator(bare)
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        load_translator(bare, tokenizer=tmp_path / "nope.json")


def test_tokenizer_beside_the_checkpoint_is_used(trained, tmp_path):
    model, tok, _, _ = trained
    bare = save_translator(tmp_path / "bare.pt", model)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert translate(GERMAN[:1], checkpoint=bare, beam_size=1) == ENGLISH[:1]


def test_foreign_or_broken_files_are_refused(trained, tmp_path):
    _, _, ckpt, _ = trained
    other = train_tokenizer(ENGLISH * 5, 60, "bpe", min_frequency=1)
    other_path = save_tokenizer(other, tmp_path / "other.json")
    with pytest.raises(ValueError, match="do not belong together"):
        load_translator(ckpt, tokenizer=other_path)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_translator(tmp_path / "foreign.pt")
    raw = Path(ckpt).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cannot read the checkpoint .*truncated.pt"):
        load_translator(tmp_path / "truncated.pt")


def damaged_copy(ckpt, tmp_path, edit, name="damaged.pt"):
    """A copy of the checkpoint with edit(state) applied."""
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / name)
    return tmp_path / name


def _set(d, key, value):
    d[key] = value


@pytest.mark.parametrize("edit, field", [
    (lambda st: _set(st, "tokenizer", '{"version": "1.0", "model": {"type": "BPE", "vocab": '), "tokenizer"),
    (lambda st: _set(st, "tokenizer", 42), "tokenizer"),
    (lambda st: st["config"].pop("d_model"), "d_model"),
    (lambda st: st["config"].pop("src_vocab"), "src_vocab"),
    (lambda st: _set(st["config"], "colour", "red"), "colour"),
    (lambda st: _set(st["config"], "N", "1"), "N"),
    (lambda st: _set(st["config"], "norm_first", 1), "norm_first"),
    (lambda st: _set(st["config"], "activation", "tanh"), "activation"),
    (lambda st: _set(st, "config", ["not", "a", "dict"]), "config"),
    (lambda st: st.pop("config"), "config"),
    (lambda st: st.pop("model"), "model"),
    (lambda st: st["model"].pop("generator.proj.bias"), "model"),
    (lambda st: _set(st["config"], "N", 2), "model"),  # a config that does not fit the weights
])
def test_a_damaged_checkpoint_raises_one_clear_error(trained, tmp_path, capsys, edit, field):
    _, _, ckpt, _ = trained
    bad = damaged_copy(ckpt, tmp_path, edit)
    with pytest.raises(translation.CheckpointError) as err:
        load_translator(bad)
    assert isinstance(err.value, ValueError)
    assert str(bad) in str(err.value) and field in str(err.value), str(err.value)
    assert translate_main(["--checkpoint", str(bad), "Ein Hund."]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}")


def test_a_bad_device_is_reported_as_a_device(trained, capsys):
    _, _, ckpt, _ = trained
    with pytest.raises(ValueError, match="unknown device 'tpu'") as err:
        load_translator(ckpt, device="tpu")
    assert "cannot read" not in str(err.value)
    assert translate_main(["--checkpoint", str(ckpt), "--device", "tpu", "Ein Hund."]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_sentences_that_are_not_strings_are_named(trained):
    model, tok, ckpt, _ = trained
    with pytest.raises(TypeError, match=r"sentences must be a list .*NoneType"):
        translate(None, checkpoint=ckpt)
    with pytest.raises(TypeError, match=r"sentences\[0\] must be a str, got NoneType"):
        translate([None], checkpoint=ckpt)
    with pytest.raises(TypeError, match=r"sentences\[1\] must be a str, got int"):
        translate_sentences(model, tok, ["Ein Hund.", 7])
    with pytest.raises(TypeError, match=r"sentences\[2\] must be a str, got NoneType"):
        translate_sentences(model, tok, ["Ein Hund.", "", None])


# Top level, so that a 'spawn' child process can import it.
def _save_many(path: str, tokenizer_json: str, worker: int, times: int, start) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    torch.manual_seed(worker)
    model = make_translator(tok.get_vocab_size(), N=2, d_model=128, d_ff=1024, h=2)
    start.wait(timeout=120)  # both processes save at the same time
    for i in range(times):
        save_translator(path, model, tok, worker=worker, i=i)


def test_concurrent_saves_to_one_path(trained, tmp_path):
    """Two processes saving to one path: every save succeeds, the last file is whole, no temporary is left."""
    _, tok, _, _ = trained
    path = tmp_path / "model.pt"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_save_many, args=(str(path), tok.to_str(), w, 20, start)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    model, loaded_tok = load_translator(path)
    assert loaded_tok.to_str() == tok.to_str() and model.config["d_model"] == 128
    assert torch.load(path, weights_only=True)["meta"]["i"] == 19


def test_a_failed_save_leaves_the_old_file_and_no_temporary(trained, tmp_path, monkeypatch):
    model, tok, _, _ = trained
    path = save_translator(tmp_path / "model.pt", model, tok, version=1)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
        else:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_translator(path, model, tok, version=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    assert path.read_bytes() == before
    assert load_translator(path)[0] is not None


def test_save_needs_a_configured_model(tmp_path):
    with pytest.raises(ValueError, match="no .config"):
        save_translator(tmp_path / "x.pt", torch.nn.Linear(2, 2))


def test_default_checkpoint_is_in_the_data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_DATA", str(tmp_path))
    assert default_checkpoint() == tmp_path / "translation" / "model.pt"


# --------------------------------------------------------------------------- command line
def test_main_translates_arguments_and_stdin(trained, capsys, monkeypatch):
    _, _, ckpt, tok_path = trained
    assert translate_main(["--checkpoint", str(ckpt), "--tokenizer", str(tok_path), "--beam", "1", GERMAN[0], GERMAN[3]]) == 0
    assert capsys.readouterr().out.splitlines() == [ENGLISH[0], ENGLISH[3]]
    monkeypatch.setattr(sys, "stdin", io.StringIO(GERMAN[1] + "\n" + GERMAN[2] + "\n"))
    assert translate_main(["--checkpoint", str(ckpt)]) == 0
    assert capsys.readouterr().out.splitlines() == [ENGLISH[1], ENGLISH[2]]


def test_blank_stdin_lines_keep_their_place(trained, capsys, monkeypatch):
    """One output line per input line: a blank line in gives a blank line out, so line i still answers line i."""
    _, _, ckpt, _ = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{GERMAN[1]}\n\n   \n{GERMAN[2]}\n\n"))
    assert translate_main(["--checkpoint", str(ckpt), "--beam", "1"]) == 0
    assert capsys.readouterr().out.split("\n") == [ENGLISH[1], "", "", ENGLISH[2], "", ""]


def test_blank_sentences_are_not_run_through_the_model(trained, monkeypatch):
    model, tok, _, _ = trained
    seen = []

    def spy(model, src, **kwargs):
        seen.append(len(src))
        return translate_ids(model, src, **kwargs)

    monkeypatch.setattr(translation, "translate_ids", spy)
    assert translate_sentences(model, tok, ["", GERMAN[0], " \t", GERMAN[3]], beam_size=1) == ["", ENGLISH[0], "", ENGLISH[3]]
    assert seen == [2]
    assert translate_sentences(model, tok, ["", "  "]) == ["", ""] and seen == [2]


def test_main_reports_a_missing_checkpoint(tmp_path, capsys):
    assert translate_main(["--checkpoint", str(tmp_path / "absent.pt"), "Ein Hund."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no translation checkpoint at") and str(tmp_path / "absent.pt") in err


def test_python_dash_m_runs(trained):
    _, _, ckpt, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "annotated_transformer.translation", "--checkpoint", str(ckpt),
                           "--beam", "2", GERMAN[4]], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ENGLISH[4]
    done = subprocess.run([sys.executable, "-m", "annotated_transformer.translation", "--checkpoint", "absent.pt", "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "no translation checkpoint at absent.pt" in done.stderr


def test_module_and_function_names():
    """`annotated_transformer.translation` is the module (`python -m annotated_transformer.translation`);
    `annotated_transformer.translate` is the function, one meaning per name; `python -m` prints no runpy
    warning."""
    import annotated_transformer

    module = importlib.import_module("annotated_transformer.translation")
    assert annotated_transformer.translate is module.translate and callable(module.translate_main)
    assert annotated_transformer.translation is module
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "annotated_transformer.translation",
                           "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
    assert "usage: python -m annotated_transformer.translation" in done.stdout


# Runs `python -m annotated_transformer.translation` as if the `tokenizers` package were not installed.
NO_TOKENIZERS = ("import runpy, sys; sys.modules['tokenizers'] = None; sys.argv[0] = 'translation'; "
                 "runpy.run_module('annotated_transformer.translation', run_name='__main__', alter_sys=True)")


def test_without_tokenizers_the_cli_names_the_extra(trained, tmp_path):
    _, _, ckpt, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NO_TOKENIZERS, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "--checkpoint" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-c", NO_TOKENIZERS, "--checkpoint", str(ckpt), "Ein Hund."],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "pip install 'annotated-transformer[translate]'" in done.stderr


def test_without_tokenizers_load_translator_names_the_extra(trained, monkeypatch):
    _, _, ckpt, _ = trained
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModuleNotFoundError, match=r"annotated-transformer\[translate\]"):
        load_translator(ckpt)


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_translate_extra_is_lean_and_part_of_notebooks():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["translate"]) == ["sacrebleu>=2.4", "tokenizers>=0.15"]
    assert any(r.startswith("annotated-transformer[") and "translate" in r for r in extras["notebooks"])
