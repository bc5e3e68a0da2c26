"""MMSA / MulT / .npz loaders on small files written in the exact real layouts, and their errors."""
import os
import pickle

import ml_collections
import numpy as np
import pytest

from alignmamba_jax.data import layouts, load_features_npz, load_mmsa_pickle, load_mult_pickle, load_splits
from alignmamba_jax.data import save_features_npz

SPLITS = ("train", "valid", "test")


def _expected_mmsa(raw, aligned):
    """Independent reference: what the contract says the loader must return for one raw MMSA split."""
    text_mask = raw["text_bert"][:, 1, :] > 0
    exp = {"text": raw["text"], "text_mask": text_mask, "labels": raw["regression_labels"],
           "ids": np.array([str(v) for v in raw["id"]])}
    for m in ("audio", "vision"):
        x = np.array(raw[m])
        x[~np.isfinite(x)] = 0.0
        exp[m] = x
        if aligned:
            exp[m + "_mask"] = text_mask
        else:
            t = x.shape[1]
            exp[m + "_mask"] = np.array([[i < n for i in range(t)] for n in raw[m + "_lengths"]])
    return exp


@pytest.mark.parametrize("dataset,aligned", [("mosi", False), ("mosi", True), ("mosei", False), ("mosei", True)])
def test_mmsa_layouts_load(tmp_path, dataset, aligned):
    path = tmp_path / f"{'aligned' if aligned else 'unaligned'}_50.pkl"
    raw = layouts.write_mmsa_pickle(path, dataset, aligned, sizes=(4, 2, 3), seed=1)
    splits, stats = load_mmsa_pickle(path, return_stats=True)
    assert set(splits) == set(SPLITS)
    for s in SPLITS:
        exp = _expected_mmsa(raw[s], aligned)
        got = splits[s]
        assert set(got) == set(exp)
        for k, v in exp.items():
            assert got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        for m, (t, d) in layouts.MMSA_SHAPES[(dataset, aligned)].items():
            assert got[m].dtype == np.float32 and got[m].shape[1:] == (t, d)
            assert got[m + "_mask"].dtype == np.bool_
        assert stats[f"{s}/audio_non_finite"] == int((~np.isfinite(raw[s]["audio"])).sum()) > 0
        assert stats[f"{s}/vision_non_finite"] == 0


