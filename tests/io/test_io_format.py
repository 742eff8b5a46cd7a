"""Model files: plain data only, atomic writes, refusal of pickles, versioning."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from cellvi.errors import CellviWarning, ModelFileError
from cellvi.io import FORMAT_VERSION, from_plain, read_model_file, to_plain, write_model_dir


def _attrs():
    history = pd.DataFrame(
        {"elbo_train": [3.0, np.nan, 1.0]}, index=pd.Index([0, 1, 2], name="epoch")
    )
    return {
        "history_": {"elbo_train": history},
        "train_indices_": np.array([3, 1, 2]),
        "names": np.array(["a", "b"]),
        "nested": {"x": (1, 2.5, None), "inf": float("inf")},
    }


def test_round_trip_keeps_tensors_and_attributes(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    write_model_dir(
        tmp_path / "m", state_dict=state, var_names=["g1"], attr_dict=to_plain(_attrs())
    )
    content = read_model_file(tmp_path / "m")
    torch.testing.assert_close(content["model_state_dict"]["w"], state["w"])
    attrs = from_plain(content["attr_dict"])
    pd.testing.assert_frame_equal(
        attrs["history_"]["elbo_train"], _attrs()["history_"]["elbo_train"]
    )
    np.testing.assert_array_equal(attrs["train_indices_"], [3, 1, 2])
    assert attrs["names"].tolist() == ["a", "b"] and attrs["nested"]["inf"] == float("inf")
    assert content["var_names"] == ["g1"] and content["format_version"] == FORMAT_VERSION


def test_codec_rejects_unknown_types_naming_the_key():
    with pytest.raises(TypeError, match=r"root.model: cannot store a object"):
        to_plain({"model": object()})


def test_existing_directory_needs_overwrite(tmp_path):
    write_model_dir(tmp_path / "m", state_dict={}, var_names=[], attr_dict={})
    with pytest.raises(ModelFileError, match="exists; pass overwrite=True"):
        write_model_dir(tmp_path / "m", state_dict={}, var_names=[], attr_dict={})


def test_overwrite_removes_stale_files(tmp_path):
    write_model_dir(
        tmp_path / "m",
        state_dict={},
        var_names=[],
        attr_dict={},
        extra_files={"adata.h5ad": lambda p: p.write_text("old")},
    )
    write_model_dir(tmp_path / "m", state_dict={}, var_names=[], attr_dict={}, overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["model.pt"]


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("where", ["extra_file", "torch_save"])
def test_interrupted_save_leaves_previous_model_intact(tmp_path, monkeypatch, where):
    write_model_dir(
        tmp_path / "m", state_dict={"w": torch.ones(2)}, var_names=[], attr_dict={"v": 1}
    )
    before = _snapshot(tmp_path / "m")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    extra = None
    if where == "extra_file":
        extra = {"adata.h5ad": boom}
    else:
        monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_model_dir(
            tmp_path / "m",
            state_dict={"w": torch.zeros(2)},
            var_names=[],
            attr_dict={"v": 2},
            overwrite=True,
            extra_files=extra,
        )
    assert _snapshot(tmp_path / "m") == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left


class _Payload:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "model.pt", "wb") as fh:
        pickle.dump({"model_state_dict": {}, "evil": _Payload()}, fh, protocol=2)
    with pytest.raises(ModelFileError, match="refuses to execute.*may be malicious"):
        read_model_file(tmp_path / "m")
    assert not marker.exists()


def test_allow_pickle_warns(tmp_path):
    write_model_dir(tmp_path / "m", state_dict={}, var_names=[], attr_dict={})
    with pytest.warns(CellviWarning, match="can run arbitrary code"):
        read_model_file(tmp_path / "m", allow_pickle=True)


@pytest.mark.parametrize(
    ("version", "advice"),
    [
        ("9.0", "written by a newer cellvi: upgrade"),
        (None, "no format version, so it was not written by cellvi"),
        ("0.3", "not a file this cellvi writes"),
        ("abc", "not a file this cellvi writes"),  # all four used to say "Upgrade"
    ],
)
def test_a_format_version_this_cellvi_cannot_read_gets_the_right_advice(tmp_path, version, advice):
    (tmp_path / "m").mkdir()
    content = {"model_state_dict": {}, "attr_dict": {}}
    if version is not None:
        content["format_version"] = version
    torch.save(content, tmp_path / "m" / "model.pt")
    with pytest.raises(ModelFileError, match=f"format version .*{advice}"):
        read_model_file(tmp_path / "m")


def test_a_file_that_is_not_a_torch_archive_is_a_model_file_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_text("hello")  # was a bare KeyError: 101
    with pytest.raises(ModelFileError, match="not a readable model file"):
        read_model_file(tmp_path / "m")


def test_missing_file_lists_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ref_model.pt").write_text("x")
    with pytest.raises(ModelFileError, match=r"No model file .*\['ref_model.pt'\].*prefix"):
        read_model_file(tmp_path / "m")


def test_truncated_file_is_reported(tmp_path):
    write_model_dir(tmp_path / "m", state_dict={"w": torch.ones(100)}, var_names=[], attr_dict={})
    path = tmp_path / "m" / "model.pt"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        read_model_file(tmp_path / "m")
