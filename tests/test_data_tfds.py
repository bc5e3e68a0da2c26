"""TFDS array_record build from an MMSA pickle (no TensorFlow), read back, and grain batches per process."""
import os
import pickle
import sys

import numpy as np
import pytest

from alignmamba_jax.data import grain_pipeline, layouts, load_mmsa_pickle, tfds_builders

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    manual = root / "downloads" / "manual"
    manual.mkdir(parents=True)
    layouts.write_mmsa_pickle(manual / "unaligned_50.pkl", "mosi", False, sizes=(11, 3, 4), seed=7)
    mp = pytest.MonkeyPatch()
    mp.setattr(tfds_builders, "_SHARD_BYTES", 4 * 210_000)  # ~4 MOSI examples per shard: 3 train shards
    builder = tfds_builders.prepare("mosi", root)
    mp.undo()
    return root, builder


def test_sharded_files_written(built):
    root, builder = built
    assert builder.info.splits["train"].num_shards == 3
    assert builder.info.splits["train"].shard_lengths == [4, 4, 3]
    files = os.listdir(builder.data_dir)
    assert "dataset_info.json" in files and sum("train.array_record" in f for f in files) == 3


def test_generator_builder_path_writes_the_same_records(built, tmp_path):
    root, _ = built
    builder = tfds_builders.MmsaMosi(data_dir=tmp_path, config="unaligned", file_format="array_record")
    builder.download_and_prepare(download_config=tfds_builders.tfds.download.DownloadConfig(
        manual_dir=os.fspath(root / "downloads" / "manual")))
    theirs = builder.as_data_source()
    ours = tfds_builders.prepare("mosi", root).as_data_source()
    for s in SPLITS:
        assert len(theirs[s]) == len(ours[s])
        for i in range(len(ours[s])):
            a, b = theirs[s][i], ours[s][i]
            assert a.keys() == b.keys() and a["ids"] == b["ids"]
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_round_trip_equals_pickle(built):
    root, builder = built
    expected = load_mmsa_pickle(root / "downloads" / "manual" / "unaligned_50.pkl")
    got = tfds_builders.load_tfds_splits("mosi", root)
    for s in SPLITS:
        assert set(got[s]) == set(expected[s])
        for k, v in expected[s].items():
            assert got[s][k].dtype == v.dtype or k == "ids", k
            np.testing.assert_array_equal(got[s][k], v, err_msg=f"{s}/{k}")
    assert "tensorflow" not in sys.modules
    assert not [p for p in os.listdir(root) if p.startswith(".tmp")]


def _batches(source, process_index, seed):
    loader = grain_pipeline.make_loader(source, batch_size=2, seed=seed, process_index=process_index,
                                        process_count=2)
    return [b["ids"].tolist() for b in loader]


def test_grain_two_processes_disjoint_and_deterministic(built):
    _, builder = built
    source = builder.as_data_source()["train"]
    p0, p1 = _batches(source, 0, seed=3), _batches(source, 1, seed=3)
    assert p0 == _batches(source, 0, seed=3) and p1 == _batches(source, 1, seed=3)
    ids0, ids1 = sum(p0, []), sum(p1, [])
    assert len(p0) == len(p1) == 2 and all(len(b) == 2 for b in p0 + p1)  # 11 records -> 5 per shard
    assert not set(ids0) & set(ids1)
    assert len(set(ids0)) == len(ids0) and len(set(ids1)) == len(ids1)
    assert set(ids0) | set(ids1) <= {str(v) for v in load_mmsa_pickle(
        built[0] / "downloads" / "manual" / "unaligned_50.pkl")["train"]["ids"]}
    assert _batches(source, 0, seed=4) != p0  # the seed shuffles


def test_grain_batch_values_match_records(built):
    _, builder = built
    source = builder.as_data_source()["valid"]
    batch = next(iter(grain_pipeline.make_loader(source, batch_size=3, shuffle=False, process_index=0,
                                                 process_count=1)))
    for i in range(3):
        np.testing.assert_array_equal(batch["audio"][i], source[i]["audio"])
        assert batch["ids"][i] == source[i]["ids"].decode()


def test_failed_build_leaves_nothing(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    data = layouts.write_mmsa_pickle(manual / "unaligned_50.pkl", "mosi", False, sizes=(3, 2, 2))
    data["test"]["regression_labels"][1] = np.nan
    (manual / "unaligned_50.pkl").write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(ValueError, match=r"unaligned_50.pkl:test: key 'regression_labels'.*NaN"):
        tfds_builders.prepare("mosi", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["downloads"]
    assert os.listdir(tmp_path / "downloads") == ["manual"]


def test_wrong_widths_for_builder(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    layouts.write_mmsa_pickle(manual / "unaligned_50.pkl", "mosei", False, sizes=(2, 2, 2))
    with pytest.raises(ValueError, match=r"'audio': expected shape \(N, 375, 5\) for mmsa_mosi/unaligned"):
        tfds_builders.prepare("mosi", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["downloads"]


def test_missing_manual_file_explains_where_to_get_it(tmp_path):
    with pytest.raises(Exception, match="thuiar/MMSA"):
        tfds_builders.prepare("mosei", tmp_path, config="aligned")
    assert [p for p in os.listdir(tmp_path) if p != "downloads"] == []


def test_load_splits_tfds_config(built):
    import ml_collections
    from alignmamba_jax.data import load_splits
    root, _ = built
    cfg = ml_collections.ConfigDict(dict(name="tfds", path=str(root), tfds_name="mosi", tfds_config="unaligned",
                                         modalities=("text", "audio", "vision"), task="regression",
                                         num_classes=1))
    got = load_splits(cfg)
    want = load_mmsa_pickle(root / "downloads" / "manual" / "unaligned_50.pkl")
    for s in SPLITS:
        for k, v in want[s].items():
            np.testing.assert_array_equal(got[s][k], v, err_msg=f"{s}/{k}")
