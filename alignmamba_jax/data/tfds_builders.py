"""TFDS builders for CMU-MOSI / CMU-MOSEI from MMSA's pickles, stored as array_record (no TensorFlow needed).

`MmsaMosi` / `MmsaMosei` are ordinary `tfds.core.GeneratorBasedBuilder`s (configs "unaligned", "aligned"; the
pickle in the manual directory). `prepare(name, data_dir, config)` is how this project builds them: it writes
the same on-disk dataset (array_record shards + dataset_info.json, readable by the builder class,
`tfds.builder_from_directory` and `as_data_source()`) with a streaming writer, because TFDS's own writer
buffers a split in memory and, above 1 GB (MOSEI's train split is ~6 GB), spills it through `tf.io.gfile`,
i.e. needs TensorFlow; and even then sorts a whole bucket in memory when shuffling is disabled.
The pickle is read and checked completely (`mmsa.load_mmsa_pickle`, arrays spilled to disk so memory stays
about one 64 MiB chunk) before any record is written; the dataset is built in a temporary directory beside
`data_dir/<builder>` and renamed into place only when complete: on failure nothing is left in `data_dir`.
`load_tfds_splits` returns the data contract (in memory); `alignmamba_jax.data.grain_pipeline` streams
batches per process instead. Records keep the pickle's order, so test predictions line up with MMSA's.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from alignmamba_jax.data.mmsa import SPLITS, load_mmsa_pickle
from alignmamba_jax.data import validate
from alignmamba_jax.data.validate import as_array
from alignmamba_jax.errors import UserError

_INSTRUCTIONS = """\
Download MMSA's processed features (https://github.com/thuiar/MMSA, "Datasets": links to Google Drive / Baidu
Yun; the files are MOSI/Processed/{unaligned_50,aligned_50}.pkl and MOSEI/Processed/{unaligned_50,aligned_50}.pkl)
and put the pickle for this config (unaligned_50.pkl or aligned_50.pkl) in the manual directory
(default: <data_dir>/downloads/manual/). CMU-MOSI / CMU-MOSEI are licensed by their authors (CMU MultiComp
Lab); accept their terms before use.
"""


class _MmsaBuilder(tfds.core.GeneratorBasedBuilder):
    """One MMSA dataset; subclasses set SHAPES {config: {modality: (T, d)}} and HOMEPAGE."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MMSA aligned_50 / unaligned_50 features."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="unaligned", description="unaligned_50.pkl"),
                       tfds.core.BuilderConfig(name="aligned", description="aligned_50.pkl")]
    SHAPES: dict = {}
    HOMEPAGE = ""
    # TFDS 4.9.10 derives code_path through `importlib_resources`, which it declares only for Python < 3.9
    # (ModuleNotFoundError on 3.11); shadowing the class property with the real path avoids that import.
    code_path = epath.Path(__file__)

    def _info(self):
        shapes = self.SHAPES[self.builder_config.name]
        feats = {}
        for m, shape in shapes.items():
            feats[m] = tfds.features.Tensor(shape=shape, dtype=np.float32)
            feats[m + "_mask"] = tfds.features.Tensor(shape=shape[:1], dtype=np.bool_)
        feats["labels"] = tfds.features.Tensor(shape=(), dtype=np.float32)
        feats["ids"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description=f"{self.name}: MMSA {self.builder_config.description} features and "
                                      f"sentiment labels in [-3, 3].",
            features=tfds.features.FeaturesDict(feats), homepage=self.HOMEPAGE, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        path = os.path.join(dl_manager.manual_dir, f"{self.builder_config.name}_50.pkl")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file.\n{_INSTRUCTIONS}")
        splits = load_mmsa_pickle(path)  # TFDS's writer holds a split in memory anyway; `prepare` streams
        _check_shapes(type(self), self.builder_config.name, splits, path)
        return {s: self._generate_examples(splits[s]) for s in SPLITS}

    def _generate_examples(self, split):
        keys = [k for k in split if k != "ids"]
        for i in range(len(split["labels"])):
            example = {k: np.asarray(split[k][i]) for k in keys}
            example["ids"] = str(split["ids"][i])
            yield i, example


class MmsaMosi(_MmsaBuilder):
    """CMU-MOSI (1284 / 229 / 686 clips) from MMSA."""
    HOMEPAGE = "http://multicomp.cs.cmu.edu/resources/cmu-mosi-dataset/"
    SHAPES = {"unaligned": {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)},
              "aligned": {"text": (50, 768), "audio": (50, 5), "vision": (50, 20)}}


class MmsaMosei(_MmsaBuilder):
    """CMU-MOSEI (16326 / 1871 / 4659 clips) from MMSA."""
    HOMEPAGE = "http://multicomp.cs.cmu.edu/resources/cmu-mosei-dataset/"
    SHAPES = {"unaligned": {"text": (50, 768), "audio": (500, 74), "vision": (500, 35)},
              "aligned": {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)}}


