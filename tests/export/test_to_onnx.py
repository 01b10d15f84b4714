"""to_onnx: ONNX Runtime equals PyTorch (every expert in the graph), names and dynamic dims, int8, bad input."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deepseek_moe import MoE, MoEConfig
from deepseek_moe.export import ExportError, model_bytes, quantize_int8, to_onnx

DIM = 32
CFG = MoEConfig(dim=DIM, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                n_expert_groups=4, n_limited_groups=2, route_scale=1.5)


class SequenceClassifier(nn.Module):
    """A user's model: MoE layer with its residual, then an LSTM (batch_first), then a head."""

    def __init__(self, cfg: MoEConfig = CFG) -> None:
        super().__init__()
        self.moe = MoE(cfg)
        self.lstm = nn.LSTM(cfg.dim, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features + self.moe(features)
        out, _ = self.lstm(h)
        return self.head(out[:, -1])


def scaled(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # weights large enough that a wrong expert shows in the output
        for name, p in model.named_parameters():
            if "moe" in name:
                p.normal_(0, 0.3)
    return model.eval()


def run(path, **inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def routes_everywhere(model: SequenceClassifier, x: torch.Tensor) -> bool:
    with torch.no_grad():
        model(x)
    return bool((model.moe.last_stats.tokens_per_expert > 0).all())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export whose example input reaches only the K experts of a single repeated token."""
    model = scaled(SequenceClassifier())
    one_token = torch.randn(1, 1, DIM).expand(2, 5, DIM).contiguous()
    with torch.no_grad():
        model(one_token)
    taken = model.moe.last_stats.tokens_per_expert > 0
    assert int(taken.sum()) == CFG.n_activated_experts  # the trace sees 2 of 8 experts
    path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    to_onnx(model, path, (one_token,))
    return model, path, taken


def test_ort_equals_pytorch_on_inputs_that_reach_every_expert(exported):
    model, path, _ = exported
    torch.manual_seed(1)
    x = torch.randn(3, 17, DIM)  # another batch size and length than the example: both dims dynamic
    assert routes_everywhere(model, x)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run(path, features=x)[0], expected, rtol=1e-4, atol=1e-4)


def test_experts_the_example_never_reached_are_in_the_graph(exported):
    """A graph that kept only the experts the trace saw would compute the model with the others zeroed; ORT must
    match the full model and be far from that truncated one."""
    model, path, taken = exported
    torch.manual_seed(2)
    x = torch.randn(64, 1, DIM)
    assert routes_everywhere(model, x)
    with torch.no_grad():
        expected = model(x).numpy()
        full_w2 = model.moe.experts.w2.clone()
        model.moe.experts.w2[~taken] = 0
        truncated = model(x).numpy()
        model.moe.experts.w2.copy_(full_w2)
    got = run(path, features=x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(got - truncated).max() > 1e-2


def test_graph_has_no_control_flow_and_names_from_forward(exported):
    _, path, _ = exported
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"If", "Loop", "Scan", "NonZero"}, ops  # no data-dependent shapes or branches
    assert [i.name for i in graph.input] == ["features"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", DIM]
    assert [o.name for o in graph.output] == ["output"]


def test_int8_quantises_the_experts_and_stays_close(exported, tmp_path):
    model, path, _ = exported
    q = quantize_int8(path, tmp_path / "classifier.int8.onnx")
    graph = onnx.load(str(q)).graph
    integer_weights = {i for node in graph.node if node.op_type == "MatMulInteger" for i in node.input}
    assert any("w13" in name for name in integer_weights) and any("w2" in name for name in integer_weights)
    assert "DynamicQuantizeLSTM" in {node.op_type for node in graph.node}
    # The router stays float32 (routing decisions exact).
    assert "MatMul" in {node.op_type for node in graph.node if any("gate.weight" in i for i in node.input)}
    assert model_bytes(q) < 0.5 * model_bytes(path)
    torch.manual_seed(3)
    x = torch.randn(8, 12, DIM)
    with torch.no_grad():
        expected = model(x).numpy()
    got = run(q, features=x)[0]
    # Stated tolerance (random weights; the int8 LSTM adds most of the error): mean |diff| within 3% and max
    # within 15% of the logits' range (measured: 1.5% and 10%). examples/risk_model.py reports accuracy.
    spread = expected.max() - expected.min()
    assert np.abs(got - expected).mean() <= 0.03 * spread and np.abs(got - expected).max() <= 0.15 * spread


def test_a_bare_layer_and_dict_inputs(tmp_path):
    torch.manual_seed(0)
    moe = scaled(nn.ModuleDict({"moe": MoE(CFG)}))["moe"]
    x = torch.randn(2, 6, DIM)
    to_onnx(moe, tmp_path / "layer.onnx", (x,))
    y = torch.randn(3, 9, DIM)
    with torch.no_grad():
        np.testing.assert_allclose(run(tmp_path / "layer.onnx", x=y)[0], moe(y).numpy(), rtol=1e-4, atol=1e-4)

    class TwoFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user, self.item, self.moe = nn.Embedding(10, DIM), nn.Embedding(7, DIM), moe

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            h = self.user(batch["user"]) + self.item(batch["item"])  # (N, dim): each row is one token
            return (h + self.moe(h)).sum(-1)

    model = TwoFeatures().eval()
    batch = {"user": torch.tensor([1, 2]), "item": torch.tensor([3, 4])}
    to_onnx(model, tmp_path / "rec.onnx", (batch,))
    other = {"user": torch.arange(10), "item": torch.arange(10) % 7}
    with torch.no_grad():
        np.testing.assert_allclose(run(tmp_path / "rec.onnx", **other)[0], model(other).numpy(), rtol=1e-4,
                                   atol=1e-4)


def test_refusals_leave_no_files(tmp_path):
    model = SequenceClassifier(CFG.replace(capacity_factor=1.0, drop_at_inference=True)).eval()
    x = torch.randn(1, 4, DIM)
    with pytest.raises(ExportError, match="drop_at_inference"):
        to_onnx(model, tmp_path / "m.onnx", (x,))
    with pytest.raises(ExportError, match="does not exist"):
        to_onnx(SequenceClassifier().eval(), tmp_path / "missing" / "m.onnx", (x,))

    class Broken(nn.Module):  # fails inside the exporter, after the staging directory exists
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoE(CFG)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.moe(x) if x.shape[1] == 4 else x  # shape-dependent branch: export specialises it

    with pytest.raises(ExportError, match="could not capture"):
        to_onnx(Broken().eval(), tmp_path / "broken.onnx", (x,))
    assert os.listdir(tmp_path) == []


def test_unwritable_destination(tmp_path):
    (tmp_path / "file").write_text("")
    x = torch.randn(1, 4, DIM)
    with pytest.raises(ExportError, match="not a directory"):
        to_onnx(SequenceClassifier().eval(), tmp_path / "file" / "m.onnx", (x,))
    with pytest.raises(ExportError, match="is a directory"):
        to_onnx(SequenceClassifier().eval(), tmp_path, (x,))
    assert os.listdir(tmp_path) == ["file"]
