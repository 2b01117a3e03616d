"""Preference readers on small generated Pick-a-Pic parquet / HPDv2 json / JSONL files: the preferred image is the one
people chose, ties are dropped, a corrupt image or a missing file raises an error naming the record (or is skipped
and counted with on_error="skip"), and batches come out in [-1, 1]."""
import io
import json
import sys

import pytest
import torch
from PIL import Image

from prefs import HPD, Excluding, JSONLPrefs, PickAPic, PrefsError, image_to_tensor, open_prefs, pref_batches

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def image_bytes(color, fmt="PNG", size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def color(image: Image.Image) -> tuple:
    """The centre pixel rounded to a pure colour (JPEG shifts values a little)."""
    return tuple(255 if v > 127 else 0 for v in image.getpixel((image.width // 2, image.height // 2)))


@pytest.fixture
def parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [  # (caption, jpg_0, jpg_1, label_0, label_1); chosen is always red
        ("first", image_bytes(RED, "JPEG"), image_bytes(BLUE, "JPEG"), 1.0, 0.0),
        ("tie", image_bytes(RED), image_bytes(BLUE), 0.5, 0.5),
        ("second", image_bytes(BLUE), image_bytes(RED), 0.0, 1.0),
        ("corrupt", b"\xff\xd8 not a jpeg", image_bytes(RED), 0.0, 1.0),
        ("third", image_bytes(RED), image_bytes(GREEN), 1.0, 0.0),
    ]
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(columns)} | {"best_image_uid": ["x"] * len(rows)})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 1), tmp_path / "data" / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(2, 1), tmp_path / "data" / "validation-00000-of-00001.parquet")  # not in 'train'
    return tmp_path / "data"


def test_pickapic_streams_preferred_drops_ties_and_names_corrupt_rows(parquet):
    with pytest.raises(PrefsError, match=r"train-00000-of-00002.parquet row 3 jpg_0: unreadable image bytes"):
        list(PickAPic(str(parquet)))
    reader = open_prefs(str(parquet), on_error="skip")
    assert isinstance(reader, PickAPic) and len(reader.files) == 2  # train shards only
    pairs = list(reader)
    assert [p.prompt for p in pairs] == ["first", "second", "third", "first"]
    assert all(color(p.chosen) == RED for p in pairs)
    assert [p.where for p in pairs][:3] == ["train-00000-of-00002.parquet row 0", "train-00000-of-00002.parquet row 2",
                                            "train-00000-of-00002.parquet row 4"]
    assert (reader.yielded, reader.ties, reader.skipped) == (4, 1, 1)
    assert len(list(reader)) == 4 and reader.yielded == 4  # a second epoch, counters restarted


def test_pickapic_rejects_bad_labels_and_foreign_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [image_bytes(RED)], "jpg_1": [image_bytes(BLUE)],
                             "label_0": [1.0], "label_1": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(PrefsError, match=r"bad.parquet row 0: labels .* = \(1.0, 1.0\)"):
        list(PickAPic(str(tmp_path / "bad.parquet")))
    pq.write_table(pa.table({"caption": ["c"]}), tmp_path / "other.parquet")
    with pytest.raises(PrefsError, match=r"other.parquet: not a Pick-a-Pic shard, missing columns \['jpg_0'"):
        list(PickAPic(str(tmp_path / "other.parquet")))


