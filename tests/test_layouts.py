"""imagedata/layouts.py: the mask and folder layouts, the eval dir, train.csv and info.csv, the image files."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_profiles, write_image
from imagedata.layouts import DataError, read_eval, read_folder_train, read_mask_train


def test_labels_cover_all_18_classes(tmp_path):
    people = [(i, g, a) for i, (g, a) in enumerate((g, a) for g in ("male", "female") for a in (20, 45, 70))]
    data = read_mask_train(make_profiles(tmp_path, people))
    assert sorted(set(data["labels"].tolist())) == list(range(18))
    by_path = dict(zip((Path(p).parent.name + "/" + Path(p).stem for p in data["paths"]), data["labels"]))
    assert by_path["000004_female_Asian_45/incorrect_mask"] == 1 * 6 + 1 * 3 + 1
    assert by_path["000002_male_Asian_70/normal"] == 2 * 6 + 0 * 3 + 2
    assert by_path["000003_female_Asian_20/mask3"] == 0 * 6 + 1 * 3 + 0
    assert len(data["classes"]) == 18 and data["classes"][11] == "incorrect_female_old"


def test_hidden_files_and_non_images_skipped(tmp_path):
    make_profiles(tmp_path, [(1, "male", 25)])
    folder = tmp_path / "images" / "000001_male_Asian_25"
    write_image(folder / "._mask1.jpg")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden_dir").mkdir()
    data = read_mask_train(tmp_path)
    assert len(data["paths"]) == 7
    assert not any(Path(p).name.startswith(".") for p in data["paths"])


@pytest.mark.parametrize("name,message", [("abc_male_Asian", "malformed profile folder"), ("000001_robot_Asian_30", "malformed profile folder"),
                                          ("000001_male_Asian_old", "malformed profile folder"), ("000001_male_Asian_200", "out of range")])
def test_malformed_profile(tmp_path, name, message):
    write_image(tmp_path / "images" / name / "mask1.jpg")
    with pytest.raises(DataError, match=message):
        read_mask_train(tmp_path)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_missing_or_empty_data_dir(tmp_path, make):
    with pytest.raises(DataError, match="does not exist|no images"):
        read_mask_train(make(tmp_path))


def test_folder_layout_natural_order(tmp_path):
    for name in ("10", "2", "1", "b", "a"):
        write_image(tmp_path / name / "x.png")
    write_image(tmp_path / "2" / "nested" / "y.jpg")
    data = read_folder_train(tmp_path)
    assert data["classes"] == ["1", "2", "10", "a", "b"]
    assert sorted(np.bincount(data["labels"]).tolist()) == [1, 1, 1, 1, 2]


def test_read_eval_mask_keeps_info_order(demo_dir):
    ids, paths = read_eval(demo_dir / "eval", "mask")
    listed = (demo_dir / "eval" / "info.csv").read_text().split()[1:]
    assert ids == [line.split(",")[0] for line in listed]
    assert all(os.path.isfile(p) for p in paths)


def test_read_eval_folder_nested_relative_ids(tmp_path):
    write_image(tmp_path / "b.jpg")
    write_image(tmp_path / "sub" / "deeper" / "a.png")
    (tmp_path / "sub" / ".DS_Store").write_bytes(b"x")
    ids, _ = read_eval(tmp_path, "folder")
    assert ids == ["b.jpg", "sub/deeper/a.png"]


def test_one_class_folder_set_is_refused(tmp_path):
    write_image(tmp_path / "only" / "a.png")
    write_image(tmp_path / "only" / "b.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="1 class \\(only\\): a classifier needs at least 2"):
        read_folder_train(tmp_path)


def test_webp_bmp_tiff_are_read_in_both_layouts_and_eval(tmp_path):
    people = make_profiles(tmp_path / "mask", [(1, "female", 30)])
    normal = people / "images" / "000001_female_Asian_30" / "normal.jpg"
    Image.open(normal).save(normal.with_suffix(".webp"))
    normal.unlink()
    assert len(read_mask_train(people)["paths"]) == 7
    for ext in ("webp", "bmp", "tif", "tiff", "gif"):
        write_image(tmp_path / "folder" / ("a" if ext < "m" else "b") / f"x.{ext}")
        write_image(tmp_path / "eval" / f"x.{ext}")
    assert len(read_folder_train(tmp_path / "folder")["paths"]) == 5
    assert sorted(read_eval(tmp_path / "eval", "folder")[0]) == ["x.bmp", "x.gif", "x.tif", "x.tiff", "x.webp"]


def test_one_person_in_two_folders_is_refused(tmp_path):
    make_profiles(tmp_path, [(7, "female", 30), (8, "male", 40)])
    write_image(tmp_path / "images" / "000007_female_Korean_30" / "mask1.jpg")
    with pytest.raises(DataError, match="profile id 000007 names two folders, .*000007_female_Asian_30 and .*000007_female_Korean_30"):
        read_mask_train(tmp_path)


def write_train_csv(root, rows, header="id,gender,race,age,path", bom=False):
    text = "\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n"
    (root / "train.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def test_train_csv_is_only_checked_against_the_folders(tmp_path, capsys):
    make_profiles(tmp_path, [(1, "male", 25), (2, "female", 61)])
    labels = read_mask_train(tmp_path)["labels"]
    assert capsys.readouterr().err == ""  # no train.csv: fine
    write_train_csv(tmp_path, [("000001", "male", "Asian", 25, "000001_male_Asian_25"),
                               ("000002", "female", "Asian", 61, "000002_female_Asian_61")], bom=True)
    read_mask_train(tmp_path / "images")  # DATA/train/images finds DATA/train/train.csv too
    assert capsys.readouterr().err == ""
    write_train_csv(tmp_path, [("000001", "male", "Asian", 52, "000001_male_Asian_25"),
                               ("000003", "male", "Asian", 33, "000003_male_Asian_33")])
    data = read_mask_train(tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path / 'train.csv'} does not match the profile folders"), lines
    assert "listed without a folder: 1 (e.g. 000003_male_Asian_33)" in lines[0]
    assert "folders not listed: 1 (e.g. 000002_female_Asian_61)" in lines[0]
    assert "differ from the folder name: 1 (e.g. 000001_male_Asian_25)" in lines[0]
    assert list(data["labels"]) == list(labels)  # the folders still say what trains
    write_train_csv(tmp_path, [(1, "000001_male_Asian_25")], header="id,folder")
    read_mask_train(tmp_path)
    assert capsys.readouterr().err == f"warning: {tmp_path / 'train.csv'}: no gender column (its header: id,folder): not checked " \
                                      f"against the profile folders\n"


def test_symlinked_folders_are_followed_once_without_looping(tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "cat_1.jpg")
    write_image(photos / "deeper" / "cat_2.png")
    write_image(tmp_path / "data" / "cat" / "own.jpg")
    (tmp_path / "data" / "cat" / "linked").symlink_to(photos, target_is_directory=True)
    (photos / "deeper" / "back_up").symlink_to(photos, target_is_directory=True)  # a loop
    write_image(tmp_path / "data" / "dog" / "d.jpg")
    data = read_folder_train(tmp_path / "data")
    names = sorted(Path(p).name for p in data["paths"])
    assert names == ["cat_1.jpg", "cat_2.png", "d.jpg", "own.jpg"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "batch1").symlink_to(photos, target_is_directory=True)
    assert read_eval(tmp_path / "eval", "folder")[0] == ["batch1/cat_1.jpg", "batch1/deeper/cat_2.png"]


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path, capsys):
    write_image(tmp_path / "cat" / "a.jpg")
    write_image(tmp_path / "dog" / "b.jpg")
    (tmp_path / "emu").mkdir()
    (tmp_path / "heic_only").mkdir()
    (tmp_path / "heic_only" / "IMG_0001.HEIC").write_bytes(b"\0")
    data = read_folder_train(tmp_path)
    assert data["classes"] == ["cat", "dog"] and list(data["labels"]) == [0, 1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: left out 2 of 4 class folders in {tmp_path}, which hold no images: "
                                                   f"emu, heic_only (images are .bmp .gif .jpeg .jpg .png .tif .tiff .webp)"), err


@pytest.mark.parametrize("content,message", [
    (b"\xef\xbb\xbfImageID,ans\nb.jpg,0\na.jpg,0\n", None),  # Excel's "CSV UTF-8"
    (b"image,ans\nb.jpg,0\n", "info.csv: no ImageID column (its header: image,ans)"),
    (b"", "info.csv: no ImageID column (its header: none)"),
    (b"ImageID,ans\n\xff\xfeb.jpg,0\n", "info.csv: not a UTF-8 CSV"),
])
def test_info_csv_with_a_bom_is_read_and_a_missing_column_named(tmp_path, content, message):
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "b.jpg")
    (tmp_path / "info.csv").write_bytes(content)
    if message is None:
        assert read_eval(tmp_path, "mask")[0] == ["b.jpg", "a.jpg"]
    else:
        with pytest.raises(DataError, match=re.escape(message)):
            read_eval(tmp_path, "mask")


def test_a_mask_eval_dir_is_refused_for_a_folder_model(tmp_path, demo_dir):
    with pytest.raises(DataError, match=f"eval dir {demo_dir / 'eval'} is of the mask layout .*, but checkpoint x.pth is of the "
                                        "class-per-folder layout"):
        read_eval(demo_dir / "eval", "folder", "checkpoint x.pth")
    with pytest.raises(DataError, match="has no info.csv: --dataset MaskBaseDataset is of the mask layout"):
        read_eval(demo_dir / "train", "mask", "--dataset MaskBaseDataset")


@pytest.mark.parametrize("link, target", [("cat/up", ".."), ("cat/dogs", "../dog"), ("dog/again.jpg", "../cat/own.jpg")])
def test_one_image_reached_under_two_classes_is_refused(tmp_path, link, target):
    write_image(tmp_path / "data" / "cat" / "own.jpg")
    write_image(tmp_path / "data" / "dog" / "d.jpg")
    (tmp_path / "data" / link).symlink_to(target)
    with pytest.raises(DataError, match=r"is reached as .* and as .*: one image under two classes; remove the link"):
        read_folder_train(tmp_path / "data")


def test_a_person_linked_twice_is_refused_and_a_link_out_is_one_warning(tmp_path, capsys):
    make_profiles(tmp_path, [(1, "male", 25), (2, "female", 45)])
    (tmp_path / "images" / "000003_female_Asian_45").symlink_to("000002_female_Asian_45")
    with pytest.raises(DataError, match="one image under two people"):
        read_mask_train(tmp_path)
    (tmp_path / "images" / "000003_female_Asian_45").unlink()
    write_image(tmp_path / "photos" / "a.jpg")
    write_image(tmp_path / "photos" / "b.jpg")
    write_image(tmp_path / "data" / "dog" / "d.jpg")
    (tmp_path / "data" / "cat").symlink_to(tmp_path / "photos")
    (tmp_path / "photos" / "a_again.jpg").symlink_to("a.jpg")  # the same photo twice in one class: kept once
    assert sorted(Path(p).name for p in read_folder_train(tmp_path / "data")["paths"]) == ["a.jpg", "b.jpg", "d.jpg"]
    assert capsys.readouterr().err == (f"warning: 2 of 3 images under {tmp_path / 'data'} are links to files outside it "
                                       f"(e.g. {tmp_path / 'data' / 'cat' / 'a.jpg'} -> {tmp_path / 'photos' / 'a.jpg'}): they "
                                       f"train as if they were there\n")


def test_a_name_that_is_not_utf8_is_named(tmp_path):
    write_image(tmp_path / "cat" / "a.jpg")
    write_image(tmp_path / "dog" / "b.jpg")
    os.rename(tmp_path / "cat" / "a.jpg", os.fsencode(tmp_path / "cat") + b"/\xff.jpg")
    with pytest.raises(DataError) as e:
        read_folder_train(tmp_path)
    assert str(e.value) == f"{tmp_path}/cat/\\xff.jpg: its name is not UTF-8 text, which the run's CSV and JSON files cannot hold; rename it"
    with pytest.raises(DataError, match=r"cat/\\xff.jpg: its name is not UTF-8"):
        read_eval(tmp_path, "folder")
    os.rename(tmp_path / "dog", os.fsencode(tmp_path) + b"/d\xfeg")
    with pytest.raises(DataError, match=r"d\\xfeg: its name is not UTF-8"):
        read_folder_train(tmp_path)


@pytest.mark.parametrize("image_id", ["../../train/images/000001_male_Asian_25/mask1.jpg", "/etc/hostname", "sub/../../x.jpg"])
def test_an_eval_image_id_outside_the_eval_dir_is_refused(tmp_path, image_id):
    make_profiles(tmp_path / "train", [(1, "male", 25)])
    write_image(tmp_path / "eval" / "images" / "a.jpg")
    (tmp_path / "eval" / "info.csv").write_text(f"ImageID,ans\na.jpg,0\n{image_id},0\n")
    with pytest.raises(DataError) as e:
        read_eval(tmp_path / "eval", "mask")
    assert str(e.value) == f"{tmp_path / 'eval' / 'info.csv'}: ImageID {image_id!r} is not a file name under {tmp_path / 'eval' / 'images'}"


def test_a_class_folder_named_as_a_spreadsheet_formula_is_refused(tmp_path):
    write_image(tmp_path / "=HYPERLINK(evil)" / "a.jpg")
    write_image(tmp_path / "-1" / "b.jpg")  # a number: no formula
    with pytest.raises(DataError, match=re.escape(f"class folder {tmp_path / '=HYPERLINK(evil)'}: its name starts as a "
                                                  f"spreadsheet formula; rename it")):
        read_folder_train(tmp_path)
    os.rename(tmp_path / "=HYPERLINK(evil)", tmp_path / "cat")
    assert read_folder_train(tmp_path)["classes"] == ["-1", "cat"]
