"""Checks every loader gets from `load_splits` before any compilation: splits that disagree with each other,
empty splits, non-finite labels, masks that are not right padded, and a data.path of the wrong kind. Every
error is a UserError naming the file, the split, the key, the expected and the found value.

The files are written here, small, in the exact real layouts (`alignmamba_jax.data.layouts`).
"""
import os
import pickle

import ml_collections
import numpy as np
import pytest

from alignmamba_jax.data import layouts, load_splits, save_features_npz
from alignmamba_jax.config import default_synthetic_config
from alignmamba_jax.errors import UserError

MODALITIES = ("text", "audio", "vision")


def mmsa_file(tmp_path, mutate=lambda d: None, sizes=(4, 2, 2), name="unaligned_50.pkl"):
    path = tmp_path / name
    data = layouts.write_mmsa_pickle(path, "mosi", False, sizes=sizes, seed=7)
    mutate(data)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def mult_file(tmp_path, mutate=lambda d: None, sizes=(4, 2, 2)):
    path = tmp_path / "mosi_data.pkl"
    data = layouts.write_mult_pickle(path, sizes=sizes, seed=7)
    mutate(data)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def npz_dir(tmp_path, mutate=lambda d: None, sizes=(4, 2, 2)):
    rng = np.random.default_rng(0)
    splits = {}
    for s, n in zip(("train", "valid", "test"), sizes):
        splits[s] = {"image": rng.standard_normal((n, 4, 3)).astype(np.float32), "image_mask": np.ones((n, 4), bool),
                     "text": rng.standard_normal((n, 6, 2)).astype(np.float32),
                     "text_mask": np.arange(6)[None] < rng.integers(1, 7, n)[:, None],
                     "labels": rng.integers(0, 3, n).astype(np.int32)}
    mutate(splits)
    directory = tmp_path / "features"
    save_features_npz(directory, splits)
    return directory


def tfds_dir(tmp_path, mutate=lambda d: None, sizes=(4, 2, 2)):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    mmsa_file(manual, mutate, sizes)
    return tmp_path / "tfds"


def data_config(name, path, **extra):
    modalities = ("image", "text") if name == "features_npz" else MODALITIES
    task = "classification" if name == "features_npz" else "regression"
    return ml_collections.ConfigDict(dict(name=name, path=str(path), modalities=modalities, task=task,
                                          num_classes=3 if task == "classification" else 1, tfds_name="mosi",
                                          tfds_config="unaligned", cache_dir="", **extra))


def narrow_test_audio(data):
    data["test"]["audio"] = np.ascontiguousarray(data["test"]["audio"][:, :, :3])


def narrow_test_text(splits):
    splits["test"]["text"] = splits["test"]["text"][:, :, :1]


WRITERS = {"mmsa": (mmsa_file, narrow_test_audio, "audio", 5, 3), "mult": (mult_file, narrow_test_audio, "audio", 5, 3),
           "tfds": (tfds_dir, narrow_test_audio, "audio", 5, 3),
           "features_npz": (npz_dir, narrow_test_text, "text", 2, 1)}


@pytest.mark.parametrize("name", list(WRITERS))
def test_feature_width_that_differs_between_splits_is_an_error_naming_file_split_key(tmp_path, name):
    write, mutate, key, expected, found = WRITERS[name]
    path = write(tmp_path, mutate)
    with pytest.raises(UserError) as error:
        load_splits(data_config(name, path))
    message = str(error.value)
    assert str(path) in message and ":test" in message and repr(key) in message, message
    assert f"expected feature width {expected} (as in split 'train'), found {found}" in message, message
    if name == "tfds":  # nothing half-built is left behind
        assert sorted(p.name for p in path.iterdir()) == ["downloads"]


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split_is_an_error_naming_the_split(tmp_path, name, split):
    write = WRITERS[name][0]
    sizes = (0, 2, 2) if split == "train" else (4, 2, 0)
    path = write(tmp_path, sizes=sizes)
    with pytest.raises(UserError, match=rf"{split}: expected at least 1 example, found an empty split") as error:
        load_splits(data_config(name, path))
    assert str(path) in str(error.value)


