"""BERT example builder: MLM masking statistics (15%, 80/10/10), whole-word masking, NSP 50/50 from other documents,
dynamic (per-epoch) and reproducible masking."""
import torch

from fastllm.data.bert_examples import BertPretrainingData, encode_pairs, make_pairs, mask_tokens

MASK, V = 4, 1000


def _masked(n=400, T=128, cont=None, seed=0):
    ids = torch.randint(10, V, (n, T), generator=torch.Generator().manual_seed(seed))
    special = torch.zeros(T, dtype=torch.bool)
    special[0] = special[-1] = True
    outs, labels = [], []
    for i in range(n):
        o, lab = mask_tokens(ids[i], special, torch.Generator().manual_seed(i), prob=0.15, mask_id=MASK,
                             vocab_size=V, continuation=cont)
        outs.append(o)
        labels.append(lab)
    return ids, torch.stack(outs), torch.stack(labels), special


def test_mlm_masking_statistics():
    ids, out, labels, special = _masked()
    selected = labels != -100
    n_cand = (~special).sum() * len(ids)
    assert abs(selected.sum() / n_cand - 0.15) < 0.01  # 51k candidates: 0.01 is > 6 standard deviations
    assert not selected[:, special].any()
    assert torch.equal(labels[selected], ids[selected])
    as_mask = (out[selected] == MASK).float().mean()
    unchanged = (out[selected] == ids[selected]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015
    assert abs(1 - as_mask - unchanged - 0.1) < 0.015  # random replacement (may hit the same id with p=1/1000)
    assert torch.equal(out[~selected], ids[~selected])


def test_whole_word_masking_masks_all_pieces_together():
    cont = torch.zeros(V, dtype=torch.bool)
    cont[500:] = True  # ids >= 500 are "##" continuation pieces
    ids, _out, labels, _special = _masked(n=200, cont=cont)
    selected = labels != -100
    assert abs(selected.float()[:, 1:-1].mean() - 0.15) < 0.03
    for i in range(len(ids)):
        for t in range(2, ids.shape[1] - 1):
            if cont[ids[i, t]]:  # a continuation piece shares its word's selection
                assert selected[i, t] == selected[i, t - 1]


def _docs(n_docs=200, segs=8):
    # document d holds only token ids in [10 * d + 1000, 10 * d + 1010): the origin of every token is known
    g = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, 10, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) + 1000 + 10 * d)
             .tolist() for _ in range(segs)] for d in range(n_docs)]


def test_nsp_is_balanced_and_random_next_comes_from_other_documents():

    pairs = make_pairs(_docs(600), 64, short_seq_prob=0.1, seed=1)
    labels = torch.tensor([p[2] for p in pairs]).float()
    assert len(pairs) > 600 and abs(labels.mean() - 0.5) < 0.07
    for a, b, random_next in pairs:
        assert len(a) + len(b) <= 61
        doc_a, doc_b = (a[0] - 1000) // 10, (b[0] - 1000) // 10
        assert (doc_a != doc_b) == bool(random_next)


def test_encode_and_dynamic_masking():
    pairs = make_pairs(_docs(20), 32, 0.0, seed=0)
    t = encode_pairs(pairs, 32, cls_id=2, sep_id=3, pad_id=0)
    a, b, _ = pairs[0]
    assert t["input_ids"][0, : len(a) + len(b) + 3].tolist() == [2, *a, 3, *b, 3]
    assert t["token_type_ids"][0, len(a) + 2] == 1 and t["token_type_ids"][0, len(a) + 1] == 0
    data = BertPretrainingData(t, seed=0, prob=0.15, mask_id=MASK, vocab_size=2000)
    e0, e0_again, e1 = data.example(5, 0), data.example(5, 0), data.example(5, 1)
    assert torch.equal(e0["labels"], e0_again["labels"]) and torch.equal(e0["input_ids"], e0_again["input_ids"])
    assert not torch.equal(e0["labels"], e1["labels"])  # a new mask each epoch
    assert (e0["labels"][t["attention_mask"][5] == 0] == -100).all()  # padding never predicted
