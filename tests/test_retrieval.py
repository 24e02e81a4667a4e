"""`retrieval`: predictions equal a brute-force reference; memory sampling follows the reference's rule; bounded
memory, ignore handling, batching and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stores import PlantedDataset, feature_set

from ssl_segbench.cli import main
from ssl_segbench.data import get_dataset
from ssl_segbench.errors import SegbenchError
from ssl_segbench.knn import exact_search, merge_topk
from ssl_segbench.metrics import confusion
from ssl_segbench.protocols import Context, ProtocolError, get_protocol
from ssl_segbench.protocols.retrieval import patch_distributions, select_patches
from ssl_segbench.records import iter_records

C, PATCH, DIM = 3, 4, 8


def _images(n: int, seed: int, grid=(5, 6)):
    """Tokens near one of C class centres (mixed near class edges), labels 4× the grid with class edges inside
    patches and a few ignore pixels, so patches carry mixed distributions."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(C, DIM)).astype(np.float32)
    tokens, labels = [], []
    h, w = grid
    for _ in range(n):
        lab = np.zeros((h * PATCH, w * PATCH), np.int64)
        cut_r, cut_c = rng.integers(3, h * PATCH - 3), rng.integers(3, w * PATCH - 3)
        lab[cut_r:] = 1
        lab[:, cut_c:] = 2
        lab[rng.random(lab.shape) < 0.05] = 255
        frac = np.stack([np.mean(lab.reshape(h, PATCH, w, PATCH).transpose(0, 2, 1, 3).reshape(h, w, -1) == c,
                                 axis=-1) for c in range(C)], -1)
        tokens.append((frac @ centres + 0.3 * rng.normal(size=(h, w, DIM))).astype(np.float32))
        labels.append(lab)
    return tokens, labels


def _ctx(tmp_path, seeds=(0,), n_train=12, n_eval=5):
    tr, ev = _images(n_train, 1), _images(n_eval, 2)
    sets = {"train": feature_set(tmp_path / "train", *tr), "val": feature_set(tmp_path / "val", *ev)}
    ctx = Context(eval_set=PlantedDataset("abc", n_eval, "val"), train_set=PlantedDataset("abc", n_train, "train"),
                  features=lambda ds, facets: sets[ds.split], seeds=list(seeds))
    return ctx, tr, ev


def _distribution_loops(lab: np.ndarray, ignore_as_background: bool = False):
    h, w = lab.shape[0] // PATCH, lab.shape[1] // PATCH
    dist, labelled = np.zeros((h * w, C)), np.zeros(h * w, bool)
    for r in range(h):
        for c in range(w):
            px = lab[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].ravel()
            if ignore_as_background:
                px = np.where(px == 255, 0, px)
            px = px[px != 255]
            if len(px):
                labelled[r * w + c] = True
                dist[r * w + c] = np.bincount(px, minlength=C) / len(px)
    return dist, labelled


