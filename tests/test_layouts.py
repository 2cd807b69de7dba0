"""imagedata/layouts.py: the mask, folder and CSV layouts, the eval dir, train.csv and info.csv, the image files."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_profiles, write_image
from imagedata.layouts import DataError, read_csv_train, read_eval, read_folder_train, read_mask_train
from imagedata.split import split_by_columns


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


# ----------------------------------------------------------------------------- a CSV of images and labels
def csv_set(root, rows, header="image_id,label", name="train.csv", images="images", ext=".png"):
    """A Kaggle-style data set: name (header, then rows as written) beside images/<id><ext> for each row's first cell
    (none for an id starting "gone")."""
    for row in rows:
        image = row.split(",")[0]
        if image and not Path(image).suffix and not image.startswith(("gone", "/", ".")):
            write_image(root / images / f"{image}{ext}")
    (root / name).write_text("\n".join([header, *rows]) + "\n")
    return root


def test_a_csv_data_set_finds_its_columns_and_images_with_or_without_extensions(tmp_path):
    csv_set(tmp_path, ["a1,cat", "a2,dog", "a3,10", "a4,2"], header="Image_ID,Label")
    write_image(tmp_path / "extra" / "b1.jpg")
    (tmp_path / "train.csv").write_text((tmp_path / "train.csv").read_text() + "extra/b1.jpg,cat\n")
    data = read_csv_train(tmp_path)
    assert data["classes"] == ["2", "10", "cat", "dog"]  # natural order, as class folders
    assert [Path(p).relative_to(tmp_path).as_posix() for p in data["paths"]] == [
        "images/a1.png", "images/a2.png", "images/a3.png", "images/a4.png", "extra/b1.jpg"]
    assert data["labels"].tolist() == [2, 3, 1, 0, 2] and (data["truth"] == data["labels"]).all()
    # named by flags, the CSV elsewhere
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "labels.csv").write_text("file,kind,species\nimages/a1.png,x,cat\nimages/a2.png,y,dog\n")
    named = read_csv_train(tmp_path, labels_csv="meta/labels.csv", image_column="file", label_column="species")
    assert named["classes"] == ["cat", "dog"] and len(named["paths"]) == 2


@pytest.mark.parametrize("rows,extra,message", [
    (["a1,cat", "a2,dog", "gone1,cat", "gone2,dog"], None,
     r"train.csv line 4: image 'gone1' is not under .* \(1 more are missing too\)$"),
    (["a1,cat", "a2, "], None, r"train.csv line 3: its label is empty; every row needs a label$"),
    (["a1,cat", "a2,dog", "a1.png,dog"], None, r"train.csv: 'a1.png' is listed twice \(lines 2 and 4\): one image, one row$"),
    (["a1,cat", "../outside,dog"], None, r"train.csv line 3: '../outside' is not a path under "),
    (["a1,cat", "/etc/hostname,dog"], None, r"train.csv line 3: '/etc/hostname' is not a path under "),
    (["a1,cat", "a2,cat"], None, r"train.csv: every row has the label 'cat': a classifier needs at least 2 classes$"),
    (["a1,cat", "a2,=1+2"], None, r"train.csv: label '=1\+2' starts as a spreadsheet formula; rename it$"),
    (["a1,cat", "a2,dog"], "two.csv", r"holds 2 CSV files \(train.csv, two.csv\): name the one with the labels with --labels_csv$"),
    (["a1,cat", "a2,dog"], "twin", r"train.csv line 2: 'a1' names 2 images \(a1.jpg, a1.png\): give the extension$"),
])
def test_a_bad_csv_data_set_is_one_line_naming_the_row(tmp_path, rows, extra, message):
    csv_set(tmp_path, rows)
    if extra == "two.csv":
        (tmp_path / "two.csv").write_text("x\n")
    elif extra == "twin":
        write_image(tmp_path / "images" / "a1.jpg")
    with pytest.raises(DataError) as e:
        read_csv_train(tmp_path)
    assert len(str(e.value).splitlines()) == 1 and re.search(message, str(e.value)), e.value


def test_a_csv_without_the_usual_columns_names_them_and_the_flag(tmp_path):
    csv_set(tmp_path, ["a1,cat", "a2,dog"], header="picture,animal")
    with pytest.raises(DataError, match=r"no image column among the usual names \(image, image_id, id, path, file, "
                                        r"filename, image_path; its header: picture,animal\): name it with --image_column"):
        read_csv_train(tmp_path)
    with pytest.raises(DataError, match=r"no label column among .*: name it with --label_column"):
        read_csv_train(tmp_path, image_column="picture")
    with pytest.raises(DataError, match=r"no species column \(--label_column; its header: picture,animal\)"):
        read_csv_train(tmp_path, image_column="picture", label_column="species")
    assert read_csv_train(tmp_path, image_column="picture", label_column="animal")["classes"] == ["cat", "dog"]


def test_a_group_column_keeps_each_group_on_one_side_and_a_fold_column_gives_the_folds(tmp_path):
    rows = [f"p{i},{'cat' if i % 2 else 'dog'},patient{i // 4},{i % 3}" for i in range(40)]
    csv_set(tmp_path, rows, header="id,label,patient,fold")
    data = read_csv_train(tmp_path, group_column="patient")
    for seed in range(3):
        train, val = split_by_columns(data, 0.3, seed)
        assert not set(data["groups"][train]) & set(data["groups"][val]) and len(val)
    folds = read_csv_train(tmp_path, fold_column="fold")
    for fold in range(3):
        train, val = split_by_columns(folds, 0.2, 0, kfold=3, fold=fold)
        assert sorted(Path(folds["paths"][i]).stem for i in val) == sorted(f"p{i}" for i in range(40) if i % 3 == fold)
    with pytest.raises(DataError, match=r"--fold_column fold holds 3 folds \(0, 1, 2\): use --kfold 3 --fold 0..2$"):
        split_by_columns(folds, 0.2, 0, kfold=5, fold=0)
    (tmp_path / "train.csv").write_text("id,label,patient\n" + "\n".join(f"p{i},{'cat' if i < 4 else 'dog'},patient{i // 4}"
                                                                          for i in range(40)) + "\n")
    with pytest.raises(DataError, match=r"every image of class 'cat' is in one patient group, so no split by patient can "
                                        r"put it on both sides"):
        read_csv_train(tmp_path, group_column="patient")


def test_an_eval_csv_lists_its_images_by_id(tmp_path):
    csv_set(tmp_path, ["t2", "t10", "t1"], header="id", name="test.csv")
    ids, paths = read_eval(tmp_path / "test.csv", "folder")
    assert ids == ["t2", "t10", "t1"] and [Path(p).name for p in paths] == ["t2.png", "t10.png", "t1.png"]  # the CSV's order
    (tmp_path / "test.csv").write_text("id\nt2\nt3\n")
    with pytest.raises(DataError, match=r"test.csv line 3: image 't3' is not under"):
        read_eval(tmp_path / "test.csv", "folder")
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        read_eval(tmp_path / "test.csv", "mask")  # a mask model's eval dir holds info.csv and images/