BUILDERS = {"mosi": MmsaMosi, "mosei": MmsaMosei}


def _check_shapes(cls, config, splits, path):
    """The builder's fixed shapes, and the checks across splits every loader gets (an empty split included:
    array_record cannot even open one), before anything is written."""
    validate.check_splits(splits, tuple(cls.SHAPES[config]), path)
    for s in SPLITS:
        for m, shape in cls.SHAPES[config].items():
            if splits[s][m].shape[1:] != shape:
                raise UserError(f"{path}:{s}: key {m!r}: expected shape (N, {shape[0]}, {shape[1]}) for "
                                f"{cls.name}/{config}, found {splits[s][m].shape}")


def _builder_class(name):
    if name not in BUILDERS:
        raise UserError(f"data.tfds_name: expected one of {sorted(BUILDERS)}, found {name!r}")
    return BUILDERS[name]


_SHARD_BYTES = 1 << 30


def _write_array_record(builder, splits):
    """Serialize `splits` with the builder's features into array_record shards + dataset_info.json."""
    from array_record.python import array_record_module
    from tensorflow_datasets.core import example_serializer, naming

    info = builder.info
    features = info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    out_dir = builder.data_dir
    os.makedirs(out_dir, exist_ok=True)
    split_infos = []
    for s in SPLITS:
        split = splits[s]
        n = len(split["labels"])
        per_example = sum(split[k][0].nbytes for k in split if k != "ids") if n else 0
        n_shards = max(1, min(n, -(-n * per_example // _SHARD_BYTES)))
        template = naming.ShardedFileTemplate(data_dir=out_dir, dataset_name=builder.name, split=s,
                                              filetype_suffix="array_record")
        lengths, num_bytes = [], 0
        for shard, idx in enumerate(np.array_split(np.arange(n), n_shards)):
            path = os.fspath(template.sharded_filepath(shard_index=shard, num_shards=n_shards))
            writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
            for i in idx:
                example = {k: np.asarray(split[k][i]) for k in split if k != "ids"}
                example["ids"] = str(split["ids"][i])
                record = serializer.serialize_example(features.encode_example(example))
                writer.write(record)
                num_bytes += len(record)
            writer.close()
            lengths.append(len(idx))
            for arr in split.values():  # drop the shard's pages of the memory-mapped inputs from this process
                if isinstance(arr, np.memmap) and arr._mmap is not None:
                    arr._mmap.madvise(mmap.MADV_DONTNEED)
        split_infos.append(tfds.core.SplitInfo(name=s, shard_lengths=lengths, num_bytes=num_bytes,
                                               filename_template=template))
    info.set_file_format("array_record")
    info.set_splits(tfds.core.SplitDict(split_infos))
    info.write_to_directory(out_dir)


def prepare(name, data_dir, config="unaligned", manual_dir=None):
    """Build (once) and return the TFDS builder for `name` in {"mosi","mosei"}; atomic (see module doc)."""
    cls = _builder_class(name)
    data_dir = os.path.abspath(os.fspath(data_dir))
    builder = cls(data_dir=data_dir, config=config, file_format="array_record")
    if builder.is_prepared():
        return builder
    manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
    path = os.path.join(manual_dir, f"{config}_50.pkl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file.\n{_INSTRUCTIONS}")
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-build-", dir=data_dir)
    try:
        splits = load_mmsa_pickle(path, cache_dir=os.path.join(tmp, "cache"))
        _check_shapes(cls, config, splits, path)
        staging = cls(data_dir=os.path.join(tmp, "data"), config=config, file_format="array_record")
        _write_array_record(staging, splits)
        del splits
        final = builder.data_dir
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staging.data_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cls(data_dir=data_dir, config=config, file_format="array_record")


def read_source(source, batch=512):
    """All records of a TFDS / grain random-access source -> contract split dict (arrays in memory)."""
    n = len(source)
    first = source[0]
    out = {k: np.empty((n,) + np.shape(v), as_array(v).dtype) for k, v in first.items() if k != "ids"}
    ids = []
    for start in range(0, n, batch):
        records = source.__getitems__(list(range(start, min(n, start + batch))))
        for k in out:
            out[k][start:start + len(records)] = np.stack([r[k] for r in records])
        ids.extend(r["ids"].decode() if isinstance(r["ids"], bytes) else str(r["ids"]) for r in records)
    out["ids"] = np.array(ids)
    return out


def load_tfds_splits(name, data_dir, config="unaligned", manual_dir=None):
    """{"train","valid","test"} -> contract split dict, building the TFDS dataset first if needed."""
    sources = prepare(name, data_dir, config, manual_dir).as_data_source()
    return {s: read_source(sources[s]) for s in SPLITS}