def _brute_force(train, queries: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Explicit cosine matrix against every labelled train patch (float16 unit rows, as the bank stores them), full
    sort, softmax of the k best, weighted sum of their class distributions: (Q, C)."""
    rows, dists = [], []
    for tok, lab in zip(*train):
        d, keep = _distribution_loops(lab)
        x = tok.reshape(-1, DIM).astype(np.float16).astype(np.float32)  # the cached tokens are float16
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        rows.append(x.astype(np.float16).astype(np.float32)[keep])
        dists.append(d[keep])
    bank, dists = np.concatenate(rows), np.concatenate(dists)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(q), C))
    for i, s in enumerate(q @ bank.T):
        top = np.argsort(-s, kind="stable")[:k]
        wgt = np.exp((s[top] - s[top].max()) / temperature)
        out[i] = (wgt / wgt.sum()) @ dists[top]
    return out


def test_predictions_equal_a_brute_force_reference(tmp_path):
    ctx, tr, ev = _ctx(tmp_path)
    res = get_protocol("retrieval", k=7, temperature=0.1).run(ctx)
    conf = np.zeros((C, C), np.int64)
    for tok, lab in zip(*ev):
        q = tok.astype(np.float16).astype(np.float32).reshape(-1, DIM)
        soft = torch.from_numpy(_brute_force(tr, q, 7, 0.1).T.reshape(1, C, *tok.shape[:2]))
        pred = F.interpolate(soft.float(), size=lab.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        conf += confusion(lab, pred.numpy(), C, C, 255)
    assert res.confusions[0] == conf.tolist()
    assert "cluster_to_class" not in res.per_seed[0] and res.info["matching"] == "identity"
    assert res.per_seed[0]["memory_rows"] == sum(int(_distribution_loops(lab)[1].sum()) for lab in tr[1])
    assert res.per_seed[0]["miou"] > 0.5  # the planted classes are retrievable


def test_patch_distributions_and_ignore_handling_follow_the_definition():
    lab = _images(1, 3)[1][0]
    lab[:PATCH, :PATCH] = 255  # one patch with no labelled pixel
    for background in (False, True):
        dist, labelled = patch_distributions(lab, (5, 6), C, 255, "background" if background else "drop")
        ref_d, ref_l = _distribution_loops(lab, background)
        np.testing.assert_allclose(dist, ref_d, atol=1e-6)
        np.testing.assert_array_equal(labelled, ref_l)
    assert not patch_distributions(lab, (5, 6), C, 255)[1][0]
    assert patch_distributions(lab, (5, 6), C, 255, "background")[0][0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ProtocolError, match="not whole square patches"):
        patch_distributions(lab[:, :-1], (5, 6), C, 255)


def _select_loops(presence, labelled, quota, noise):
    """The reference's sample_features with its torch.rand replaced by `noise`."""
    freq = np.zeros(presence.shape[1])
    for i in range(len(presence)):
        for c in np.flatnonzero(presence[i]):
            freq[c] += 1
    scores = []
    for i in range(len(presence)):
        s = sum(freq[c] for c in np.flatnonzero(presence[i])) if labelled[i] else 1e6
        scores.append(s * noise[i] if labelled[i] else s)
    picked = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:quota]
    return sorted(i for i in picked if labelled[i])


def test_memory_sampling_follows_the_reference_rule_and_favours_rare_classes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        presence = rng.random((30, 4)) < [0.9, 0.3, 0.1, 0.05]
        labelled = presence.any(1)
        noise = rng.random(30)
        for quota in (1, 5, 40):
            assert select_patches(presence, labelled, quota, noise).tolist() == \
                _select_loops(presence, labelled, quota, noise)
    # one patch of a rare class among 29 background patches: a quota of 3 keeps it almost always (score 1·u against
    # 29·u for each background patch)
    presence = np.zeros((30, 2), bool)
    presence[:, 0] = True
    presence[7] = [False, True]
    kept = [7 in select_patches(presence, presence.any(1), 3, np.random.default_rng(s).random(30))
            for s in range(200)]
    assert np.mean(kept) > 0.9


def test_bounded_memory_is_seeded_per_image_and_sized_by_its_quota(tmp_path):
    ctx, tr, _ = _ctx(tmp_path, seeds=(0, 1))
    res = get_protocol("retrieval", memory_size=12 * 4, k=5).run(ctx)
    assert [m["rows"] for m in res.info["memory"]] == [48, 48] and res.info["memory"][0]["per_image_quota"] == 4
    again = get_protocol("retrieval", memory_size=12 * 4, k=5).run(_ctx(tmp_path / "again", seeds=(0, 1))[0])
    assert again.per_seed == res.per_seed  # the same seeds draw the same patches
    with pytest.raises(ProtocolError, match="memory_size=5 gives each of the 12 train views no patch"):
        get_protocol("retrieval", memory_size=5).run(_ctx(tmp_path / "tiny")[0])


def test_exact_search_in_chunks_equals_one_full_sort():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(1000, 16)).astype(np.float16)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    s, i = exact_search(q, bank, 9, bank_rows=128)
    full = q @ bank.astype(np.float32).T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(i, ref)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), rtol=1e-5)
    # equal similarities resolve by bank row, whatever the chunking
    sims, idx = merge_topk(np.array([[1.0, 2.0, 2.0, 1.0]]), np.array([[5, 9, 3, 1]]), 3)
    assert idx.tolist() == [[3, 9, 1]] and sims.tolist() == [[2.0, 2.0, 1.0]]
    assert exact_search(q, bank, 1000, bank_rows=128)[1].shape == (37, 1000)  # the whole bank, in similarity order
    with pytest.raises(SegbenchError, match=r"k=1001 over a memory bank of 1000 rows: use k <= 1000"):
        exact_search(q, bank, 1001)  # never fewer neighbours than asked


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_are_recorded_and_close_to_exact(tmp_path, index):
    ctx, _, _ = _ctx(tmp_path)
    exact = get_protocol("retrieval", k=5).run(ctx)
    approx = get_protocol("retrieval", k=5, index=index, ivf_lists=4, ivf_probe=4).run(ctx)
    assert approx.info["search"].startswith(f"faiss {index}")
    assert abs(approx.per_seed[0]["miou"] - exact.per_seed[0]["miou"]) < 0.02


