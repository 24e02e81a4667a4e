"""COCO-Stuff: curated 27 classes and their stuff / things views, and Leopart's COCO-Stuff-15 — every fine id checked.

The expectations come from the COCO-Stuff category list (each COCO category id with its supercategory), written out
here independently of the loader's own table.
"""
import numpy as np
import pytest
from fixtures_data import grid, write_image, write_labels

from ssl_segbench.data import DATASETS, DatasetError, get_dataset

# COCO thing categories, ids 1..91 in order; [x] marks ids unused in COCO 2017 (they still have a fine id).
THINGS = [
    ("person", "person"),
    ("vehicle", "bicycle car motorcycle airplane bus train truck boat"),
    ("outdoor", "traffic_light fire_hydrant [street_sign] stop_sign parking_meter bench"),
    ("animal", "bird cat dog horse sheep cow elephant bear zebra giraffe"),
    ("accessory", "[hat] backpack umbrella [shoe] [eye_glasses] handbag tie suitcase"),
    ("sports", "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
               "tennis_racket"),
    ("kitchen", "bottle [plate] wine_glass cup fork knife spoon bowl"),
    ("food", "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake"),
    ("furniture", "chair couch potted_plant bed [mirror] dining_table [window] [desk] toilet [door]"),
    ("electronic", "tv laptop mouse remote keyboard cell_phone"),
    ("appliance", "microwave oven toaster sink refrigerator [blender]"),
    ("indoor", "book clock vase scissors teddy_bear hair_drier toothbrush [hair_brush]"),
]
# COCO-Stuff stuff categories, ids 92..182 in order, with their supercategory (DATASETS.md names).
STUFF = """banner:textile blanket:textile branch:plant bridge:building building-other:building bush:plant
cabinet:furniture-stuff cage:structural cardboard:rawmaterial carpet:floor ceiling-other:ceiling ceiling-tile:ceiling
cloth:textile clothes:textile clouds:sky counter:furniture-stuff cupboard:furniture-stuff curtain:textile
desk-stuff:furniture-stuff dirt:ground door-stuff:furniture-stuff fence:structural floor-marble:floor floor-other:floor
floor-stone:floor floor-tile:floor floor-wood:floor flower:plant fog:water food-other:food-stuff fruit:food-stuff
furniture-other:furniture-stuff grass:plant gravel:ground ground-other:ground hill:solid house:building leaves:plant
light:furniture-stuff mat:textile metal:rawmaterial mirror-stuff:furniture-stuff moss:plant mountain:solid mud:ground
napkin:textile net:structural paper:rawmaterial pavement:ground pillow:textile plant-other:plant plastic:rawmaterial
platform:ground playingfield:ground railing:structural railroad:ground river:water road:ground rock:solid
roof:building rug:textile salad:food-stuff sand:ground sea:water shelf:furniture-stuff sky-other:sky
skyscraper:building snow:ground solid-other:solid stairs:furniture-stuff stone:solid straw:plant
structural-other:structural table:furniture-stuff tent:building textile-other:textile towel:textile tree:plant
vegetable:food-stuff wall-brick:wall wall-concrete:wall wall-other:wall wall-panel:wall wall-stone:wall wall-tile:wall
wall-wood:wall water-other:water waterdrops:water window-blind:window window-other:window wood:solid""".split()

SUPERCATEGORY = [sup for sup, cats in THINGS for _ in cats.split()] + [s.split(":")[1] for s in STUFF]
THING_SUPERS = ["electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
                "person", "sports", "vehicle"]


def test_category_tables_are_complete():
    assert len(SUPERCATEGORY) == 182 and len(STUFF) == 91


@pytest.fixture
def coco_root(tmp_path):
    """val2017 with two images: one holding every fine id 0..181 and 255, one plain; train2017 with one image."""
    every = grid(list(range(182)) + [255], width=61)  # 3 x 61
    for split, stems in (("val2017", ["000000000001", "000000000002"]), ("train2017", ["000000000003"])):
        for k, stem in enumerate(stems):
            write_image(tmp_path / "images" / split / f"{stem}.jpg", *every.shape, seed=k)
            write_labels(tmp_path / "annotations" / split / f"{stem}.png", every if k == 0 else np.zeros_like(every))
        curated = tmp_path / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt"
        curated.parent.mkdir(parents=True)
        curated.write_text("\n".join(stems) + "\n")
    return tmp_path, every


