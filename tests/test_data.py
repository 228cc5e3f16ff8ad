"""The Yo'LLaVA dataset reader: a synthetic tree in the real layout, and the real json files."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from yollava.data import (
    DatasetError,
    QAItem,
    Turn,
    YollavaDataset,
    load_image,
    natural_key,
    read_conversations,
    read_visual_qa,
    recognition_negatives,
    recognition_split,
    resolve_image_path,
)

REAL = Path(__file__).resolve().parent / "data" / "yollava-format"  # the benchmark's own files (see README there)


def write_png(path: Path, size=(8, 6), mode="RGB", color=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def qa_entry(question="What color is <sks>?", options=None, answer="A"):
    return {"question": question, "options": options or {"A": "Brown", "B": "Grey"},
            "correct_answer": answer}


@pytest.fixture
def root(tmp_path) -> Path:
    """train/test photos for `bo` and `mam`, a QA json and a conversation file."""
    d = tmp_path / "yollava-data"
    for name in ("10.png", "9.png", "1.png", "2.jpg"):
        write_png(d / "train" / "bo" / name)
    write_png(d / "train" / "bo" / "negative_example" / "x.png")  # not a subject photo
    (d / "train" / "bo" / ".DS_Store").write_bytes(b"junk")
    (d / "train" / "bo" / "notes.txt").write_text("not a photo")
    write_png(d / "train" / "mam" / "0.webp")
    for name in ("0.png", "1.png"):
        write_png(d / "test" / "bo" / name)
    for name in ("0.png", "1.PNG", "2.jpeg"):
        write_png(d / "test" / "mam" / name)
    write_json(d / "yollava-visual-qa.json", {
        "mam": {"./yollava-data/test/mam/0.png": qa_entry("Is <sks> a cat?",
                                                           {"A": "Yes", "B": "No"})},
        "bo": {
            "./yollava-data/test/bo/1.png": qa_entry("What is <sks>'s fur?", answer="B"),
            "./yollava-data/test/bo/0.png": qa_entry(),
        },
    })
    write_json(d / "bo-text-only-conversation.json", {
        "./data/train/bo/9.png": [{"Human": "What color is <bo>?", "AI": "<bo> is brown."}],
        "./data/train/bo/1.png": [{"Human": "What is <bo>?", "AI": "A dog."},
                                  {"Human": "Size?", "AI": "Small."}],
    })
    return d


def rel(root: Path, paths) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


# --- loading a synthetic tree ----------------------------------------------------------------


def test_load_subjects_in_natural_order_skipping_non_photos(root):
    ds = YollavaDataset.load(root)
    assert ds.root == root.resolve()
    assert list(ds.subjects) == ["bo", "mam"]
    bo = ds.subjects["bo"]
    assert rel(ds.root, bo.train_images) == ["train/bo/1.png", "train/bo/2.jpg",
                                             "train/bo/9.png", "train/bo/10.png"]
    assert rel(ds.root, bo.test_images) == ["test/bo/0.png", "test/bo/1.png"]
    assert rel(ds.root, ds.subjects["mam"].train_images) == ["train/mam/0.webp"]
    assert rel(ds.root, ds.subjects["mam"].test_images) == ["test/mam/0.png", "test/mam/1.PNG",
                                                            "test/mam/2.jpeg"]


def test_qa_items_resolved_sorted_and_personalized(root):
    ds = YollavaDataset.load(root)
    assert ds.qa == [
        QAItem("bo", ds.root / "test/bo/0.png", "What color is <bo>?",
               {"A": "Brown", "B": "Grey"}, "A"),
        QAItem("bo", ds.root / "test/bo/1.png", "What is <bo>'s fur?",
               {"A": "Brown", "B": "Grey"}, "B"),
        QAItem("mam", ds.root / "test/mam/0.png", "Is <mam> a cat?", {"A": "Yes", "B": "No"}, "A"),
    ]


def test_identifier_replaces_sks_and_subject_token(root):
    ds = YollavaDataset.load(root, identifier=lambda s: f"<alice/{s}>")
    assert ds.qa[0].question == "What color is <alice/bo>?"
    assert ds.conversations["bo"][1].turns[0] == Turn("What color is <alice/bo>?",
                                                      "<alice/bo> is brown.")


def test_conversations_by_subject_file_name(root):
    ds = YollavaDataset.load(root)
    assert list(ds.conversations) == ["bo"]
    convs = ds.conversations["bo"]
    assert rel(ds.root, [c.image for c in convs]) == ["train/bo/1.png", "train/bo/9.png"]
    assert convs[0].turns == [Turn("What is <bo>?", "A dog."), Turn("Size?", "Small.")]
    assert all(c.subject == "bo" for c in convs)


def test_conversation_in_per_subject_folder(root):
    (root / "bo-text-only-conversation.json").unlink()
    write_json(root / "train" / "mam" / "text-only-conversation.json",
               {"./data/train/mam/0.webp": [{"Human": "Who is <mam>?", "AI": "A cat."}]})
    ds = YollavaDataset.load(root)
    assert list(ds.conversations) == ["mam"]
    assert ds.conversations["mam"][0].image == ds.root / "train/mam/0.webp"


def test_two_conversation_files_for_one_subject_is_an_error(root):
    write_json(root / "extra" / "bo" / "text-only-conversation.json", {})
    with pytest.raises(DatasetError, match="more than one .*bo"):
        YollavaDataset.load(root)


def test_subjects_filter_drops_other_subjects_qa_and_conversations(root):
    ds = YollavaDataset.load(root, subjects=["mam"])
    assert list(ds.subjects) == ["mam"]
    assert [q.subject for q in ds.qa] == ["mam"]
    assert ds.conversations == {}


def test_missing_subject_raises_naming_it(root):
    with pytest.raises(DatasetError, match="'zed'"):
        YollavaDataset.load(root, subjects=["bo", "zed"])


@pytest.mark.parametrize("name", ["..", "../bo", "bo/..", ".hidden", ""])
def test_subject_names_must_be_plain_folder_names(root, name):
    with pytest.raises(DatasetError, match="subject name"):
        YollavaDataset.load(root, subjects=[name])


def test_subjects_must_not_be_a_bare_string(root):
    with pytest.raises(TypeError, match="'bo'"):
        YollavaDataset.load(root, subjects="bo")


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        YollavaDataset.load(tmp_path / "nowhere")


def test_root_without_splits_raises(tmp_path):
    with pytest.raises(DatasetError, match="neither train/ nor test/"):
        YollavaDataset.load(tmp_path)


def test_qa_with_missing_photo_is_skipped_with_a_warning(root):
    qa = json.loads((root / "yollava-visual-qa.json").read_text())
    qa["bo"]["./yollava-data/test/bo/7.png"] = qa_entry()
    write_json(root / "yollava-visual-qa.json", qa)
    with pytest.warns(UserWarning, match=r"skipped 1 .*test/bo/7\.png"):
        ds = YollavaDataset.load(root)
    assert len(ds.qa) == 3


def test_dataset_without_qa_or_conversations(root):
    (root / "yollava-visual-qa.json").unlink()
    (root / "bo-text-only-conversation.json").unlink()
    ds = YollavaDataset.load(root)
    assert ds.qa == [] and ds.conversations == {}


def test_recognition_split(root):
    ds = YollavaDataset.load(root)
    positives, negatives = recognition_split(ds, "bo")
    assert rel(ds.root, positives) == ["test/bo/0.png", "test/bo/1.png"]
    assert rel(ds.root, negatives) == ["test/mam/0.png", "test/mam/1.PNG", "test/mam/2.jpeg"]
    assert len(recognition_split(ds, "mam")[1]) == 2
    with pytest.raises(DatasetError, match="'zed'"):
        recognition_split(ds, "zed")


def test_negatives_by_kind(root):
    """test/<subject>/negatives/<kind>/ adds held-out negatives of that kind; never subject photos."""
    write_png(root / "test" / "bo" / "negatives" / "hard" / "0.png")
    write_png(root / "test" / "bo" / "negatives" / "hard" / "1.png")
    ds = YollavaDataset.load(root)
    assert rel(ds.root, ds.subjects["bo"].test_images) == ["test/bo/0.png", "test/bo/1.png"]
    neg = recognition_negatives(ds, "bo")
    assert list(neg) == ["others", "hard"]
    assert rel(ds.root, neg["hard"]) == ["test/bo/negatives/hard/0.png", "test/bo/negatives/hard/1.png"]
    assert rel(ds.root, neg["others"]) == rel(ds.root, recognition_split(ds, "bo")[1])
    assert list(recognition_negatives(ds, "mam")) == ["others"]
    write_png(root / "test" / "bo" / "negatives" / "others" / "0.png")
    with pytest.raises(DatasetError, match="reserved"):
        YollavaDataset.load(root)


def test_natural_key():
    names = ["10.png", "b.png", "9.png", "A.png", "a10.png", "a9.png", "0.png"]
    assert sorted(names, key=natural_key) == ["0.png", "9.png", "10.png", "a9.png", "a10.png",
                                              "A.png", "b.png"]


# --- path safety -----------------------------------------------------------------------------


def test_resolve_maps_trailing_parts_onto_root(tmp_path):
    assert (resolve_image_path(tmp_path, "./yollava-data/test/bo/3.png")
            == tmp_path / "test/bo/3.png")
    assert resolve_image_path(tmp_path, "./data/train/bo/3.png") == tmp_path / "train/bo/3.png"
    assert resolve_image_path(tmp_path, "test/bo/3.JPG") == tmp_path / "test/bo/3.JPG"


@pytest.mark.parametrize("raw", [
    "/etc/test/bo/1.png",
    "../../test/bo/1.png",
    "./yollava-data/test/../../../etc/1.png",
    "./yollava-data/test/bo/../../../1.png",
    "C:/data/test/bo/1.png",
    "yollava-data\\test\\bo\\1.png",
    "./yollava-data/val/bo/1.png",
    "bo/1.png",
    "./yollava-data/test/bo/1.txt",
    "",
])
def test_resolve_refuses_bad_paths(tmp_path, raw):
    with pytest.raises(DatasetError) as err:
        resolve_image_path(tmp_path, raw)
    assert repr(raw) in str(err.value)


def test_symlink_out_of_root_is_refused(tmp_path):
    outside = write_png(tmp_path / "secret" / "x.png")
    root = tmp_path / "root"
    (root / "test" / "bo").mkdir(parents=True)
    (root / "test" / "bo" / "1.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside the dataset root"):
        resolve_image_path(root, "./yollava-data/test/bo/1.png")
    with pytest.raises(DatasetError, match=r"1\.png.*outside the dataset root"):
        YollavaDataset.load(root)


def test_symlinked_subject_folder_out_of_root_is_refused(tmp_path):
    write_png(tmp_path / "secret" / "x.png")
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    (root / "train" / "bo").symlink_to(tmp_path / "secret")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        YollavaDataset.load(root)


def test_escaping_qa_path_fails_the_load_naming_it(root):
    write_json(root / "yollava-visual-qa.json",
               {"bo": {"./yollava-data/test/../../../etc/passwd.png": qa_entry()}})
    with pytest.raises(DatasetError, match=r"etc/passwd\.png"):
        YollavaDataset.load(root)


# --- json validation -------------------------------------------------------------------------


@pytest.mark.parametrize("entry, field", [
    ("not an object", "entry must be an object"),
    ({"options": {"A": "x", "B": "y"}, "correct_answer": "A"}, "'question'"),
    (qa_entry(question=3), "'question'"),
    (qa_entry(options=["x", "y"]), "'options'"),
    (qa_entry(options={"A": "x"}), "'options'"),
    (qa_entry(options={"A": "x", "B": 2}), "'options' value for 'B'"),
    (qa_entry(answer="C"), "'correct_answer'"),
    (qa_entry(answer=0), "'correct_answer'"),
])
def test_read_visual_qa_names_subject_image_and_field(tmp_path, entry, field):
    path = write_json(tmp_path / "qa.json", {"bo": {"./yollava-data/test/bo/0.png": entry}})
    with pytest.raises(DatasetError) as err:
        read_visual_qa(path)
    message = str(err.value)
    assert "'bo'" in message and "'./yollava-data/test/bo/0.png'" in message and field in message


@pytest.mark.parametrize("data, match", [
    ([], "top level must be an object"),
    ({"bo": ["x"]}, "subject 'bo' must map"),
])
def test_read_visual_qa_rejects_wrong_shapes(tmp_path, data, match):
    with pytest.raises(DatasetError, match=match):
        read_visual_qa(write_json(tmp_path / "qa.json", data))


def test_read_json_rejects_invalid_json_and_duplicate_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json.*not valid json"):
        read_visual_qa(bad)
    dup = tmp_path / "dup.json"
    dup.write_text('{"bo": {"test/bo/0.png": {}, "test/bo/0.png": {}}}')
    with pytest.raises(DatasetError, match="duplicate json key 'test/bo/0.png'"):
        read_visual_qa(dup)


@pytest.mark.parametrize("data, match", [
    ([], "top level must be an object"),
    ({"./data/train/bo/1.png": {"Human": "q", "AI": "a"}}, "must be a list of turns"),
    ({"./data/train/bo/1.png": ["q"]}, "turn 0: must be an object"),
    ({"./data/train/bo/1.png": [{"Human": "q"}]}, "turn 0: field 'AI'"),
    ({"./data/train/bo/1.png": [{"Human": "q", "AI": "a"}, {"Human": 1, "AI": "a"}]},
     "image './data/train/bo/1.png' turn 1: field 'Human'"),
])
def test_read_conversations_rejects_wrong_shapes(tmp_path, data, match):
    with pytest.raises(DatasetError, match=match):
        read_conversations(write_json(tmp_path / "c.json", data))


# --- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, color", [("RGB", (1, 2, 3)), ("RGBA", (1, 2, 3, 4)), ("L", 7),
                                         ("P", 1)])
def test_load_image_returns_rgb(tmp_path, mode, color):
    image = load_image(write_png(tmp_path / "a.png", size=(5, 4), mode=mode, color=color))
    assert image.mode == "RGB" and image.size == (5, 4)


def test_load_image_refuses_non_images(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    with pytest.raises(DatasetError, match="fake.png.*not a decodable image"):
        load_image(fake)


def test_load_image_refuses_truncated_file(tmp_path):
    path = write_png(tmp_path / "t.png", size=(64, 64))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="t.png"):
        load_image(path)


def test_load_image_refuses_too_many_pixels(tmp_path):
    path = write_png(tmp_path / "big.png", size=(100, 100))
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(DatasetError, match=r"big.png.*100x100.*max_pixels=9999"):
        load_image(path, max_pixels=9_999)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


# --- the real Yo'LLaVA files -----------------------------------------------------------------


def test_real_visual_qa_json():
    items = read_visual_qa(REAL / "yollava-visual-qa.json")
    subjects = {q.subject for q in items}
    assert len(subjects) == 40 and len(items) == 170
    assert sum(q.subject == "bo" for q in items) == 8
    for q in items:
        assert set(q.options) == {"A", "B"} and q.answer in q.options
        assert "<sks>" in q.question
        # every path maps onto test/<its own subject>/ under a root
        assert resolve_image_path(Path("/r"), q.image).parts[-3:-1] == ("test", q.subject)


def test_real_conversation_json():
    convs = read_conversations(REAL / "bo-text-only-conversation.json")
    assert [c.image for c in convs] == ["./data/train/bo/3.png", "./data/train/bo/1.png",
                                        "./data/train/bo/6.png", "./data/train/bo/4.png"]
    assert all(len(c.turns) == 10 for c in convs)
    assert all("<bo>" in t.human for c in convs for t in c.turns)


def test_real_files_load_in_a_tree(tmp_path):
    """The real json files in place, with stand-in photos for `bo`."""
    root = tmp_path / "yollava-data"
    root.mkdir()
    shutil.copy(REAL / "yollava-visual-qa.json", root / "yollava-visual-qa.json")
    shutil.copy(REAL / "bo-text-only-conversation.json", root / "bo-text-only-conversation.json")
    bo_paths = [q.image for q in read_visual_qa(REAL / "yollava-visual-qa.json")
                if q.subject == "bo"]
    for raw in bo_paths:
        write_png(resolve_image_path(root, raw))
    for i in (1, 3, 4, 6):
        write_png(root / "train" / "bo" / f"{i}.png")
    ds = YollavaDataset.load(root, subjects=["bo"])
    assert len(ds.qa) == 8 and all("<bo>" in q.question for q in ds.qa)
    assert [c.image.name for c in ds.conversations["bo"]] == ["1.png", "3.png", "4.png", "6.png"]