def test_pyarrow_missing_is_a_clear_error(parquet, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow"):
        PickAPic(str(parquet))


@pytest.fixture
def folder(tmp_path):
    """HPDv2 layout (train.json + train/) and a JSONL file, sharing images; one file is missing, one corrupt."""
    (tmp_path / "train").mkdir()
    for name, c in [("r.png", RED), ("b.png", BLUE), ("g.png", GREEN)]:
        Image.new("RGB", (12, 8), c).save(tmp_path / "train" / name)
    (tmp_path / "train" / "broken.png").write_bytes(image_bytes(RED)[:40])  # truncated PNG
    entries = [{"prompt": "a", "file_path": ["b.png", "r.png"], "human_preference": [0, 1]},
               {"prompt": "tie", "file_path": ["b.png", "r.png"], "human_preference": [1, 1]},
               {"prompt": "gone", "file_path": ["r.png", "nowhere.png"], "human_preference": [1, 0]},
               {"prompt": "three", "file_path": ["g.png", "r.png", "b.png"], "human_preference": [0, 1, 0]}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    lines = [{"prompt": "x", "chosen": "train/r.png", "rejected": "train/b.png"},
             {"prompt": "y", "chosen": "train/broken.png", "rejected": "train/b.png"},
             {"prompt": "z", "chosen": "train/r.png", "rejected": "train/g.png"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n{oops\n")
    return tmp_path


def test_hpd_reader(folder):
    with pytest.raises(PrefsError, match=r"train.json entry 2: missing image file .*train/nowhere.png"):
        list(open_prefs(str(folder / "train.json")))
    reader = open_prefs(str(folder), on_error="skip")
    assert isinstance(reader, HPD) and reader.image_root == str(folder / "train")
    pairs = list(reader)
    assert [(p.prompt, color(p.chosen), color(p.rejected)) for p in pairs] == [
        ("a", RED, BLUE), ("three", RED, GREEN), ("three", RED, BLUE)]
    assert (reader.yielded, reader.ties, reader.skipped) == (3, 1, 1)


def test_jsonl_reader(folder):
    with pytest.raises(PrefsError, match=r"pairs.jsonl line 2: unreadable image file .*broken.png"):
        list(JSONLPrefs(str(folder / "pairs.jsonl")))
    reader = open_prefs(str(folder / "pairs.jsonl"), on_error="skip")
    assert [(p.prompt, color(p.chosen), color(p.rejected)) for p in reader] == [("x", RED, BLUE), ("z", RED, GREEN)]
    assert (reader.yielded, reader.skipped) == (2, 2)  # the broken image and the "{oops" line 5
    (folder / "bad.jsonl").write_text('{"prompt": "p", "chosen": "train/r.png"}\n')
    with pytest.raises(PrefsError, match=r"bad.jsonl line 1: expected string fields prompt, chosen, rejected"):
        list(JSONLPrefs(str(folder / "bad.jsonl")))


def test_open_prefs_rejects_unknown(tmp_path):
    with pytest.raises(PrefsError, match="no such file"):
        open_prefs(str(tmp_path / "none"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(PrefsError, match="not a preference data set"):
        open_prefs(str(tmp_path))
    with pytest.raises(ValueError, match="on_error"):
        JSONLPrefs(str(tmp_path / "a.txt"), on_error="ignore")


def test_pref_batches(folder):
    batches = list(pref_batches(JSONLPrefs(str(folder / "pairs.jsonl"), on_error="skip"), 1, 16, rejected=True))
    assert len(batches) == 2 and batches[0]["prompts"] == ["x"]
    chosen, rejected = batches[0]["chosen"], batches[0]["rejected"]
    assert chosen.shape == rejected.shape == (1, 3, 16, 16) and chosen.dtype == torch.float32
    assert torch.allclose(chosen[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # red in [-1, 1]
    assert torch.allclose(rejected[0, :, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    hpd = HPD(str(folder / "train.json"), "skip")
    assert [len(b["prompts"]) for b in pref_batches(hpd, 2, 8)] == [2, 1]
    assert [len(b["prompts"]) for b in pref_batches(hpd, 2, 8, drop_last=True)] == [2]
    x = image_to_tensor(Image.new("RGB", (30, 10), (255, 255, 255)), 8)  # non-square: short side to 8, center crop
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones_like(x))


def test_excluding_drops_evaluation_prompts_and_an_emptied_set_stops_training(folder):
    from prefs import stream
    reader = Excluding(JSONLPrefs(str(folder / "pairs.jsonl"), on_error="skip"), [" z "])
    assert [p.prompt for p in reader] == ["x"] and reader.excluded == 1
    assert [p.prompt for p in reader] == ["x"] and reader.excluded == 1  # counts are per pass
    empty = Excluding(JSONLPrefs(str(folder / "pairs.jsonl"), on_error="skip"), ["x", "z"])
    with pytest.raises(ValueError, match="fewer pairs than one batch of 1"):  # not an endless loop
        next(stream(empty, 1, 8, 0))


def test_toy_l_g_data_holds_no_prompt_the_hypernetwork_is_scored_on():
    import config
    from toy import world
    cfg = config.RunConfig()
    train, sets = config.read_prompts(cfg.prompts), config.eval_sets(cfg)
    reader = config.load_prefs(cfg, train, [p for ps in sets.values() for p in ps])
    scored = set(world.prompts("unseen")) | set(world.prompts("heldout"))
    assert set(sets) == {"unseen", "heldout"} and set(sets["unseen"]) | set(sets["heldout"]) == scored
    seen = {p.prompt for p in reader}
    assert not seen & (scored | set(world.prompts("val"))) and seen <= set(world.prompts("hyper-train"))
    assert reader.excluded == 1948  # the shipped pairs of the 'val' and 'unseen' prompts: 1948 of 4000