def expected_coarse(fine: int, view: str) -> str | None:
    """Class name of a fine id in a view, None for ignore."""
    if fine == 255:
        return None
    sup = SUPERCATEGORY[fine]
    is_thing = fine < 91
    if view == "stuff15" and is_thing or view == "things12" and not is_thing:
        return None
    return sup


@pytest.mark.parametrize("dataset_id, view", [("cocostuff27", "27"), ("cocostuff27-stuff15", "stuff15"),
                                              ("cocostuff27-things12", "things12")])
def test_every_fine_id_maps_to_its_supercategory(coco_root, dataset_id, view):
    root, every = coco_root
    ds = get_dataset(dataset_id, root, "val")
    assert len(ds) == 2 and ds.num_classes == {"27": 27, "stuff15": 15, "things12": 12}[view]
    mask = ds.load_mask(0)
    for fine, got in zip(every.ravel(), mask.ravel()):
        want = expected_coarse(int(fine), view)
        assert (ds.class_names[got] if got != 255 else None) == want, f"fine id {fine}"
    assert any("Coco164kFull_Stuff_Coarse_7.txt (2 ids" in n for n in ds.notes)


def test_27_class_order_is_things_then_stuff():
    names = DATASETS["cocostuff27"].class_names
    assert list(names[:12]) == THING_SUPERS
    assert names[12:] == DATASETS["cocostuff27-stuff15"].class_names
    assert names[:12] == DATASETS["cocostuff27-things12"].class_names


def test_curated_list_decides_the_images_and_can_be_given(coco_root, tmp_path_factory):
    root, _ = coco_root
    own = tmp_path_factory.mktemp("lists") / "mine.txt"
    own.write_text("000000000002.jpg\n")
    ds = get_dataset("cocostuff27", root, "val", curated_list=own)
    assert [s.name for s in ds.samples] == ["000000000002"]
    assert any(str(own) in n for n in ds.notes)
    assert len(get_dataset("cocostuff27", root, "train")) == 1


def test_missing_curated_list_names_the_file_and_the_fix(coco_root):
    root, _ = coco_root
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DatasetError, match=r"Coco164kFull_Stuff_Coarse_7.txt not found.*curated_list=PATH"):
        get_dataset("cocostuff27", root, "val")


def test_listed_image_missing_is_an_error(coco_root):
    root, _ = coco_root
    (root / "images" / "val2017" / "000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match="000000000002.jpg does not exist"):
        get_dataset("cocostuff27", root, "val")
    assert get_dataset("cocostuff27", root, "val", skip_bad=True).describe()["n_skipped"] == 1


def test_undefined_fine_id_is_an_error(coco_root):
    root, every = coco_root
    write_labels(root / "annotations" / "val2017" / "000000000002.png", np.full_like(every, 200))
    ds = get_dataset("cocostuff27", root, "val")
    with pytest.raises(DatasetError, match=r"000000000002.png has label value\(s\) \[200\]"):
        ds.load_mask(1)


def test_leopart_stuff15_reads_pixelmaps_of_every_image(tmp_path):
    """Pixelmaps hold COCO category ids: 92-182 stuff, 183 other, 0 unlabelled."""
    values = grid([0] + list(range(92, 184)), width=31)
    for stem in ("000000000139", "000000000285"):
        write_image(tmp_path / "images" / "val2017" / f"{stem}.jpg", *values.shape)
        write_labels(tmp_path / "annotations" / "stuff_val2017_pixelmaps" / f"{stem}.png", values)
    ds = get_dataset("cocostuff15-leopart", tmp_path)
    assert ds.split == "val" and len(ds) == 2
    leopart_names = sorted({s.split(":")[1].replace("rawmaterial", "raw-material") for s in STUFF})
    assert list(ds.class_names) == leopart_names and len(leopart_names) == 15
    mask = ds.load_mask(0)
    for value, got in zip(values.ravel(), mask.ravel()):
        if value in (0, 183):
            assert got == 255
        else:
            sup = STUFF[value - 92].split(":")[1].replace("rawmaterial", "raw-material")
            assert ds.class_names[got] == sup, f"category id {value}"


def test_leopart_rejects_thing_ids_in_a_stuff_pixelmap(tmp_path):
    write_image(tmp_path / "val2017" / "a.jpg", 2, 2)
    write_labels(tmp_path / "stuff_val2017_pixelmaps" / "a.png", np.full((2, 2), 5))
    ds = get_dataset("cocostuff15-leopart", tmp_path, "val")
    with pytest.raises(DatasetError, match=r"\[5\]"):
        ds.load_mask(0)