def test_refusals_name_the_fix(tmp_path):
    ctx, _, _ = _ctx(tmp_path)
    ctx.train_set = None
    with pytest.raises(ProtocolError, match="needs labelled train images other than the evaluation images"):
        get_protocol("retrieval").run(ctx)
    ctx, _, _ = _ctx(tmp_path / "same")
    ctx.train_set = PlantedDataset("abc", 5, "val")  # same content digest as the evaluation split
    with pytest.raises(ProtocolError, match="every query would find itself"):
        get_protocol("retrieval").run(ctx)
    with pytest.raises(ProtocolError, match="augment is a number of epochs"):
        get_protocol("retrieval", augment=-1)


def test_k_and_ivf_lists_beyond_the_bank_rows_are_refused_not_clamped(tmp_path):
    """The planted train split keeps every one of its 12 × 5 × 6 = 360 patches (each has labelled pixels): k=360
    runs on the whole bank, k=361 (or 361 IVF lists) would silently use 360 and is refused naming both numbers."""
    ctx, tr, _ = _ctx(tmp_path)
    assert sum(int(_distribution_loops(lab)[1].sum()) for lab in tr[1]) == 360
    assert get_protocol("retrieval", k=360).run(ctx).per_seed[0]["memory_rows"] == 360
    with pytest.raises(ProtocolError, match=r"k=361 neighbours, but the memory bank of planted/train holds 360 rows"):
        get_protocol("retrieval", k=361).run(ctx)
    with pytest.raises(ProtocolError, match=r"ivf_lists=361 IVF lists, .* holds 360 rows.*ivf_lists=N with N <= 360"):
        get_protocol("retrieval", index="ivf", ivf_lists=361, ivf_probe=4).run(ctx)


def test_index_settings_that_faiss_would_not_honour_are_refused():
    """faiss probes at most every list (ivf_probe 8 and 32 over 8 lists are one exact search) and an HNSW search of
    breadth ef returns at most ef neighbours: such values would not be the ones that ran."""
    with pytest.raises(ProtocolError, match="ivf_probe=32 exceeds ivf_lists=8"):
        get_protocol("retrieval", index="ivf", ivf_lists=8, ivf_probe=32)
    with pytest.raises(ProtocolError, match="k=64 exceeds hnsw_ef=32"):
        get_protocol("retrieval", index="hnsw", k=64, hnsw_ef=32)
    get_protocol("retrieval", ivf_lists=8, ivf_probe=32)  # exact search: the index settings play no part
    get_protocol("retrieval", index="hnsw", k=32, hnsw_ef=32)


def test_hummingbird_presets_fit_the_size_to_the_patch():
    for m in (100, 1000, 10000):
        proto = get_protocol(f"retrieval:hummingbird-{m}")
        assert proto.params["memory_size"] == m * 1024 and proto.params["augment"] == 2
        assert (proto.input_size(16), proto.input_size(14)) == (512, 504)
    assert get_protocol("retrieval", size=512).input_size(14) == 512  # size_fit: exact keeps it (and then refuses)


def _cli(data, results, *extra):
    return main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--protocol", "retrieval", "--results-dir", str(results), *extra])


def test_same_records_whatever_the_batch_size_with_augmented_bounded_memory(small_synthetic, tmp_path, monkeypatch):
    """Every run extracts into a cache of its own, so batch sizes 1 and 5 really compute everything twice: the
    augmented crops (seeded per image and epoch) and the memory sampling (seeded per image) do not see batches."""
    recs = []
    for b in ("1", "5"):
        monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / f"cache{b}"))
        assert _cli(small_synthetic, tmp_path / f"res{b}", "--batch-size", b, "--seeds", "2",
                    "--param", "retrieval.augment=1", "--param", "retrieval.memory_size=96",
                    "--save-masks", str(tmp_path / f"masks{b}")) == 0
        (_, rec), = iter_records(tmp_path / f"res{b}")
        recs.append(rec)
    a, b = recs
    assert a.provenance["batch_size"] == 1 and b.provenance["batch_size"] == 5
    assert a.per_seed == b.per_seed and a.confusions == b.confusions
    assert [m["rows"] for m in a.info["memory"]] == [96, 96]  # 16 train images × 1 epoch × quota 6
    assert a.info["views"][0]["cache"] == "computed" and a.info["train_split"].startswith("train")
    assert any(ps["kind"] == "retrieval augmented memory crops" and ps["computed"] for ps in a.provenance["passes"])
    assert len(list((tmp_path / "masks1" / "retrieval").glob("*.png"))) == 8


