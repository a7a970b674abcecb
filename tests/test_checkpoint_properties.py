"""Property-based tests of the safetensors reader: random, corrupt and truncated files either load exactly what
their header says or raise CheckpointError naming the file; nothing else escapes."""

import json

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fluxion.checkpoints import load_state_dict, load_transformer, read_checkpoint_info, save_state_dict
from fluxion.checkpoints.io import SAFETENSORS_DTYPES
from fluxion.errors import CheckpointError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**66, 2**66), st.floats(),
                                      st.text(max_size=8)),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                            max_leaves=12)
_entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "F4", "", "f32"]), _json_values),
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), _json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2), _json_values),
})
_headers = st.dictionaries(st.text(min_size=1, max_size=10), st.one_of(_entries, _json_values), max_size=4)


def _load_or_refuse(path):
    try:
        tensors = load_state_dict(path)
    except CheckpointError as e:
        assert str(path) in str(e), e
        return None
    info = read_checkpoint_info(path)  # what loaded is what the header says
    assert tensors.keys() == info.tensors.keys() - {k for k in info.tensors if k == "__metadata__"}
    for key, t in tensors.items():
        assert tuple(t.shape) == info.tensors[key].shape
    return tensors


@FAST
@given(header=_headers, metadata=st.one_of(st.none(), _json_values), data=st.binary(max_size=96))
def test_random_headers_load_or_raise_checkpoint_error(tmp_path, header, metadata, data):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    path = tmp_path / "random.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    _load_or_refuse(path)


@FAST
@given(blob=st.binary(max_size=64))
def test_random_bytes_are_refused(tmp_path, blob):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(blob)
    _load_or_refuse(path)


@FAST
@given(cut=st.integers(0, 10_000), flip=st.one_of(st.none(), st.integers(0, 10_000)))
def test_truncated_or_damaged_files(tmp_path, cut, flip):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.tensor([1, 2], dtype=torch.int64)}
    path = save_state_dict(tensors, tmp_path / "w.safetensors", metadata={"k": "v"})
    data = bytearray(path.read_bytes())
    cut = cut % (len(data) + 1)
    if flip is not None:
        data[flip % len(data)] ^= 0xFF
    path.write_bytes(bytes(data[:cut]))
    loaded = _load_or_refuse(path)
    if loaded is not None and flip is None:  # an intact prefix loads only when nothing was cut
        assert cut == len(data) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(alphabet="abcdefgh._0123", min_size=1, max_size=12), min_size=1, max_size=4,
                      unique=True),
       dims=st.lists(st.integers(1, 4), min_size=1, max_size=2))
def test_unrelated_tensors_are_refused_naming_the_file(tmp_path, names, dims):
    path = save_state_dict({n: torch.zeros(dims) for n in names}, tmp_path / "unrelated.safetensors")
    try:
        load_transformer(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        raise AssertionError(f"{names} loaded as a transformer")


def test_transformer_without_blocks_names_the_file(tmp_path):
    path = save_state_dict({"img_in.weight": torch.zeros(8, 64), "txt_in.weight": torch.zeros(8, 16)},
                           tmp_path / "few.safetensors")
    try:
        load_transformer(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "neither double_blocks nor single_blocks" in str(e)
    else:
        raise AssertionError("loaded a transformer without blocks")