def test_mmsa_cache_dir_memory_maps_same_values(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    layouts.write_mmsa_pickle(path, "mosei", False, sizes=(3, 2, 2), seed=2)
    direct = load_mmsa_pickle(path)
    cache = tmp_path / "cache"
    cached, stats = load_mmsa_pickle(path, cache_dir=cache, return_stats=True)
    again = load_mmsa_pickle(path, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []
    assert sum(v for k, v in stats.items() if "audio" in k) > 0
    for s in SPLITS:
        for k, v in direct[s].items():
            np.testing.assert_array_equal(cached[s][k], v, err_msg=k)
            np.testing.assert_array_equal(again[s][k], v, err_msg=k)
        assert isinstance(cached[s]["audio"], np.memmap) and not cached[s]["audio"].flags.writeable


@pytest.mark.parametrize("protocol", [2, 5])
def test_mmsa_other_pickle_protocols(tmp_path, protocol):
    path = tmp_path / "p.pkl"
    raw = layouts.write_mmsa_pickle(path, "mosi", True, sizes=(2, 2, 2), seed=3, protocol=protocol)
    for cache in (None, tmp_path / "c"):
        got = load_mmsa_pickle(path, cache_dir=cache)
        np.testing.assert_array_equal(got["test"]["text"], raw["test"]["text"])


def test_mult_layout_left_padding_becomes_right_padding(tmp_path):
    path = tmp_path / "mosi_data_noalign.pkl"
    raw = layouts.write_mult_pickle(path, "mosi", aligned=False, sizes=(3, 2, 2), seed=4, left_pad=True)
    splits = load_mult_pickle(path)
    for s in SPLITS:
        for m in ("text", "audio", "vision"):
            x = np.nan_to_num(raw[s][m], nan=0.0)
            for i in range(x.shape[0]):
                valid_rows = [row for row in x[i] if np.any(row != 0)]
                n = len(valid_rows)
                assert splits[s][m + "_mask"][i].tolist() == [True] * n + [False] * (x.shape[1] - n)
                np.testing.assert_array_equal(splits[s][m][i, :n], np.array(valid_rows))
                assert not np.any(splits[s][m][i, n:])
        np.testing.assert_array_equal(splits[s]["labels"], raw[s]["labels"][:, 0, 0])
        assert splits[s]["ids"][1] == "video1$_$1$_$2"


def test_features_npz_round_trip_and_load_splits(tmp_path):
    rng = np.random.default_rng(0)
    splits = {}
    for s, n in zip(SPLITS, (5, 3, 3)):
        lengths = rng.integers(1, 7, n)
        splits[s] = {"image": rng.standard_normal((n, 4, 3)).astype(np.float32),
                     "image_mask": np.ones((n, 4), bool),
                     "text": rng.standard_normal((n, 6, 2)).astype(np.float32),
                     "text_mask": np.arange(6)[None] < lengths[:, None],
                     "labels": rng.integers(0, 3, n).astype(np.int32),
                     "ids": np.array([f"{s}{i}" for i in range(n)])}
    save_features_npz(tmp_path, splits)
    got = load_features_npz(tmp_path)
    cfg = ml_collections.ConfigDict(dict(name="features_npz", path=str(tmp_path), modalities=("image", "text"),
                                         task="classification", num_classes=3))
    via_config = load_splits(cfg)
    for s in SPLITS:
        for k, v in splits[s].items():
            np.testing.assert_array_equal(got[s][k], v, err_msg=k)
            np.testing.assert_array_equal(via_config[s][k], v, err_msg=k)


def test_load_splits_mmsa_selects_modalities(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    layouts.write_mmsa_pickle(path, "mosi", True, sizes=(2, 2, 2))
    cfg = ml_collections.ConfigDict(dict(name="mmsa", path=str(path), modalities=("text", "vision"),
                                         task="regression", num_classes=1))
    got = load_splits(cfg)
    assert sorted(got["train"]) == ["ids", "labels", "text", "text_mask", "vision", "vision_mask"]


# ---- bad input: errors name the file, the split and the key ------------------------------------------------

def _mutated(tmp_path, mutate):
    path = tmp_path / "unaligned_50.pkl"
    data = layouts.write_mmsa_pickle(path, "mosi", False, sizes=(3, 2, 2), seed=5)
    mutate(data)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def _drop_key(d):
    del d["valid"]["vision_lengths"]


def _wrong_shape(d):
    d["test"]["audio"] = d["test"]["audio"][:, :, :, None]


def _label_range(d):
    d["train"]["regression_labels"][1] = 3.5


def _label_nan(d):
    d["valid"]["regression_labels"][0] = np.nan


def _lengths_negative(d):
    d["train"]["audio_lengths"][0] = -1


@pytest.mark.parametrize("mutate,split,key,detail", [
    (_drop_key, "valid", "vision_lengths", "missing key"),
    (_wrong_shape, "test", "audio", "expected shape"),
    (_label_range, "train", "regression_labels", "[-3.0, 3.0]"),
    (_label_nan, "valid", "regression_labels", "NaN"),
    (_lengths_negative, "train", "audio_lengths", ">= 0"),
])
@pytest.mark.parametrize("cached", [False, True])
def test_mmsa_bad_input_names_file_split_key(tmp_path, mutate, split, key, detail, cached):
    path = _mutated(tmp_path, mutate)
    cache = tmp_path / "cache" if cached else None
    with pytest.raises(ValueError) as e:
        load_mmsa_pickle(path, cache_dir=cache)
    msg = str(e.value)
    assert str(path) in msg and f":{split}" in msg and repr(key) in msg and detail in msg, msg
    if cached:   # no conversion (finished or half-written) is left; the lock and the content digest may be
        assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-") or p.is_dir()]


def test_mmsa_lengths_beyond_padding_are_clipped(tmp_path, caplog):
    def too_long(d):
        d["train"]["audio_lengths"][0] = 400
    path = _mutated(tmp_path, too_long)
    got = load_mmsa_pickle(path)
    assert got["train"]["audio_mask"][0].all() and "clipped" in caplog.text


def test_mmsa_missing_split(tmp_path):
    path = _mutated(tmp_path, lambda d: d.pop("test"))
    with pytest.raises(ValueError, match="missing key 'test'"):
        load_mmsa_pickle(path)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", None])
def test_truncated_or_non_pickle_file(tmp_path, content):
    path = tmp_path / "unaligned_50.pkl"
    if content is None:  # truncated real file
        layouts.write_mmsa_pickle(path, "mosi", False, sizes=(2, 2, 2))
        content = path.read_bytes()[: os.path.getsize(path) // 2]
    path.write_bytes(content)
    for loader in (load_mmsa_pickle, load_mult_pickle):
        with pytest.raises(ValueError, match="not a readable pickle") as e:
            loader(path)
        assert str(path) in str(e.value)


def test_mult_bad_labels_shape(tmp_path):
    path = tmp_path / "m.pkl"
    data = layouts.write_mult_pickle(path, sizes=(2, 2, 2))
    data["test"]["labels"] = np.zeros((2, 4, 2), np.float32)  # IEMOCAP-style labels are not sentiment
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"m.pkl:test: key 'labels': expected shape"):
        load_mult_pickle(path)


def test_features_npz_errors(tmp_path):
    with pytest.raises(ValueError, match="train.npz: no such file"):
        load_features_npz(tmp_path)
    for s in SPLITS:
        np.savez(tmp_path / f"{s}.npz", image=np.zeros((2, 3, 4), np.float32), labels=np.array([0, 1]))
    np.savez(tmp_path / "valid.npz", image=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"valid.npz: missing key 'labels'"):
        load_features_npz(tmp_path)
    (tmp_path / "valid.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="valid.npz: not a readable .npz"):
        load_features_npz(tmp_path)


def test_load_splits_config_errors():
    with pytest.raises(ValueError, match="data.name"):
        load_splits(ml_collections.ConfigDict(dict(name="nope")))
    with pytest.raises(ValueError, match="data.path"):
        load_splits(ml_collections.ConfigDict(dict(name="mmsa", path="")))


def test_load_splits_mult(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    raw = layouts.write_mult_pickle(path, sizes=(3, 2, 2), left_pad=False)
    got = load_splits(ml_collections.ConfigDict(dict(name="mult", path=str(path), modalities=("text", "audio"),
                                                     task="regression")))
    np.testing.assert_array_equal(got["valid"]["labels"], raw["valid"]["labels"].reshape(-1))
    assert sorted(got["valid"]) == ["audio", "audio_mask", "ids", "labels", "text", "text_mask"]