def test_crf_goes_through_the_shared_scoring_path(small_synthetic, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    assert _cli(small_synthetic, tmp_path / "res", "--crf") == 0
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.info["crf"]["images_refined"] == 8
    assert rec.info["crf"]["score_types"] == ["retrieved label distributions"]


def _split_root(tmp_path, sample, layout: str) -> tuple:
    """A native-layout root (links, no copies) holding half of a shared sample as train and the other half as
    evaluation images: the shared samples are single splits, and retrieval must never search the images it labels.
    The split is stratified: images sorted by their largest non-background class (then name) go alternately to
    train and evaluation, so a class that occurs in two images has one on each side (a class that the memory never
    saw cannot be retrieved, while k-means is matched to it with the labels)."""
    ds = get_dataset("suim" if layout == "suim" else "voc-rgb", sample, None)

    def dominant(i: int) -> int:
        m = ds.load_mask(i)
        counts = np.bincount(m[(m != 0) & (m != ds.ignore_index)], minlength=1)
        return int(counts.argmax()) if counts.sum() else 0

    order = sorted(range(len(ds)), key=lambda i: (dominant(i), ds.samples[i].name))
    train, evaluation = [ds.samples[i].name for i in order[0::2]], [ds.samples[i].name for i in order[1::2]]
    if layout == "suim":
        for split, names in (("train_val", train), ("TEST", evaluation)):
            for name in names:
                for sub, src in (("images", sample / "images" / f"{name}.jpg"), ("masks", sample / "masks" /
                                                                                 f"{name}.bmp")):
                    (tmp_path / split / sub).mkdir(parents=True, exist_ok=True)
                    (tmp_path / split / sub / src.name).symlink_to(src)
        return tmp_path, len(train), len(evaluation)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for s in train + evaluation:  # the loader reads images by content and RGB-rendered targets by their colours
        (voc / "JPEGImages" / f"{s}.jpg").symlink_to(sample / f"{s}_image.png")
        (voc / "SegmentationClass" / f"{s}.png").symlink_to(sample / f"{s}_target.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(evaluation) + "\n")
    return tmp_path, len(train), len(evaluation)


@pytest.mark.slow
@pytest.mark.parametrize("dataset, sample", [("suim", "suim_sample"), ("voc", "voc_sample")])
def test_real_backbone_on_the_shared_samples_beats_kmeans(shared, tmp_path, dataset, sample):
    """The shared DINOv2 ViT-S/14 on half of a shared sample as memory and the other half as queries (SUIM: 4 + 4
    images, VOC: 7 + 7): retrieval labels the queries better than k-means clusters them, on the same cached
    features."""
    root, n_train, n_eval = _split_root(tmp_path / "root", shared / "data" / sample, dataset)
    args = ["run", "--backbone", str(shared / "models" / "dinov2-small-imgfocus"), "--dataset", dataset,
            "--data-root", str(root), "--results-dir", str(tmp_path / "res"), "--protocol", "retrieval,kmeans"]
    assert main(args) == 0
    recs = {r.protocol["name"]: r for _, r in iter_records(tmp_path / "res")}
    ret, km = recs["retrieval"], recs["kmeans"]
    assert ret.dataset["n_images"] == km.dataset["n_images"] == n_eval
    assert ret.info["memory"][0]["rows"] > 0 and ret.info["views"][0]["images"] == n_train
    assert ret.metrics["miou"]["mean"] > km.metrics["miou"]["mean"]
    assert ret.metrics["pixel_acc"]["mean"] > km.metrics["pixel_acc"]["mean"]


def test_the_hummingbird_group_runs_its_three_memory_sizes_as_three_columns():
    from ssl_segbench.runner import plan_protocols

    planned = plan_protocols(("kmeans", "retrieval:hummingbird"), {"retrieval": {"k": 10}})
    assert [(p.name, p.preset) for p in planned] == [("kmeans", None), ("retrieval", "hummingbird-100"),
                                                     ("retrieval", "hummingbird-1000"),
                                                     ("retrieval", "hummingbird-10000")]
    assert all(p.params["k"] == 10 for p in planned[1:])
    with pytest.raises(ProtocolError, match="stands for the presets hummingbird-100, hummingbird-1000"):
        get_protocol("retrieval:hummingbird")
