"""Loading a data pickle runs no code from it, and the MMSA cache (`data.cache_dir`) is keyed on content, safe
for two processes at once and cleans up after a killed conversion.

Hostile pickles call `os.system` with a harmless marker command (it creates a file); the tests check that the
load is refused with one line naming the file and the refused name, and that the marker was never created.
Others use only allowed names: a BUILD that points the cache's spill file at another file, absurd sizes and
nesting; each is one line and changes no file outside the cache.
"""
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from alignmamba_jax.data import layouts, load_mmsa_pickle, load_mult_pickle, safe_pickle
from alignmamba_jax.errors import UserError
from test_main_errors import SYNTHETIC, run_main


class Marker:
    """Unpickling this object runs `touch path` (what a hostile file would use to run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def hostile_pickle(tmp_path, kind, protocol=4):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"{kind}_evil.pkl"
    writer = layouts.write_mmsa_pickle if kind == "mmsa" else layouts.write_mult_pickle
    data = writer(path)
    data["train"]["extra"] = Marker(marker)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path, marker


def test_the_marker_does_run_under_plain_pickle_load(tmp_path):
    """The hostile file is what the other tests say: pickle.load would run its command."""
    path, marker = hostile_pickle(tmp_path, "mmsa")
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("cached", [False, True])
def test_hostile_mmsa_pickle_runs_nothing(tmp_path, cached, protocol):
    path, marker = hostile_pickle(tmp_path, "mmsa", protocol)
    cache = tmp_path / "cache" if cached else None
    with pytest.raises(UserError) as error:
        load_mmsa_pickle(path, cache_dir=cache)
    assert str(error.value) == (f"{path}: refused to load posix.system: a data pickle may hold only numpy arrays, "
                                f"dtypes and scalars in builtin containers (loading runs no code from a data file)")
    assert not marker.exists()
    if cached:   # the failed conversion leaves nothing behind but the content digest
        assert os.listdir(cache) == [".digests.json"]


def test_hostile_mult_pickle_runs_nothing(tmp_path):
    path, marker = hostile_pickle(tmp_path, "mult")
    with pytest.raises(UserError, match=rf"^{path}: refused to load posix.system"):
        load_mult_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("cached", [False, True])
def test_hostile_pickle_through_main_is_one_error_line(tmp_path, cached):
    path, marker = hostile_pickle(tmp_path, "mmsa")
    extra = [f"--config.data.cache_dir={tmp_path / 'cache'}"] if cached else []
    rc, output = run_main(f"--config={SYNTHETIC}", "--config.data.name=mmsa", f"--config.data.path={path}", *extra,
                          f"--workdir={tmp_path / 'run'}")
    assert rc == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: refused to load posix.system"), output
    assert not marker.exists()


def build_attack_pickle(path, victim):
    """A pickle whose BUILD rewrites the spill object of its 64 KiB byte string to point at `victim`, then has
    numpy's _frombuffer make it an array: the round-2 spill unpickler then wrote a .npy header into `victim` and
    mapped it writable."""
    def text(s):
        data = s.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    n = 64 << 10
    state = (pickle.NONE + pickle.EMPTY_DICT + pickle.MARK + text("path") + text(str(victim)) + text("nbytes")
             + pickle.BININT + struct.pack("<i", 8) + pickle.SETITEMS + pickle.TUPLE2)
    path.write_bytes(pickle.PROTO + b"\x04" + pickle.GLOBAL + b"numpy.core.numeric\n_frombuffer\n" + pickle.MARK
                     + pickle.BINBYTES + struct.pack("<I", n) + b"\0" * n + state + pickle.BUILD
                     + text("u1") + pickle.BININT + struct.pack("<i", 8) + pickle.TUPLE1 + text("C")
                     + pickle.TUPLE + pickle.REDUCE + pickle.STOP)


def test_a_build_that_points_a_spill_file_outside_the_cache_changes_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious bytes, not to be overwritten\n")
    path = tmp_path / "attack.pkl"
    build_attack_pickle(path, victim)
    with pytest.raises(UserError) as error:
        load_mmsa_pickle(path, cache_dir=tmp_path / "cache")
    assert str(error.value) == (f"{path}: refused to set the state of a OnDisk: a data pickle sets state only on "
                                f"numpy arrays and dtypes")
    assert victim.read_bytes() == b"precious bytes, not to be overwritten\n"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def nested_pickle(path, depth):
    """`depth` lists nested in one another, in one pickle's opcodes (pickle.dumps itself would recurse)."""
    path.write_bytes(pickle.PROTO + b"\x04" + (pickle.EMPTY_LIST + pickle.MARK) * depth
                     + pickle.APPENDS * depth + pickle.STOP)