def test_empty_synthetic_split_is_an_error():
    config = ml_collections.ConfigDict(dict(name="synthetic", modalities=MODALITIES, task="regression",
                                            synthetic=default_synthetic_config()))
    config.synthetic.update(n_train=8, n_valid=0, n_test=4, text_len=12, text_dim=16, audio_len=20, vision_len=24,
                            min_words=3, max_words=8)
    with pytest.raises(UserError, match=r"synthetic::valid: expected at least 1 example"):
        load_splits(config)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_label_is_an_error(tmp_path, value):
    def bad_label(data):
        data["valid"]["regression_labels"][1] = value
    path = mmsa_file(tmp_path, bad_label)
    with pytest.raises(UserError, match=r"unaligned_50.pkl:valid: key 'regression_labels': expected finite labels, "
                                        r"found 1 NaN / inf \(first at index 1"):
        load_splits(data_config("mmsa", path))


def test_mask_that_is_not_right_padded_is_an_error(tmp_path):
    def hole_in_attention_mask(data):
        data["train"]["text_bert"][2, 1, 1] = 0   # the token after [CLS] marked as padding, later ones valid
    path = mmsa_file(tmp_path, hole_in_attention_mask)
    with pytest.raises(UserError, match=r"unaligned_50.pkl:train: key 'text_mask': expected right padding .* in 1 "
                                        r"examples \(first: example 2, step 2\)"):
        load_splits(data_config("mmsa", path))


@pytest.mark.parametrize("name", ["mmsa", "mult"])
def test_directory_given_for_a_pickle_says_so_and_lists_the_pickles_there(tmp_path, name):
    mmsa_file(tmp_path)
    with pytest.raises(UserError, match=rf"data.path='{tmp_path}' is a directory; data.name='{name}' expects .*pickle"
                                        rf".*\(pickles in that directory: unaligned_50.pkl\)"):
        load_splits(data_config(name, tmp_path))


@pytest.mark.parametrize("name", ["features_npz", "tfds"])
def test_file_given_for_a_directory_says_so(tmp_path, name):
    path = mmsa_file(tmp_path)
    with pytest.raises(UserError, match=rf"data.path='{path}' is a file; data.name='{name}' expects .*directory"):
        load_splits(data_config(name, path))


@pytest.mark.parametrize("name", ["mmsa", "features_npz"])
def test_missing_path_says_what_the_loader_expects(tmp_path, name):
    path = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"data.path='{path}' does not exist; data.name='{name}' expects"):
        load_splits(data_config(name, path))
    assert not os.path.exists(path)


def zero_length_audio(data):
    for split in data.values():
        split["audio"] = split["audio"][:, :0]
        split["audio_lengths"] = [0] * len(split["audio_lengths"])


def ragged_audio(data):
    data["train"]["audio"] = [np.zeros((3 + i, 5), np.float32) for i in range(len(data["train"]["audio"]))]


def non_utf8_ids(data):
    data["valid"]["id"] = np.array([b"clip\xff", b"clip2"])


@pytest.mark.parametrize("mutate, expected", [
    (zero_length_audio, r"unaligned_50.pkl:train: key 'audio': expected a padded length T >= 1, found shape \(4, 0, 5\)"),
    (ragged_audio, r"unaligned_50.pkl:train: key 'audio': expected an array of shape \(N, T, d\), found ragged nested "
                   r"sequences"),
    (non_utf8_ids, r"unaligned_50.pkl:valid: key 'id': expected UTF-8 text ids, found bytes b'clip\\xff' at index 0"),
], ids=["zero_length", "ragged", "non_utf8_ids"])
@pytest.mark.parametrize("cached", [False, True])
def test_malformed_features_and_ids_are_one_line_errors(tmp_path, mutate, expected, cached):
    path = mmsa_file(tmp_path, mutate)
    config = data_config("mmsa", path)
    config.cache_dir = str(tmp_path / "cache") if cached else ""
    with pytest.raises(UserError, match=expected) as error:
        load_splits(config)
    assert "\n" not in str(error.value)


