"""A preset named after a paper runs that paper's released rule, as a recorded parameter: Leopart's community
detection merges every isolated cluster into one label and sends unmatched labels to background; MaskDistill's
`original` builds its CLS map from the raw q·k logits (facet `attn_logits`, checked against the block's weights)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from stores import PlantedDataset
from test_leopart_cd import CLASSES, _planted

from ssl_segbench.backbones import BackboneRef
from ssl_segbench.protocols import Context, get_protocol
from ssl_segbench.transforms import Transform


def _ctx(fs, seeds):
    return Context(eval_set=PlantedDataset(CLASSES, 12), train_set=None, features=lambda ds, facets: fs, seeds=seeds)


def _brute_force(conf: np.ndarray, unmatched_to: int | None) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of the one-to-one label → class assignment minimising summed 1 − IoU, found by trying
    every assignment; labels left over go to class `unmatched_to`, or count as wrong when None."""
    c, k = conf.shape
    best, best_cost = None, None
    for classes in itertools.permutations(range(c), min(c, k)):
        for labels in itertools.permutations(range(k), min(c, k)):
            cost = 0.0
            for cl, lab in zip(classes, labels):
                union = conf[cl].sum() + conf[:, lab].sum() - conf[cl, lab]
                cost += 1 - (conf[cl, lab] / union if union else 0)
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = dict(zip(labels, classes)), cost
    mapping = [best.get(lab, unmatched_to) for lab in range(k)]
    ious, correct = [], 0
    for cl in range(c):
        cols = [lab for lab, m in enumerate(mapping) if m == cl]
        tp = conf[cl, cols].sum()
        fp = conf[:, cols].sum() - tp
        fn = conf[cl].sum() - tp
        correct += tp
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return float(np.mean(ious)), float(correct / conf.sum())


def test_leopart_preset_follows_the_released_code():
    p = get_protocol("leopart-cd:leopart").params
    assert (p["isolated_clusters"], p["unmatched"], p["background_class"]) == ("shared-label", "background", 0)
    q = get_protocol("leopart-cd").params
    assert (q["isolated_clusters"], q["unmatched"]) == ("own-label", "wrong")


def test_unmatched_labels_to_background_versus_wrong(tmp_path):
    """Five foreground clusters and no edges: 6 merged labels for 4 classes, so two labels stay unmatched. Both rules
    are scored from the same label confusion and checked against a brute-force assignment."""
    fs = _planted(tmp_path)
    common = dict(k=5, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8, eval_size=None)
    wrong = get_protocol("leopart-cd", **common).run(_ctx(fs, [0]))
    background = get_protocol("leopart-cd", unmatched="background", **common).run(_ctx(fs, [0]))
    conf = np.asarray(wrong.confusions[0])
    assert conf.shape == (4, 6) and np.array_equal(conf, np.asarray(background.confusions[0]))
    for res, to in ((wrong, None), (background, 0)):
        miou, acc = _brute_force(conf, to)
        assert res.per_seed[0]["miou"] == pytest.approx(miou) and res.per_seed[0]["pixel_acc"] == \
            pytest.approx(acc)
    # the unmatched labels hold object pixels: as background they also become background's false positives
    assert background.per_seed[0]["miou"] < wrong.per_seed[0]["miou"] - 0.01
    assert -1 in wrong.per_seed[0]["cluster_to_class"] and -1 not in background.per_seed[0]["cluster_to_class"]


def test_isolated_clusters_share_one_label_under_leopart_rule(tmp_path):
    fs = _planted(tmp_path)
    common = dict(k=3, markov_time=1.0, weight_threshold=2.0, cbfe_k=8, pca_dim=8, eval_size=None)
    own = get_protocol("leopart-cd", **common).run(_ctx(fs, [0]))
    shared = get_protocol("leopart-cd", isolated_clusters="shared-label", **common).run(_ctx(fs, [0]))
    assert own.info["graph"]["edges"] == 0
    assert own.per_seed[0]["merged_labels"] == 4 and own.per_seed[0]["miou"] == 1.0
    assert shared.per_seed[0]["merged_labels"] == 1  # every cluster isolated: one label for the whole image
    assert shared.per_seed[0]["merged_label_of_cluster"] == [0, 0, 0, 0]
    assert shared.per_seed[0]["miou"] < 0.5


# --- MaskDistill: raw CLS logits ------------------------------------------------------------------------------------

def _brute_force_cls_logits(block_qkv_out: torch.Tensor, heads: int, scale: float, n_prefix: int) -> torch.Tensor:
    """(B, N, 3D) fused qkv output → (B, heads, N − prefix) q_cls · k_j · scale, head by head with explicit loops."""
    b, n, three_d = block_qkv_out.shape
    d = three_d // 3
    hd = d // heads
    q, k = block_qkv_out[..., :d], block_qkv_out[..., d: 2 * d]
    out = torch.zeros(b, heads, n - n_prefix)
    for bi in range(b):
        for h in range(heads):
            for j in range(n_prefix, n):
                out[bi, h, j - n_prefix] = (q[bi, 0, h * hd:(h + 1) * hd] * k[bi, j, h * hd:(h + 1) * hd]).sum() * scale
    return out


def test_attn_logits_facet_equals_q_dot_k_from_the_blocks_own_weights():
    backbone = BackboneRef("random_vits16").load("cpu")
    x = torch.randn(2, 3, 32, 48)
    captured = {}
    attn = backbone.model.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o.detach()))
    with torch.inference_mode():
        out = backbone(x, -1, ("attn", "attn_logits"))
    hook.remove()
    expected = _brute_force_cls_logits(captured["qkv"], attn.num_heads, attn.scale, 1).reshape(2, attn.num_heads, 2, 3)
    torch.testing.assert_close(out["attn_logits"], expected, rtol=1e-4, atol=1e-5)
    # softmax over all keys (the CLS key included) of the full logits row is the `attn` facet
    assert not torch.allclose(out["attn"], out["attn_logits"].softmax(-1))  # the patches alone do not sum to 1
    assert (out["attn"].flatten(2).sum(-1) < 1).all()


def test_maskdistill_original_reads_the_raw_logits():
    assert get_protocol("maskdistill:original").params["cls_map"] == "raw-logits"
    assert get_protocol("maskdistill").params["cls_map"] == "softmax"
    asked = []

    class Stop(Exception):
        pass

    def features(ds, facets):
        asked.append(facets)
        raise Stop

    for spec, facet in (("maskdistill:original", "attn_logits"), ("maskdistill", "attn")):
        ctx = Context(eval_set=PlantedDataset(("bg", "obj"), 2), train_set=None, features=features, seeds=[0],
                      transform=Transform("pad", 32, 16))
        with pytest.raises(Stop):
            get_protocol(spec).run(ctx)
        assert asked[-1][0] == facet
