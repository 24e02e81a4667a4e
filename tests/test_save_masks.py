"""Issue 19: `--save-masks DIR` writes only inside DIR, as records stay inside the results folder: a protocol
subfolder or a mask file that is a symlink leading out of DIR is refused (exit 2) while the run is planned, before any
backbone pass or mask is written, the link's target untouched, no record and no cache entry written; a symlink that
stays inside DIR is followed."""
from __future__ import annotations

import numpy as np
import pytest
from stores import PlantedDataset
from test_refusals import _cli, _nothing_written, _run_args

from ssl_segbench.paths import PathError
from ssl_segbench.protocols import Context
from ssl_segbench.protocols.base import MaskSaver
from ssl_segbench.records import iter_records


def _masks_run(tmp_path, data, masks):
    return _cli(tmp_path, *_run_args(tmp_path, data, "pixels", "kmeans", "--save-masks", str(masks)))


def test_a_protocol_subfolder_linked_out_of_the_masks_folder_is_refused(small_synthetic, tmp_path):
    outside, masks = tmp_path / "outside", tmp_path / "masks"
    outside.mkdir()
    masks.mkdir()
    (masks / "kmeans").symlink_to(outside)
    rc, err = _masks_run(tmp_path, small_synthetic, masks)
    assert rc == 2 and "Traceback" not in err, err
    assert f"--save-masks: refusing to write {outside}: it is outside {masks}" in err and "remove that link" in err
    assert list(outside.iterdir()) == []
    _nothing_written(tmp_path)
    assert not list((tmp_path / "cache").rglob("meta.json")), "the refusal came after a backbone pass"


def test_a_mask_file_linked_out_of_the_masks_folder_is_refused_before_any_mask_is_written(small_synthetic,
                                                                                          tmp_path):
    outside, folder = tmp_path / "outside", tmp_path / "masks" / "kmeans"
    outside.mkdir()
    folder.mkdir(parents=True)
    target = outside / "victim.png"
    target.write_bytes(b"not a mask")
    (folder / "syn_test_00005.png").symlink_to(target)  # the sixth of the 8 test images
    rc, err = _masks_run(tmp_path, small_synthetic, tmp_path / "masks")
    assert rc == 2 and "Traceback" not in err, err
    assert f"refusing to write {target}: it is outside {tmp_path / 'masks'}" in err
    assert target.read_bytes() == b"not a mask" and list(outside.iterdir()) == [target]
    assert sorted(p.name for p in folder.iterdir()) == ["syn_test_00005.png"]  # no mask before it was written either
    _nothing_written(tmp_path)
    assert not list((tmp_path / "cache").rglob("meta.json")), "the refusal came after a backbone pass"


def test_a_link_that_stays_inside_the_masks_folder_is_followed(small_synthetic, tmp_path):
    masks = tmp_path / "masks"
    (masks / "elsewhere").mkdir(parents=True)
    (masks / "kmeans").symlink_to(masks / "elsewhere")
    rc, err = _masks_run(tmp_path, small_synthetic, masks)
    assert rc == 0, err
    assert len(list((masks / "elsewhere").glob("*.png"))) == 8 and len(list(iter_records(tmp_path / "res"))) == 1


def test_a_stage_subfolder_linked_out_is_refused_before_the_saver_writes(tmp_path):
    """The subfolder a protocol's stage writes to (maskdistill's distilled heads) is checked like the protocol's."""
    root, outside = tmp_path / "masks" / "maskdistill", tmp_path / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    (root / "distill-linear").symlink_to(outside)
    ctx = Context(eval_set=PlantedDataset("ab", 2), train_set=None, features=None, seeds=[0], save_masks=root)
    with pytest.raises(PathError, match=f"refusing to write {outside}: it is outside {root}"):
        MaskSaver(ctx, "distill-linear")
    assert list(outside.iterdir()) == []
    saver = MaskSaver(ctx, "distill-conv")  # a plain subfolder is made and written as before
    saver(0, 0, np.zeros((4, 4), np.int64))
    saver(1, 0, np.ones((4, 4), np.int64))
    saver.finish(np.array([1, 0]))
    assert saver.written == 2 and sorted(p.name for p in (root / "distill-conv").iterdir()) == ["img0.png", "img1.png"]