@pytest.mark.parametrize("cached", [False, True])
def test_absurd_sizes_and_nesting_are_refused_with_the_reason(tmp_path, cached):
    cache = tmp_path / "cache" if cached else None
    deep = tmp_path / "deep.pkl"
    nested_pickle(deep, 200_000)
    expected = (f"{deep}: refused: containers nested more than 64 deep" if cached else
                f"{deep}: expected a dict of splits")
    with pytest.raises(UserError, match="^" + expected):
        load_mmsa_pickle(deep, cache_dir=cache)
    huge = tmp_path / "huge.pkl"
    huge.write_bytes(pickle.PROTO + b"\x04" + pickle.GLOBAL + b"builtins\nbytearray\n" + pickle.MARK
                     + pickle.LONG1 + bytes([9]) + (2 ** 70).to_bytes(9, "little") + pickle.TUPLE + pickle.REDUCE
                     + pickle.STOP)
    with pytest.raises(UserError, match=f"^{huge}: refused bytearray\\(int\\): pickle writes a bytearray from its "
                                        f"bytes, never from a size$"):
        load_mmsa_pickle(huge, cache_dir=cache)
    huge.write_bytes(pickle.PROTO + b"\x04" + pickle.GLOBAL + b"builtins\ncomplex\n" + pickle.MARK
                     + pickle.LONG4 + struct.pack("<i", 200) + b"\x01" * 200 + pickle.TUPLE + pickle.REDUCE
                     + pickle.STOP)
    with pytest.raises(UserError, match=f"^{huge}: refused: a value too large or containers nested too deep for "
                                        f"feature data \\(OverflowError: "):
        load_mmsa_pickle(huge, cache_dir=cache)


def test_refused_names_are_checked_before_import():
    """find_class refuses a name without importing its module (importing a module runs its code)."""
    with pytest.raises(safe_pickle.RefusedGlobal, match="refused to load not_a_module_anyone_has.run"):
        safe_pickle.check_global("not_a_module_anyone_has", "run")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_layouts_and_numpy_values_load_as_pickle_would(tmp_path, protocol):
    """Every name the field's files use is allowed: the MMSA and MulT layouts (object arrays of ids and raw text,
    float / int arrays), numpy scalars, sets and bytes, in every protocol, load equal to pickle.load's result."""
    data = {"mmsa": layouts.write_mmsa_pickle(tmp_path / "a.pkl", "mosi", True),
            "mult": layouts.write_mult_pickle(tmp_path / "b.pkl", aligned=False),
            "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), {1, 2}, frozenset({3}), b"\xff", 2 + 1j,
                        bytearray(b"ab")]}
    raw = pickle.dumps(data, protocol=protocol)
    path = tmp_path / "all.pkl"
    path.write_bytes(raw)
    with open(path, "rb") as f:
        got = safe_pickle.load(f)
    expected = pickle.loads(raw)

    def same(a, b):
        assert type(a) is type(b)
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        elif isinstance(a, list):
            assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        else:
            assert a == b
        return True
    assert same(got, expected)


def test_cache_stats_are_json_and_a_planted_stats_pickle_is_never_read(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    layouts.write_mmsa_pickle(path, "mosi", False)
    cache = tmp_path / "cache"
    _, stats = load_mmsa_pickle(path, cache_dir=cache, return_stats=True)
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in folder.iterdir()) == ["stats.json", "test", "train", "valid"]
    marker = tmp_path / "code_ran"
    (folder / "stats.pkl").write_bytes(pickle.dumps(Marker(marker)))
    _, again = load_mmsa_pickle(path, cache_dir=cache, return_stats=True)
    assert again == stats and sum(stats.values()) > 0 and not marker.exists()