def test_utf8_bytes_ids_are_decoded(tmp_path):
    def utf8_ids(data):
        data["valid"]["id"] = np.array(["clipé".encode(), b"clip2"])
    splits = load_splits(data_config("mmsa", mmsa_file(tmp_path, utf8_ids)))
    assert list(splits["valid"]["ids"]) == ["clipé", "clip2"]



@pytest.mark.parametrize("labels, expected", [
    (np.array([0, 2 ** 32 + 1], np.int64), "must lie in [0, 2147483647] (int32 class indices), found range "
                                           "[0, 4294967297]"),
    (np.array([0.0, 1.5]), "must be integers, found 1 non-integer values (first at index 1: 1.5)"),
    (np.array([0.0, np.inf]), "must be integers, found 1 non-integer values (first at index 1: inf)"),
    (np.array([0.0, 1e10]), "must lie in [0, 2147483647] (int32 class indices), found range [0.0, 10000000000.0]"),
    (np.array([-1, 2], np.int64), "must lie in [0, 2147483647] (int32 class indices), found range [-1, 2]"),
    (np.array(["cat", "dog"]), "must be numbers, found dtype <U3 (first: 'cat')"),
], ids=["int64_2_32_plus_1", "non_integral", "inf", "1e10", "negative", "strings"])
def test_features_npz_labels_are_checked_in_their_own_dtype_in_one_line(tmp_path, labels, expected):
    def mutate(splits):
        splits["valid"]["labels"] = labels
    directory = npz_dir(tmp_path, mutate)
    with pytest.raises(UserError) as error:
        load_splits(data_config("features_npz", directory))
    assert str(error.value) == f"{directory}/valid.npz: key 'labels': class labels {expected}"


def test_labels_beyond_num_classes_name_the_setting(tmp_path):
    def mutate(splits):
        splits["test"]["labels"][:] = 3
    directory = npz_dir(tmp_path, mutate)
    with pytest.raises(UserError) as error:
        load_splits(data_config("features_npz", directory))
    assert str(error.value) == (f"features_npz:{directory}:test: key 'labels': class labels must lie in [0, 2] "
                                f"(data.num_classes=3), found range [3, 3]")


def test_string_or_out_of_range_sentiment_labels_are_one_line(tmp_path):
    def strings(data):
        data["train"]["regression_labels"] = np.array(["positive"] * len(data["train"]["regression_labels"]))
    with pytest.raises(UserError, match=r"unaligned_50.pkl:train: key 'regression_labels': sentiment labels must be "
                                        r"numbers, found dtype <U8 \(first: 'positive'\)$"):
        load_splits(data_config("mmsa", mmsa_file(tmp_path, strings)))

    def huge(data):
        data["valid"]["regression_labels"] = np.full(len(data["valid"]["regression_labels"]), 1e300)
    with pytest.raises(UserError, match=r"key 'regression_labels': sentiment labels must lie in \[-3.0, 3.0\], "
                                        r"found range \[1e\+300, 1e\+300\]$"):
        load_splits(data_config("mmsa", mmsa_file(tmp_path, huge)))


def test_a_modality_of_width_0_is_one_line(tmp_path):
    def no_width(splits):
        for split in splits.values():
            split["text"] = split["text"][:, :, :0]
    directory = npz_dir(tmp_path, no_width)
    with pytest.raises(UserError) as error:
        load_splits(data_config("features_npz", directory))
    assert str(error.value) == (f"{directory}/train.npz: key 'text': expected a feature width d >= 1, found shape "
                                f"(4, 6, 0)")


def test_non_finite_features_npz_values_are_zeroed_with_one_warning(tmp_path, caplog):
    def poisoned(splits):
        splits["train"]["image"][0, 0, 0] = np.nan
        splits["test"]["text"][1, 0, :] = np.inf
    directory = npz_dir(tmp_path, poisoned)
    with caplog.at_level("WARNING"):
        splits = load_splits(data_config("features_npz", directory))
    assert splits["train"]["image"][0, 0, 0] == 0 and np.all(splits["test"]["text"][1, 0] == 0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{directory}: replaced 3 non-finite feature values by 0 ({{'train/image_non_finite': 1, "
        f"'test/text_non_finite': 2}})"]
