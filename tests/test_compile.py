"""The core compiles whole: no host synchronisation and no data-dependent Python in a training step or a
cached decoding step (a graph break there is a GPU stall and a lost torch.compile/CUDA-graph speed-up).

backend="eager" traces with TorchDynamo exactly as the real backends do, without compiling kernels, so
fullgraph=True fails here on the CPU for any graph break a GPU run would hit.
"""
import torch

from annotated_transformer.decoding import KVCache, decode_step
from annotated_transformer.model import make_masks, make_model
from annotated_transformer.train import LabelSmoothing


def _model(norm_first):
    torch.manual_seed(0)
    return make_model(17, 17, N=2, d_model=32, d_ff=64, h=4, dropout=0.0, norm_first=norm_first)


def _batch():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, 17, (3, 7), generator=g), torch.randint(3, 17, (3, 6), generator=g)
    src[1, 5:] = 0
    tgt[2, 4:] = 0
    return src, tgt


def test_training_step_forward_and_backward_compile_without_a_graph_break():
    for norm_first in (False, True):
        model = _model(norm_first).train()
        criterion = LabelSmoothing(17, 0, 0.1)
        src, tgt = _batch()
        tgt_in, tgt_y = tgt[:, :-1], tgt[:, 1:]
        src_mask, tgt_mask = make_masks(src, tgt_in, 0)

        def loss_fn(src, tgt_in, tgt_y, src_mask, tgt_mask):
            return criterion(model(src, tgt_in, src_mask, tgt_mask), tgt_y)

        compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
        loss = compiled(src, tgt_in, tgt_y, src_mask, tgt_mask)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected = loss_fn(src, tgt_in, tgt_y, src_mask, tgt_mask)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        for got, want in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want)


def test_cached_decoding_step_compiles_without_a_graph_break():
    model = _model(True).eval()
    src, _ = _batch()
    with torch.no_grad():
        src_mask, _ = make_masks(src, None, 0)
        memory = model.encode(src, src_mask)
        step = torch.compile(decode_step, backend="eager", fullgraph=True)
        ours, ref = KVCache(model, memory, capacity=5, static=True), KVCache(model, memory, capacity=5)
        token = torch.ones(3, dtype=torch.long)
        for _ in range(4):
            got, want = step(model, token, ours, src_mask), decode_step(model, token, ref, src_mask)
            torch.testing.assert_close(got, want)
            token = want.argmax(-1)