def test_cache_is_keyed_on_content_not_size_and_mtime(tmp_path):
    """A corrected file copied over the old one with `cp -p` (same size, same mtime) is converted again."""
    old, new = tmp_path / "old" / "unaligned_50.pkl", tmp_path / "new" / "unaligned_50.pkl"
    old.parent.mkdir()
    new.parent.mkdir()
    layouts.write_mmsa_pickle(old, "mosi", False)
    data = layouts.write_mmsa_pickle(new, "mosi", False)
    data["test"]["regression_labels"][0] = -data["test"]["regression_labels"][0] + 0.5   # a corrected label
    new.write_bytes(pickle.dumps(data, protocol=4))
    assert new.stat().st_size == old.stat().st_size
    target = tmp_path / "unaligned_50.pkl"
    shutil.copy2(old, target)
    cache = tmp_path / "cache"
    before = load_mmsa_pickle(target, cache_dir=cache)["test"]["labels"][0]
    shutil.copy2(new, target)                       # cp -p: same name, size and mtime, new content
    os.utime(target, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (old.stat().st_size, old.stat().st_mtime_ns)
    after = load_mmsa_pickle(target, cache_dir=cache)["test"]["labels"][0]
    assert before != after and after == data["test"]["regression_labels"][0]


def _load_in_child(path, cache, queue):
    try:
        queue.put(float(np.sum(load_mmsa_pickle(path, cache_dir=cache)["train"]["audio"])))
    except BaseException as e:   # noqa: BLE001 - reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


def test_two_processes_filling_an_empty_cache_both_get_it(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    layouts.write_mmsa_pickle(path, "mosi", False, sizes=(64, 8, 8))
    cache = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(str(path), cache, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    expected = float(np.sum(load_mmsa_pickle(path)["train"]["audio"]))
    assert results == [expected, expected], results
    assert len([p for p in os.listdir(cache) if not p.startswith(".")]) == 1
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp-") or p.endswith(".lock")]


def test_a_killed_conversion_is_cleaned_up_by_the_next_load(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    layouts.write_mmsa_pickle(path, "mosi", False)
    cache = tmp_path / "cache"
    # A conversion that dies with kill -9 while it holds its lock and has written into its .tmp-* folder.
    script = ("import sys, time; from alignmamba_jax.data import mmsa\n"
              "def stall(path, tmp):\n"
              "    open(tmp + '/partial.npy', 'wb').write(b'0' * 1000); print('converting', flush=True); time.sleep(600)\n"
              "mmsa._convert_into = stall\n"
              "mmsa.load_mmsa_pickle(sys.argv[1], cache_dir=sys.argv[2])\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(path), str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "converting"
        (stale,) = [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
        # While the writer lives, another load leaves its folder alone (and waits for its lock: not tested here).
        from alignmamba_jax.data import mmsa
        mmsa._remove_stale_conversions(str(cache))
        assert stale.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    splits = load_mmsa_pickle(path, cache_dir=cache)
    assert not stale.exists() and splits["train"]["audio"].shape[0] == 8
    assert not [p for p in os.listdir(cache) if p.endswith(".lock")]


def test_stored_lengths_are_used_when_a_stream_has_the_text_length(tmp_path):
    """An unaligned file whose audio happens to have T = 50 (the text's) keeps its audio_lengths."""
    path = tmp_path / "unaligned_50.pkl"
    data = layouts.write_mmsa_pickle(path, "mosi", False)
    for split in data.values():
        split["audio"] = np.ascontiguousarray(split["audio"][:, :50])
        split["audio_lengths"] = [min(v, 50) for v in split["audio_lengths"]]
    path.write_bytes(pickle.dumps(data, protocol=4))
    for cache in (None, tmp_path / "cache"):
        splits = load_mmsa_pickle(path, cache_dir=cache)
        for s, split in data.items():
            np.testing.assert_array_equal(splits[s]["audio_mask"].sum(-1), split["audio_lengths"])


def test_aligned_file_without_lengths_takes_the_text_mask(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    data = layouts.write_mmsa_pickle(path, "mosi", True)
    splits = load_mmsa_pickle(path)
    for s, split in data.items():
        np.testing.assert_array_equal(splits[s]["audio_mask"], split["text_bert"][:, 1] > 0)
        np.testing.assert_array_equal(splits[s]["vision_mask"], split["text_bert"][:, 1] > 0)


def test_aligned_file_whose_lengths_describe_the_raw_streams_takes_the_text_mask(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    data = layouts.write_mmsa_pickle(path, "mosi", True)
    for split in data.values():
        n = len(split["regression_labels"])
        split["audio_lengths"] = [375] * n      # raw audio frames, before alignment to the 50 word positions
        split["vision_lengths"] = [500] * n
    path.write_bytes(pickle.dumps(data, protocol=4))
    splits = load_mmsa_pickle(path)
    np.testing.assert_array_equal(splits["train"]["audio_mask"], data["train"]["text_bert"][:, 1] > 0)


def test_numpy_1_names_resolve_without_numpy_2_deprecation_warnings():
    """Files written by numpy 1.x name numpy.core.*, which numpy 2 deprecates: they resolve to the same objects
    as numpy._core.* without a warning (the real MMSA files predate numpy 2)."""
    import io
    import warnings
    unpickler = safe_pickle.SafeUnpickler(io.BytesIO(b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module, name in sorted(safe_pickle.ALLOWED):
            found = unpickler.find_class(module, name)
            if module.startswith("numpy.core."):
                assert found is unpickler.find_class(module.replace("numpy.core.", "numpy._core."), name)
