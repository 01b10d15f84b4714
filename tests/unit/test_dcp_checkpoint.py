"""The DCP layer of training checkpoints on one process: what it refuses to unpickle, and the check that state
stored once is the same on every process."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from deepseek_moe.parallel.dcp import CheckpointReadError, load, read_full, read_metadata, save


def test_round_trip_of_nested_tensors(tmp_path: Path) -> None:
    tensors = {"model": {"a.weight": torch.randn(3, 4), "b": torch.arange(5)},
               "optimizer": {"a.weight": {"exp_avg": torch.randn(3, 4), "step": torch.tensor(7.0)}}}
    save(tmp_path / "ckpt", tensors)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".metadata", "__0_0.distcp"]
    into = {"model": {"a.weight": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)},
            "optimizer": {"a.weight": {"exp_avg": torch.zeros(3, 4), "step": torch.tensor(0.0)}}}
    load(tmp_path / "ckpt", into)
    assert torch.equal(into["model"]["a.weight"], tensors["model"]["a.weight"])
    assert torch.equal(into["optimizer"]["a.weight"]["exp_avg"], tensors["optimizer"]["a.weight"]["exp_avg"])
    assert float(into["optimizer"]["a.weight"]["step"]) == 7.0
    whole = read_full(tmp_path / "ckpt", "optimizer")
    assert sorted(whole) == ["a.weight/exp_avg", "a.weight/step"]


def test_non_tensor_entries_are_neither_saved_nor_read(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'model.lr' is a float"):
        save(tmp_path / "mine", {"model": {"lr": 0.1}})
    # DCP itself stores anything (pickled); such a checkpoint is refused before any entry is read
    dcp.save({"w": torch.ones(2), "note": {"any": "object"}}, checkpoint_id=tmp_path / "theirs", no_dist=True)
    for read in (lambda: read_metadata(tmp_path / "theirs"), lambda: load(tmp_path / "theirs", {"w": torch.zeros(2)})):
        with pytest.raises(CheckpointReadError, match="BytesStorageMetadata is not allowed"):
            read()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def test_metadata_builds_only_dcp_records(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", {"w": torch.ones(2)})
    md = read_metadata(tmp_path / "ckpt")
    assert md.state_dict_metadata["w"].size == torch.Size([2])
    marker = tmp_path / "ran"
    # a real metadata object carrying a planted object in a field DCP never fills with one
    md.planner_data = {"w": ("w",), "x": _Payload(marker)}  # type: ignore[dict-item]
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointReadError, match=r"(io|builtins)\.open is not allowed"):
        read_metadata(tmp_path / "ckpt")
    assert not marker.exists()
    (tmp_path / "ckpt" / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointReadError, match=".metadata is unreadable"):
        read_metadata(tmp_path / "ckpt")
    with pytest.raises(CheckpointReadError, match="missing"):
        read_metadata(tmp_path / "nowhere")


def test_state_stored_once_must_be_equal_on_every_process() -> None:
    """A save refuses state that differs between processes (it is stored once, so another process count could not
    continue it); here a stand-in strategy reports another mean than this process's value."""
    from deepseek_moe.train.checkpoint import _check_same_everywhere
    from deepseek_moe.train.errors import TrainError
    from deepseek_moe.train.strategy import SingleProcess

    class Disagreeing(SingleProcess):
        def mean(self, *values: float) -> list[float]:
            return [v + 1 for v in values]

    tensors, layout = {"/rng/torch": torch.get_rng_state()}, {"rng": {"$tensor": "/rng/torch"}}
    _check_same_everywhere(SingleProcess(torch.device("cpu")), 3, tensors, layout)
    with pytest.raises(TrainError, match="differs between processes"):
        _check_same_everywhere(Disagreeing(torch.device("cpu")), 3, tensors, layout)


def test_a_corrupt_data_file_is_named(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", {"model": {"w": torch.randn(64), "b": torch.randn(8)}})
    data = tmp_path / "ckpt" / "__0_0.distcp"
    data.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointReadError, match=r"__0_0\.distcp is unreadable or corrupt"):
        load(tmp_path / "ckpt", {"model": {"w": torch.zeros(64), "b": torch.zeros(8)}})
